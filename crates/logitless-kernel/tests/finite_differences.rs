//! f64 gradients against central finite differences of the kernel's own loss — a check of the gradient formulas
//! that does not go through the reference's (hand-derived) gradients.

mod common;

use common::{Case, Rng, Want};

/// Σ_i s_i·l_i as the kernel computes it (per-row losses, weighted in f64 here).
fn weighted_loss(c: &Case) -> f64 {
    let got = common::run::<f64>(
        c,
        Want {
            d_hidden: false,
            d_weight: false,
            d_bias: false,
            ..Want::default()
        },
    );
    let per_row = got.per_row.unwrap_or_default();
    per_row
        .iter()
        .enumerate()
        .map(|(i, l)| c.scale_of(i) * l)
        .sum()
}

fn check_fd(case: &Case, seed: u64) {
    let got = common::run::<f64>(case, Want::default());
    let (dh, dw, db) = (
        got.d_hidden.unwrap_or_default(),
        got.d_weight.unwrap_or_default(),
        got.d_bias.unwrap_or_default(),
    );
    let mut rng = Rng::new(seed);
    let step = 1e-6;
    // A handful of coordinates of each gradient (all of them would be slow and add nothing).
    for _ in 0..12 {
        let k = rng.below(case.hidden.len());
        let (mut plus, mut minus) = (case.clone(), case.clone());
        plus.hidden[k] += step;
        minus.hidden[k] -= step;
        let fd = (weighted_loss(&plus) - weighted_loss(&minus)) / (2.0 * step);
        assert!(
            (fd - dh[k]).abs() <= 1e-6 * (1.0 + fd.abs()),
            "d_hidden[{k}]: fd {fd} vs {}",
            dh[k]
        );

        let k = rng.below(case.weight.len());
        let (mut plus, mut minus) = (case.clone(), case.clone());
        plus.weight[k] += step;
        minus.weight[k] -= step;
        let fd = (weighted_loss(&plus) - weighted_loss(&minus)) / (2.0 * step);
        assert!(
            (fd - dw[k]).abs() <= 1e-6 * (1.0 + fd.abs()),
            "d_weight[{k}]: fd {fd} vs {}",
            dw[k]
        );

        if let Some(b) = &case.bias {
            let k = rng.below(b.len());
            let (mut plus, mut minus) = (case.clone(), case.clone());
            let mut pb = b.clone();
            let mut mb = b.clone();
            pb[k] += step;
            mb[k] -= step;
            plus.bias = Some(pb);
            minus.bias = Some(mb);
            let fd = (weighted_loss(&plus) - weighted_loss(&minus)) / (2.0 * step);
            assert!(
                (fd - db[k]).abs() <= 1e-6 * (1.0 + fd.abs()),
                "d_bias[{k}]: fd {fd} vs {}",
                db[k]
            );
        }
    }
}

#[test]
fn plain_cross_entropy() {
    let mut rng = Rng::new(21);
    let case = Case::random(&mut rng, 6, 7, 23, 0.2);
    check_fd(&case, 1);
}

#[test]
fn full_epilogue_smoothing_z_loss_bias_row_scale() {
    let mut rng = Rng::new(22);
    let mut case = Case::random(&mut rng, 7, 6, 29, 0.25);
    case.bias = Some(rng.vec(29, 1.0));
    case.logits_bias = Some(rng.vec(29, 1.0).iter().map(|&x| x as f32).collect());
    case.multiply = Some(1.5);
    case.divide = Some(0.75);
    case.softcap = Some(2.5);
    case.smoothing = 0.2;
    case.z_loss = 0.01;
    case.row_scale = Some((0..7).map(|i| 0.5 + i as f32 * 0.25).collect());
    check_fd(&case, 2);
}

#[test]
fn budget_forcing_one_row_blocks() {
    let mut rng = Rng::new(23);
    let mut case = Case::random(&mut rng, 5, 4, 17, 0.0);
    case.softcap = Some(3.0);
    case.smoothing = 0.1;
    let got = common::run::<f64>(
        &case,
        Want {
            budget: 1,
            ..Want::default()
        },
    );
    let full = common::run::<f64>(&case, Want::default());
    // The split into blocks must not change f64 results beyond rounding.
    for (a, b) in got
        .d_weight
        .unwrap_or_default()
        .iter()
        .zip(full.d_weight.unwrap_or_default().iter())
    {
        assert!((a - b).abs() <= 1e-12 * (1.0 + b.abs()));
    }
    check_fd(&case, 3);
}
