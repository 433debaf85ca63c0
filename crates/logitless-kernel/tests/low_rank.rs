//! The low-rank term (`fused_linear_cross_entropy_low_rank`: logits `x·Wᵀ + a·bᵀ`, a LoRA adapter on a frozen
//! head) against the naive float64 reference of `common`, which sees it as the plain op on concatenated operands:
//! `[x | a] · [W | b]ᵀ`. The reference's d_hidden then holds d_x and d_a side by side, and its d_weight's last `r`
//! columns are d_b. Every instruction-set path this machine runs; one test (the ISA override is process-wide).

mod common;

use common::{Case, Rng, TestElement, assert_close, reference};
use half::{bf16, f16};
use logitless_kernel::isa::{self, Isa};
use logitless_kernel::{
    Epilogue, GradScale, Grads, KernelError, LowRank, MatRef, Options, RowOutputs,
    fused_linear_cross_entropy_low_rank,
};

struct Problem {
    case: Case,
    rank: usize,
    a: Vec<f32>,
    b: Vec<f32>,
}

/// `case` with `a` (N × r) and `b` (V × r) of f32 values, and the concatenated operands for the reference.
fn problem(rng: &mut Rng, n: usize, h: usize, v: usize, rank: usize, ignored: f64) -> Problem {
    let case = Case::random(rng, n, h, v, ignored);
    let a = rng.vec(n * rank, 1.0).iter().map(|&x| x as f32).collect();
    let b = rng.vec(v * rank, 0.5).iter().map(|&x| x as f32).collect();
    Problem { case, rank, a, b }
}

fn concatenated(left: &[f64], right: &[f32], rows: usize, cols: usize, rank: usize) -> Vec<f64> {
    let mut out = Vec::with_capacity(rows * (cols + rank));
    for i in 0..rows {
        out.extend_from_slice(&left[i * cols..(i + 1) * cols]);
        out.extend(right[i * rank..(i + 1) * rank].iter().map(|&x| x as f64));
    }
    out
}

fn split_columns(m: &[f64], rows: usize, cols: usize, rank: usize) -> (Vec<f64>, Vec<f64>) {
    let (mut left, mut right) = (Vec::new(), Vec::new());
    for row in m.chunks(cols + rank).take(rows) {
        left.extend_from_slice(&row[..cols]);
        right.extend_from_slice(&row[cols..]);
    }
    (left, right)
}

fn check<T: TestElement>(p: &Problem, budget: usize, parallel: bool, with_dh: bool) {
    let c = p.case.clone().rounded::<T>();
    let (n, h, v, r) = (c.n, c.h, c.v, p.rank);
    let mut joined = c.clone();
    joined.h = h + r;
    joined.hidden = concatenated(&c.hidden, &p.a, n, h, r);
    joined.weight = concatenated(&c.weight, &p.b, v, h, r);
    let want = reference(&joined);
    let (want_dh, want_da) = split_columns(&want.d_hidden, n, h, r);
    let (_, want_db) = split_columns(&want.d_weight, v, h, r);

    let hid: Vec<T> = c.hidden.iter().map(|&x| T::from_f64(x)).collect();
    let wt: Vec<T> = c.weight.iter().map(|&x| T::from_f64(x)).collect();
    let bias: Option<Vec<T>> = c
        .bias
        .as_ref()
        .map(|b| b.iter().map(|&x| T::from_f64(x)).collect());
    let options = Options {
        ignore_index: c.ignore_index,
        label_smoothing: c.smoothing as f32,
        z_loss: c.z_loss as f32,
        epilogue: Epilogue {
            logits_bias: c.logits_bias.as_deref(),
            scale_multiply: c.multiply,
            scale_divide: c.divide,
            softcap: c.softcap,
            temperature: c.temperature,
        },
        chunk_budget_bytes: budget,
        parallel,
        ..Options::default()
    };
    // Garbage in every output: the kernel must overwrite all of it.
    let mut dh = vec![T::from_f64(7.0); n * h];
    let mut da = vec![7.0f32; n * r];
    let mut db = vec![7.0f32; v * r];
    let low = LowRank {
        a: MatRef::new(&p.a, n, r, r).expect("a"),
        b: MatRef::new(&p.b, v, r, r).expect("b"),
        d_a: Some(&mut da),
        d_b: Some(&mut db),
    };
    let grads = Grads {
        d_hidden: with_dh.then_some(&mut dh[..]),
        ..Grads::default()
    };
    let summary = fused_linear_cross_entropy_low_rank(
        MatRef::new(&hid, n, h, h).expect("hidden"),
        MatRef::new(&wt, v, h, h).expect("weight"),
        bias.as_deref(),
        low,
        &c.targets,
        &options,
        GradScale::Uniform(c.uniform_scale),
        RowOutputs::default(),
        grads,
    )
    .expect("kernel call");
    let what = |x: &str| format!("{x} ({:?}, budget {budget}, parallel {parallel})", T::DTYPE);
    assert_eq!(summary.count, want.count);
    let loss_scale = want.loss_sum.abs().max(1.0);
    assert!(
        (summary.loss_sum - want.loss_sum).abs() <= T::LOSS_TOL * loss_scale,
        "{}: {} vs {}",
        what("loss"),
        summary.loss_sum,
        want.loss_sum
    );
    let f = |x: &[f32]| x.iter().map(|&y| y as f64).collect::<Vec<_>>();
    // The factors' gradients are f32 sums of the f32 logits gradient, at f32's tolerance for every input dtype.
    let tol = T::GRAD_TOL.max(<f32 as TestElement>::GRAD_TOL);
    assert_close(&what("d_a"), &f(&da), &want_da, tol, 1e-3);
    assert_close(&what("d_b"), &f(&db), &want_db, tol, 1e-3);
    if with_dh {
        let got: Vec<f64> = dh.iter().map(|&x| x.to_f64()).collect();
        assert_close(&what("d_hidden"), &got, &want_dh, T::GRAD_TOL, 1e-3);
    }
}

#[test]
fn low_rank_term_against_the_concatenated_reference_on_every_path() {
    let best = isa::detected();
    let order = [
        Isa::Portable,
        Isa::Avx2,
        Isa::Avx512,
        Isa::Avx512Bf16,
        Isa::Amx,
    ];
    let rank_of = |i: Isa| order.iter().position(|&x| x == i);
    let paths: Vec<Isa> = order
        .into_iter()
        .filter(|&p| rank_of(p) <= rank_of(best))
        .collect();

    let mut rng = Rng::new(41);
    let mut full = problem(&mut rng, 29, 34, 157, 4, 0.3);
    full.case.bias = Some(rng.vec(157, 1.0));
    full.case.logits_bias = Some(rng.vec(157, 1.0).iter().map(|&x| x as f32).collect());
    full.case.multiply = Some(1.25);
    full.case.softcap = Some(3.0);
    full.case.smoothing = 0.1;
    full.case.z_loss = 1e-3;
    full.case.uniform_scale = 0.5;
    // Wider than one engine slice of the vocabulary (2048 columns), even hidden size (the bf16 engine's pairs).
    let wide = problem(&mut rng, 40, 64, 2100, 8, 0.5);
    for &p in &paths {
        isa::set_override(Some(p));
        for prob in [&full, &wide] {
            for (budget, parallel) in [(32 << 20, true), (3000, false), (3000, true)] {
                check::<f32>(prob, budget, parallel, true);
                check::<bf16>(prob, budget, parallel, true);
                check::<f16>(prob, budget, parallel, true);
            }
            // The factors alone need a gradient (a frozen input).
            check::<f32>(prob, 3000, true, false);
            check::<bf16>(prob, 32 << 20, true, false);
        }
    }
    isa::set_override(None);
}

#[test]
fn low_rank_term_is_refused_beside_a_weight_gradient_and_for_f64() {
    let (n, h, v, r) = (3, 4, 5, 2);
    let (a, b) = (vec![0.5f32; n * r], vec![0.25f32; v * r]);
    let targets = vec![0i64, 1, -100];
    let low = || LowRank {
        a: MatRef::new(&a, n, r, r).expect("a"),
        b: MatRef::new(&b, v, r, r).expect("b"),
        d_a: None,
        d_b: None,
    };
    let (x, w) = (vec![1.0f32; n * h], vec![1.0f32; v * h]);
    let mut dw = vec![0.0f32; v * h];
    let err = fused_linear_cross_entropy_low_rank(
        MatRef::new(&x, n, h, h).expect("hidden"),
        MatRef::new(&w, v, h, h).expect("weight"),
        None,
        low(),
        &targets,
        &Options::default(),
        GradScale::Uniform(1.0),
        RowOutputs::default(),
        Grads {
            d_weight: Some(&mut dw),
            ..Grads::default()
        },
    )
    .expect_err("a weight gradient beside the term");
    assert!(
        matches!(
            err,
            KernelError::InvalidOption {
                what: "low_rank",
                ..
            }
        ),
        "{err}"
    );

    let (x64, w64) = (vec![1.0f64; n * h], vec![1.0f64; v * h]);
    let err = fused_linear_cross_entropy_low_rank(
        MatRef::new(&x64, n, h, h).expect("hidden"),
        MatRef::new(&w64, v, h, h).expect("weight"),
        None,
        low(),
        &targets,
        &Options::default(),
        GradScale::Uniform(1.0),
        RowOutputs::default(),
        Grads::default(),
    )
    .expect_err("f64 inputs");
    assert!(
        matches!(
            err,
            KernelError::InvalidOption {
                what: "low_rank",
                ..
            }
        ),
        "{err}"
    );

    let short = LowRank {
        b: MatRef::new(&b[..(v - 1) * r], v - 1, r, r).expect("b"),
        ..low()
    };
    let err = fused_linear_cross_entropy_low_rank(
        MatRef::new(&x, n, h, h).expect("hidden"),
        MatRef::new(&w, v, h, h).expect("weight"),
        None,
        short,
        &targets,
        &Options::default(),
        GradScale::Uniform(1.0),
        RowOutputs::default(),
        Grads::default(),
    )
    .expect_err("b with a row short");
    assert!(
        matches!(
            err,
            KernelError::ShapeMismatch {
                what: "low_rank.b",
                ..
            }
        ),
        "{err}"
    );
}
