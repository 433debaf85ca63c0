//! The same reference checks on every instruction-set path this machine can run (portable always), so a
//! fallback that is never picked here still gets tested. One test: the override is process-wide.

mod common;

use common::{Case, Rng, Want, check, check_all};
use half::bf16;
use logitless_kernel::isa::{self, Isa};

#[test]
fn every_path_matches_the_reference() {
    let best = isa::detected();
    let mut paths = vec![Isa::Portable];
    for p in [Isa::Avx2, Isa::Avx512, Isa::Avx512Bf16, Isa::Amx] {
        let rank = |i: Isa| {
            [
                Isa::Portable,
                Isa::Avx2,
                Isa::Avx512,
                Isa::Avx512Bf16,
                Isa::Amx,
            ]
            .iter()
            .position(|&x| x == i)
        };
        if rank(p) <= rank(best) {
            paths.push(p);
        }
    }
    let mut rng = Rng::new(31);
    let mut full = Case::random(&mut rng, 29, 34, 157, 0.3);
    full.bias = Some(rng.vec(157, 1.0));
    full.logits_bias = Some(rng.vec(157, 1.0).iter().map(|&x| x as f32).collect());
    full.multiply = Some(1.25);
    full.softcap = Some(3.0);
    full.smoothing = 0.1;
    full.z_loss = 1e-3;
    let plain = Case::random(&mut rng, 45, 64, 300, 0.2);
    // H == 0: the logits are the bias alone (a zero-width row stride reached the f32 GEMM's aliasing check).
    let mut zero_width = Case::random(&mut rng, 9, 0, 23, 0.2);
    zero_width.bias = Some(rng.vec(23, 1.0));
    // Long enough for d_hidden to split over V as well as H on 3 threads (a partial sum per extra V piece).
    let split = Case::random(&mut rng, 37, 72, 2000, 0.2);
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(3)
        .build()
        .expect("pool");
    for &p in &paths {
        isa::set_override(Some(p));
        assert_eq!(isa::current(), p);
        common::check_bf16_weight_gradient_rounded_once(p);
        for case in [&full, &plain, &zero_width] {
            check_all(case, Want::default());
            check_all(
                case,
                Want {
                    parallel: false,
                    budget: 3000,
                    ..Want::default()
                },
            );
            check::<bf16>(
                case,
                Want {
                    pad_hidden: 2,
                    pad_weight: 4,
                    budget: 9000,
                    ..Want::default()
                },
            );
        }
        pool.install(|| {
            check_all(
                &split,
                Want {
                    budget: 1 << 30,
                    ..Want::default()
                },
            )
        });
    }
    isa::set_override(None);
    assert_eq!(isa::current(), best);
    // `make test` shows this line (--nocapture), so CI's log says which paths its CPU ran.
    println!("kernel ISA paths run: {paths:?} (detected {best:?})");
    for (path, flags) in cpu_claims() {
        assert!(
            paths.contains(&path),
            "/proc/cpuinfo lists {flags:?}, so the {path:?} path must run here, but detection gave {best:?}"
        );
    }
}

/// The levels that /proc/cpuinfo's flags (a second opinion, independent of `is_x86_feature_detected!`) say this
/// CPU has, with the flags behind each; empty where there is no /proc/cpuinfo.
fn cpu_claims() -> Vec<(Isa, &'static [&'static str])> {
    const LEVELS: [(Isa, &[&str]); 4] = [
        (Isa::Avx2, &["avx2", "fma"]),
        (
            Isa::Avx512,
            &["avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512dq"],
        ),
        (
            Isa::Avx512Bf16,
            &[
                "avx2",
                "fma",
                "avx512f",
                "avx512bw",
                "avx512vl",
                "avx512dq",
                "avx512_bf16",
            ],
        ),
        // Linux lists the AMX flags only when it supports the tile state, which it then grants on request.
        (
            Isa::Amx,
            &[
                "avx2",
                "fma",
                "avx512f",
                "avx512bw",
                "avx512vl",
                "avx512dq",
                "avx512_bf16",
                "amx_bf16",
                "amx_tile",
            ],
        ),
    ];
    let Ok(info) = std::fs::read_to_string("/proc/cpuinfo") else {
        return Vec::new();
    };
    let Some(line) = info.lines().find(|l| l.starts_with("flags")) else {
        return Vec::new();
    };
    let flags: Vec<&str> = line.split_whitespace().collect();
    if !cfg!(target_arch = "x86_64") {
        return Vec::new();
    }
    LEVELS
        .into_iter()
        .filter(|(_, need)| need.iter().all(|f| flags.contains(f)))
        .collect()
}
