//! The kernel against the naive float64 reference in `common`, over shapes, options and dtypes.

mod common;

use common::{Case, Rng, Want, check, check_all};
use half::{bf16, f16};

#[test]
fn shapes_all_dtypes() {
    let mut rng = Rng::new(1);
    // V not a multiple of any tile (1, 5, 17, 101, 1000), N = 1, H odd, H = 1.
    for &(n, h, v) in &[
        (1, 1, 1),
        (1, 7, 5),
        (3, 5, 17),
        (2, 1, 3),
        (17, 33, 101),
        (40, 48, 257),
        (5, 3, 1000),
    ] {
        let case = Case::random(&mut rng, n, h, v, 0.25);
        check_all(&case, Want::default());
        check_all(
            &case,
            Want {
                parallel: false,
                ..Want::default()
            },
        );
    }
}

#[test]
fn bias_and_uniform_scale() {
    let mut rng = Rng::new(2);
    let mut case = Case::random(&mut rng, 9, 16, 70, 0.2);
    case.bias = Some(rng.vec(70, 2.0));
    case.uniform_scale = 1.0 / 7.0;
    check_all(&case, Want::default());
}

#[test]
fn each_epilogue_step_alone() {
    let mut rng = Rng::new(3);
    let base = Case::random(&mut rng, 11, 12, 53, 0.2);
    let lb: Vec<f32> = rng.vec(53, 3.0).iter().map(|&x| x as f32).collect();
    let variants: Vec<Case> = vec![
        Case {
            logits_bias: Some(lb.clone()),
            ..base.clone()
        },
        Case {
            multiply: Some(2.5),
            ..base.clone()
        },
        Case {
            divide: Some(0.3),
            ..base.clone()
        },
        Case {
            softcap: Some(1.5),
            ..base.clone()
        },
        // Zero means "not set" (spec 1.2: each step only when set and non-zero).
        Case {
            multiply: Some(0.0),
            divide: Some(0.0),
            softcap: Some(0.0),
            ..base.clone()
        },
        Case {
            smoothing: 0.3,
            ..base.clone()
        },
        Case {
            z_loss: 1e-2,
            ..base.clone()
        },
        // A sampling temperature, with and without a softcap before it (without one it joins the scale).
        Case {
            temperature: Some(0.7),
            ..base.clone()
        },
        Case {
            softcap: Some(1.5),
            temperature: Some(2.5),
            ..base.clone()
        },
    ];
    for case in &variants {
        check_all(case, Want::default());
    }
}

#[test]
fn everything_together() {
    let mut rng = Rng::new(4);
    let mut case = Case::random(&mut rng, 23, 19, 131, 0.3);
    case.bias = Some(rng.vec(131, 1.0));
    case.logits_bias = Some(rng.vec(131, 1.0).iter().map(|&x| x as f32).collect());
    case.multiply = Some(3.0);
    case.divide = Some(1.7);
    case.softcap = Some(2.0);
    case.temperature = Some(0.6);
    case.smoothing = 0.1;
    case.z_loss = 1e-3;
    case.row_scale = Some(rng.vec(23, 2.0).iter().map(|&x| x as f32).collect());
    check_all(&case, Want::default());
    check_all(
        &case,
        Want {
            parallel: false,
            budget: 1,
            ..Want::default()
        },
    );
}

#[test]
fn token_stats_on_peaked_flat_and_tied_rows() {
    // Rows built to stress the statistics: one logit far above the rest (entropy ~ 0, log Σp² ~ 0), all equal
    // (entropy = log V, log Σp² = -log V, the argmax is column 0), and a tie for the max at the target and an
    // earlier column (ties go to the lowest index, so the target is not the top-1).
    let (n, h, v) = (3, 2, 40);
    let mut hidden = vec![0.0; n * h];
    let mut weight = vec![0.0; v * h];
    hidden[0] = 1.0; // row 0: z = w[:, 0]
    weight[7 * h] = 30.0;
    hidden[2 * h + 1] = 1.0; // row 2: z = w[:, 1]
    weight[3 * h + 1] = 2.0;
    weight[9 * h + 1] = 2.0;
    let case = Case {
        n,
        h,
        v,
        hidden,
        weight,
        targets: vec![7, 0, 9],
        ..Case::random(&mut Rng::new(5), n, h, v, 0.0)
    };
    check_all(&case, Want::default());
    let want = common::reference(&case);
    assert!(
        want.stats[0] < 1e-8 && want.stats[3] == 1.0,
        "{:?}",
        &want.stats[..4]
    );
    assert!((want.stats[4] - (v as f64).ln()).abs() < 1e-12 && want.stats[7] == 1.0);
    assert_eq!(want.stats[11], 0.0, "a tie goes to the lower index");
    // check_all tolerates a flipped argmax where the gap is within rounding, so the tie is asserted exactly here.
    for parallel in [true, false] {
        let want_stats = Want {
            parallel,
            ..Want::default()
        };
        let got = common::run::<f32>(&case, want_stats);
        let stats = got.stats.expect("stats");
        assert_eq!(
            (stats[3], stats[7], stats[11]),
            (1.0, 1.0, 0.0),
            "{stats:?}"
        );
        let got = common::run::<bf16>(&case.clone().rounded::<bf16>(), want_stats);
        assert_eq!(got.stats.expect("stats")[11], 0.0);
    }
}

#[test]
fn all_targets_ignored() {
    let mut rng = Rng::new(5);
    let mut case = Case::random(&mut rng, 6, 8, 30, 0.0);
    case.targets = vec![-100; 6];
    check_all(&case, Want::default());
    let got = common::run::<f32>(&case, Want::default());
    assert_eq!(got.summary.loss_sum, 0.0);
    assert_eq!(got.summary.count, 0);
    for g in [got.d_hidden, got.d_weight, got.d_bias, got.per_row]
        .into_iter()
        .flatten()
    {
        assert!(g.iter().all(|&x| x == 0.0));
    }
}

#[test]
fn custom_ignore_index_and_negative_targets_ignored() {
    let mut rng = Rng::new(6);
    let mut case = Case::random(&mut rng, 8, 8, 20, 0.0);
    case.ignore_index = 3;
    case.targets[2] = 3;
    case.targets[5] = 3;
    check_all(&case, Want::default());
}

#[test]
fn huge_logits_do_not_overflow() {
    let mut rng = Rng::new(7);
    let mut case = Case::random(&mut rng, 7, 16, 90, 0.0);
    case.hidden.iter_mut().for_each(|x| *x *= 1e4);
    let got = common::run::<f32>(&case, Want::default());
    assert!(got.summary.loss_sum.is_finite());
    for g in [&got.d_hidden, &got.d_weight, &got.d_bias]
        .into_iter()
        .flatten()
    {
        assert!(g.iter().all(|x| x.is_finite()));
    }
    check::<f64>(&case, Want::default());
    check::<f32>(&case, Want::default());
    check::<bf16>(&case, Want::default());
    // With softcap the logits saturate at ±30 and the gradient is a sliver of 1 - tanh² that f32 cannot resolve
    // relative to itself; f64 must still match tightly, f32 to 1e-3 of the unsaturated gradient size.
    let capped = Case {
        softcap: Some(30.0),
        ..case
    };
    check::<f64>(&capped, Want::default());
    let got = common::run::<f32>(&capped, Want::default());
    let want = common::reference(&capped.clone().rounded::<f32>());
    common::assert_close(
        "capped d_hidden",
        &got.d_hidden.unwrap_or_default(),
        &want.d_hidden,
        1e-3,
        1.0,
    );
    common::assert_close(
        "capped per_row",
        &got.per_row.unwrap_or_default(),
        &want.per_row,
        1e-5,
        100.0,
    );
}

#[test]
fn frozen_weight_and_every_grad_subset() {
    let mut rng = Rng::new(8);
    let mut case = Case::random(&mut rng, 10, 9, 41, 0.3);
    case.bias = Some(rng.vec(41, 1.0));
    for mask in 0..16u32 {
        let w = Want {
            d_hidden: mask & 1 != 0,
            d_weight: mask & 2 != 0,
            d_bias: mask & 4 != 0,
            per_row: mask & 8 != 0,
            ..Want::default()
        };
        check::<f32>(&case, w);
        check::<bf16>(&case, w);
        check::<f64>(&case, w);
    }
}

#[test]
fn strided_inputs() {
    let mut rng = Rng::new(9);
    let case = Case::random(&mut rng, 13, 10, 37, 0.2);
    for (ph, pw) in [(3, 0), (0, 5), (7, 11)] {
        let w = Want {
            pad_hidden: ph,
            pad_weight: pw,
            ..Want::default()
        };
        check_all(&case, w);
        check_all(
            &case,
            Want {
                parallel: false,
                ..w
            },
        );
    }
}

#[test]
fn small_budgets_force_many_blocks_and_chunks() {
    let mut rng = Rng::new(10);
    let mut case = Case::random(&mut rng, 37, 24, 203, 0.3);
    case.bias = Some(rng.vec(203, 1.0));
    case.softcap = Some(4.0);
    case.smoothing = 0.05;
    // 1 byte: one row per block, one W row per converted chunk; the others land in between.
    for budget in [1, 4 * 203 * 3, 20_000, 100_000] {
        check_all(
            &case,
            Want {
                budget,
                ..Want::default()
            },
        );
        check_all(
            &case,
            Want {
                budget,
                parallel: false,
                ..Want::default()
            },
        );
    }
}

#[test]
fn larger_shape_crossing_gemm_tiles() {
    let mut rng = Rng::new(11);
    let mut case = Case::random(&mut rng, 70, 130, 515, 0.3);
    case.hidden.iter_mut().for_each(|x| *x *= 0.3);
    check::<f32>(&case, Want::default());
    check::<bf16>(&case, Want::default());
    check::<f16>(
        &case,
        Want {
            budget: 200_000,
            ..Want::default()
        },
    );
    check::<f64>(
        &case,
        Want {
            budget: 200_000,
            ..Want::default()
        },
    );
}

#[test]
fn bf16_blocks_rounded_to_32_rows_and_partial_tiles() {
    // About 40 rows fit this budget on the AVX512_BF16 path (rounded down to 32): blocks of 32, 32, 32 and 4,
    // partial micro-tiles in every GEMM; the same budget exercises other splits on the other paths.
    let mut rng = Rng::new(12);
    let mut case = Case::random(&mut rng, 100, 64, 300, 0.0);
    case.hidden.iter_mut().for_each(|x| *x *= 0.5);
    case.bias = Some(rng.vec(300, 1.0));
    for budget in [127_728, 60_000] {
        check::<bf16>(
            &case,
            Want {
                budget,
                ..Want::default()
            },
        );
        check::<bf16>(
            &case,
            Want {
                budget,
                parallel: false,
                pad_hidden: 2,
                pad_weight: 6,
                ..Want::default()
            },
        );
    }
}

#[test]
fn single_row_views_may_have_short_strides() {
    // MatRef accepts row_stride < cols when there is one row; V = 1 gives lse = z_0, so the loss is exactly
    // ε·0 + (1-ε)·0 = 0 without z_loss, and every gradient is 0.
    use logitless_kernel::{
        GradScale, Grads, MatRef, Options, RowOutputs, fused_linear_cross_entropy,
    };
    let x = [bf16::from_f32(0.5); 8];
    let w = [bf16::from_f32(0.25); 4];
    let mut dh = [bf16::from_f32(9.0); 8];
    let mut dw = [bf16::from_f32(9.0); 4];
    let s = fused_linear_cross_entropy(
        MatRef::new(&x, 2, 4, 4).expect("hidden"),
        MatRef::new(&w, 1, 4, 0).expect("weight"),
        None,
        &[0, 0],
        &Options {
            label_smoothing: 0.3,
            ..Options::default()
        },
        GradScale::Uniform(1.0),
        RowOutputs::default(),
        Grads {
            d_hidden: Some(&mut dh),
            d_weight: Some(&mut dw),
            d_bias: None,
        },
    )
    .expect("kernel");
    assert_eq!(s.count, 2);
    assert!(s.loss_sum.abs() < 1e-6, "{}", s.loss_sum);
    assert!(dh.iter().chain(dw.iter()).all(|g| g.to_f32().abs() < 1e-6));
}

#[test]
fn bf16_weight_gradient_is_rounded_once_to_nearest() {
    // At this machine's best path; tests/isa_paths.rs runs the same check on every path.
    common::check_bf16_weight_gradient_rounded_once(logitless_kernel::isa::current());
}

#[test]
fn d_hidden_split_over_the_vocabulary_and_the_columns() {
    // Our engines split d_hidden over V (a partial sum per piece) and over H by thread count. f32: 3 threads take
    // 3 vocabulary pieces of 768 (the last 464: not a multiple of the 128-row k block) at H = 72 (two full
    // 32-column panels and a partial one); 4 threads at H = 200 take 2 × 2 pieces. bf16/f16 on AMX (512-row k
    // blocks): 2 pieces of V (1024 and 976) times 2 of H in both. 37 rows: a partial row tile. isa_paths runs it on
    // the other levels.
    let mut rng = Rng::new(21);
    for (threads, h) in [(3, 72), (4, 200), (2, 72)] {
        let case = Case::random(&mut rng, 37, h, 2000, 0.2);
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .expect("pool");
        pool.install(|| {
            check_all(
                &case,
                Want {
                    budget: 1 << 30,
                    ..Want::default()
                },
            )
        });
    }
}

#[test]
fn long_blocks_of_a_wide_f32_head_match_the_reference() {
    // f32 blocks of rows × H >= 2^18 run on the gemm crate's GEMMs instead of the FMA engine (fused::FMA32_MAX_BLOCK):
    // 300 × 900 in one block, and the same rows in short blocks (the FMA engine), both against float64.
    let mut rng = Rng::new(23);
    let case = Case::random(&mut rng, 300, 900, 211, 0.2);
    for budget in [1 << 30, 300_000] {
        common::check::<f32>(
            &case,
            Want {
                budget,
                ..Want::default()
            },
        );
    }
}

#[test]
fn a_confident_rows_gradient_keeps_every_entry_above_2_pow_minus_96() {
    // One row whose logits are exactly [0, -30, -60, -75, -85] (H = 1, hidden 1), its loss scaled by 1e-8: the
    // weight gradient is 1e-8 times each probability (minus the one-hot), 9.4e-22 down to 1.2e-45, the last two
    // denormal in f32. Entries below 2^-96 are written as 0 so that the GEMMs never run on denormals
    // (rowpass::write_gradient); every entry above it keeps its value to f32 rounding, and f64 keeps them all
    // (its threshold is 2^-960).
    let mut rng = Rng::new(22);
    let mut case = Case::random(&mut rng, 1, 1, 5, 0.0);
    case.hidden = vec![1.0];
    case.weight = vec![0.0, -30.0, -60.0, -75.0, -85.0];
    case.targets = vec![0];
    case.uniform_scale = 1e-8;
    let want = common::reference(&case);
    for parallel in [true, false] {
        let w = Want {
            parallel,
            ..Want::default()
        };
        let got32 = common::run::<f32>(&case, w).d_weight.expect("d_weight");
        let got64 = common::run::<f64>(&case, w).d_weight.expect("d_weight");
        for v in 1..5 {
            let exact = want.d_weight[v];
            assert!(exact > 0.0, "token {v}: {exact}");
            let rel64 = (got64[v] - exact).abs() / exact;
            assert!(rel64 < 1e-12, "f64 token {v}: {} vs {exact}", got64[v]);
            if exact > 2f64.powi(-96) {
                let rel32 = (got32[v] - exact).abs() / exact;
                assert!(rel32 < 1e-5, "f32 token {v}: {} vs {exact}", got32[v]);
            } else {
                assert_eq!(got32[v], 0.0, "f32 token {v}: {exact} is below 2^-96");
            }
        }
    }
}
