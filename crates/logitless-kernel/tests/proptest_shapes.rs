//! Random shapes and options against the reference.

mod common;

use common::{Case, Rng, Want, check};
use half::bf16;
use proptest::prelude::*;

fn case_strategy() -> impl Strategy<Value = (Case, Want)> {
    (
        1usize..12,
        1usize..20,
        1usize..80,
        any::<u64>(),
        0.0f64..0.6,
        prop::option::of(0.5f32..8.0),
        prop::option::of(0.2f32..3.0),
        prop::option::of(0.0f64..0.5),
        any::<bool>(),
        (
            any::<bool>(),
            0usize..3,
            0usize..3,
            prop::sample::select(vec![1usize, 500, 5000, 1 << 20]),
        ),
    )
        .prop_map(
            |(
                n,
                h,
                v,
                seed,
                ignored,
                softcap,
                multiply,
                smoothing,
                bias,
                (parallel, ph, pw, budget),
            )| {
                let mut rng = Rng::new(seed);
                let mut case = Case::random(&mut rng, n, h, v, ignored);
                case.softcap = softcap;
                case.multiply = multiply;
                case.smoothing = smoothing.unwrap_or(0.0);
                case.z_loss = if seed % 3 == 0 { 1e-2 } else { 0.0 };
                if bias {
                    case.bias = Some(rng.vec(v, 1.0));
                }
                if seed % 2 == 0 {
                    case.row_scale = Some(rng.vec(n, 1.0).iter().map(|&x| x as f32).collect());
                }
                let want = Want {
                    parallel,
                    pad_hidden: ph,
                    pad_weight: pw,
                    budget,
                    ..Want::default()
                };
                (case, want)
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn matches_reference((case, want) in case_strategy()) {
        check::<f64>(&case, want);
        check::<f32>(&case, want);
        check::<bf16>(&case, want);
    }
}
