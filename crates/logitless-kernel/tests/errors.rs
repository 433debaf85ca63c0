//! Bad input is reported as a value, before any work, never as a panic.

use half::bf16;
use logitless_kernel::{
    Epilogue, GradScale, Grads, KernelError, MatRef, Options, RowOutputs,
    fused_linear_cross_entropy,
};

fn call(
    n: usize,
    h: usize,
    v: usize,
    targets: &[i64],
    options: &Options<'_>,
    d_hidden_len: usize,
) -> Result<(), KernelError> {
    let x = vec![1.0f32; n * h];
    let w = vec![1.0f32; v * h];
    let mut dh = vec![5.0f32; d_hidden_len];
    let r = fused_linear_cross_entropy(
        MatRef::new(&x, n, h, h)?,
        MatRef::new(&w, v, h, h)?,
        None,
        targets,
        options,
        GradScale::Uniform(1.0),
        RowOutputs::default(),
        Grads {
            d_hidden: Some(&mut dh),
            ..Grads::default()
        },
    );
    // Nothing is written when the call is refused.
    if r.is_err() {
        assert!(dh.iter().all(|&g| g == 5.0));
    }
    r.map(|_| ())
}

#[test]
fn target_out_of_range_names_row_and_value() {
    let o = Options::default();
    let e = call(4, 3, 10, &[1, -100, 10, 3], &o, 12).expect_err("must be refused");
    assert_eq!(
        e,
        KernelError::TargetOutOfRange {
            row: 2,
            value: 10,
            vocab: 10,
            ignore_index: -100
        }
    );
    assert!(e.to_string().contains("target 10 at row 2"), "{e}");
    let e = call(3, 3, 10, &[0, -1, -7], &o, 9).expect_err("must be refused");
    assert_eq!(
        e,
        KernelError::TargetOutOfRange {
            row: 1,
            value: -1,
            vocab: 10,
            ignore_index: -100
        }
    );
    // -100 is fine by default but not when another ignore_index is chosen.
    let o = Options {
        ignore_index: -1,
        ..Options::default()
    };
    let e = call(2, 3, 10, &[-1, -100], &o, 6).expect_err("must be refused");
    assert_eq!(
        e,
        KernelError::TargetOutOfRange {
            row: 1,
            value: -100,
            vocab: 10,
            ignore_index: -1
        }
    );
    assert!(call(2, 3, 10, &[-1, 9], &o, 6).is_ok());
}

#[test]
fn shape_mismatches() {
    let o = Options::default();
    assert!(matches!(
        call(4, 3, 10, &[1, 2, 3], &o, 12),
        Err(KernelError::ShapeMismatch {
            what: "targets",
            ..
        })
    ));
    assert!(matches!(
        call(2, 3, 10, &[1, 2], &o, 5),
        Err(KernelError::ShapeMismatch {
            what: "d_hidden",
            ..
        })
    ));

    let x = vec![1.0f32; 6];
    let w = vec![1.0f32; 40];
    let hidden = MatRef::new(&x, 2, 3, 3).expect("view");
    let weight = MatRef::new(&w, 10, 4, 4).expect("view");
    let r = fused_linear_cross_entropy(
        hidden,
        weight,
        None,
        &[0, 1],
        &o,
        GradScale::Uniform(1.0),
        RowOutputs::default(),
        Grads::<f32>::default(),
    );
    assert!(
        matches!(r, Err(KernelError::ShapeMismatch { what: "weight", .. })),
        "{r:?}"
    );

    let weight = MatRef::new(&w[..30], 10, 3, 3).expect("view");
    let bias = vec![0.0f32; 9];
    let lb = vec![0.0f32; 11];
    let mut loss = vec![0.0f64; 3];
    let mut stats = vec![0.0f64; 7];
    let mut dw = vec![0.0f32; 29];
    let mut db = vec![0.0f32; 11];
    let cases: Vec<(&str, Result<_, _>)> = vec![
        (
            "bias",
            fused_linear_cross_entropy(
                hidden,
                weight,
                Some(&bias),
                &[0, 1],
                &o,
                GradScale::Uniform(1.0),
                RowOutputs::default(),
                Grads::default(),
            ),
        ),
        (
            "logits_bias",
            fused_linear_cross_entropy(
                hidden,
                weight,
                None,
                &[0, 1],
                &Options {
                    epilogue: Epilogue {
                        logits_bias: Some(&lb),
                        ..Epilogue::default()
                    },
                    ..o
                },
                GradScale::Uniform(1.0),
                RowOutputs::default(),
                Grads::default(),
            ),
        ),
        (
            "grad_scale (per row)",
            fused_linear_cross_entropy(
                hidden,
                weight,
                None,
                &[0, 1],
                &o,
                GradScale::PerRow(&[1.0]),
                RowOutputs::default(),
                Grads::default(),
            ),
        ),
        (
            "per_row_loss",
            fused_linear_cross_entropy(
                hidden,
                weight,
                None,
                &[0, 1],
                &o,
                GradScale::Uniform(1.0),
                RowOutputs {
                    loss: Some(&mut loss),
                    ..RowOutputs::default()
                },
                Grads::default(),
            ),
        ),
        (
            "token_stats",
            fused_linear_cross_entropy(
                hidden,
                weight,
                None,
                &[0, 1],
                &o,
                GradScale::Uniform(1.0),
                RowOutputs {
                    stats: Some(&mut stats),
                    ..RowOutputs::default()
                },
                Grads::default(),
            ),
        ),
        (
            "d_weight",
            fused_linear_cross_entropy(
                hidden,
                weight,
                None,
                &[0, 1],
                &o,
                GradScale::Uniform(1.0),
                RowOutputs::default(),
                Grads {
                    d_weight: Some(&mut dw),
                    ..Grads::default()
                },
            ),
        ),
        (
            "d_bias",
            fused_linear_cross_entropy(
                hidden,
                weight,
                None,
                &[0, 1],
                &o,
                GradScale::Uniform(1.0),
                RowOutputs::default(),
                Grads {
                    d_bias: Some(&mut db),
                    ..Grads::default()
                },
            ),
        ),
    ];
    for (what, r) in cases {
        match r {
            Err(KernelError::ShapeMismatch { what: w, .. }) => assert_eq!(w, what),
            other => panic!("{what}: {other:?}"),
        }
    }
}

#[test]
fn view_extent_overflow_is_buffer_too_small() {
    // (rows - 1) * row_stride wraps in release builds without checked arithmetic, and the view would then pass.
    let data = vec![0.0f32; 16];
    // The product overflows, or only the final `+ cols` does.
    for (rows, stride) in [
        (3, usize::MAX / 2 + 1),
        (3, usize::MAX),
        (2, usize::MAX - 2),
    ] {
        match MatRef::new(&data, rows, 4, stride) {
            Err(KernelError::BufferTooSmall { needed, got, .. }) => {
                assert_eq!((needed, got), (usize::MAX, 16), "stride {stride}");
            }
            other => panic!("stride {stride}: expected BufferTooSmall, got {other:?}"),
        }
    }
    assert!(MatRef::new(&data, 4, 4, 4).is_ok());
}

#[test]
fn bad_views() {
    let x = vec![bf16::ZERO; 10];
    assert!(matches!(
        MatRef::new(&x, 3, 4, 3),
        Err(KernelError::InvalidStride {
            row_stride: 3,
            cols: 4,
            ..
        })
    ));
    assert!(matches!(
        MatRef::new(&x, 3, 4, 4),
        Err(KernelError::BufferTooSmall {
            needed: 12,
            got: 10,
            ..
        })
    ));
    // Strided: the last row needs only `cols` elements.
    assert!(MatRef::new(&x, 2, 4, 6).is_ok());
    assert!(MatRef::new(&x, 0, 4, 4).is_ok());
}

#[test]
fn invalid_options() {
    let bad = [
        Options {
            label_smoothing: 1.5,
            ..Options::default()
        },
        Options {
            label_smoothing: -0.1,
            ..Options::default()
        },
        Options {
            label_smoothing: f32::NAN,
            ..Options::default()
        },
        Options {
            z_loss: f32::INFINITY,
            ..Options::default()
        },
        Options {
            epilogue: Epilogue {
                softcap: Some(f32::NAN),
                ..Epilogue::default()
            },
            ..Options::default()
        },
        Options {
            epilogue: Epilogue {
                scale_divide: Some(f32::INFINITY),
                ..Epilogue::default()
            },
            ..Options::default()
        },
        Options {
            epilogue: Epilogue {
                temperature: Some(-1.0),
                ..Epilogue::default()
            },
            ..Options::default()
        },
        Options {
            epilogue: Epilogue {
                temperature: Some(f32::NAN),
                ..Epilogue::default()
            },
            ..Options::default()
        },
    ];
    for o in &bad {
        assert!(
            matches!(
                call(2, 3, 5, &[0, 1], o, 6),
                Err(KernelError::InvalidOption { .. })
            ),
            "{o:?}"
        );
    }
    let x = vec![1.0f32; 6];
    let w = vec![1.0f32; 15];
    let r = fused_linear_cross_entropy(
        MatRef::new(&x, 2, 3, 3).expect("view"),
        MatRef::new(&w, 5, 3, 3).expect("view"),
        None,
        &[0, 1],
        &Options::default(),
        GradScale::Uniform(f64::NAN),
        RowOutputs::default(),
        Grads::<f32>::default(),
    );
    assert!(matches!(
        r,
        Err(KernelError::InvalidOption {
            what: "grad_scale",
            ..
        })
    ));
}

#[test]
fn empty_inputs() {
    // N = 0 and V = 0 with nothing to score are valid and give an empty sum.
    let o = Options::default();
    assert!(call(0, 3, 5, &[], &o, 0).is_ok());
    assert!(call(2, 3, 0, &[-100, -100], &o, 6).is_ok());
    assert!(matches!(
        call(1, 3, 0, &[0], &o, 3),
        Err(KernelError::TargetOutOfRange { .. })
    ));
}
