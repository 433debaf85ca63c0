//! The AMX engine's block edges against the reference: rows, vocabulary and hidden sizes on both sides of its
//! 32-wide blocks and of d_hidden's 256-row vocabulary blocks, one chunk and many, both weight-gradient modes.
//! Runs where the CPU grants AMX (says so otherwise). One test: the ISA override is process-wide.

mod common;

use common::{Case, Rng, Want, check};
use half::bf16;
use logitless_kernel::isa::{self, Isa};

#[test]
fn amx_blocks_match_the_reference() {
    if isa::detected() != Isa::Amx {
        println!(
            "AMX not granted on this CPU ({:?}): the tile engine is not run",
            isa::detected()
        );
        return;
    }
    isa::set_override(Some(Isa::Amx));
    let mut rng = Rng::new(7);
    // (rows, hidden, vocabulary): 1 and 31/33 around a block, 64 exactly two, hidden sizes off the 32-wide k-step
    // (2, 30, 130), vocabularies past one d_hidden block of 256 (300, 513) and under one tile (1, 5).
    let shapes = [
        (1, 32, 1),
        (31, 2, 5),
        (33, 30, 31),
        (64, 64, 64),
        (65, 96, 33),
        (70, 130, 300),
        (40, 32, 513),
        (96, 34, 257),
    ];
    for (n, h, v) in shapes {
        let mut case = Case::random(&mut rng, n, h, v, 0.25);
        case.bias = Some(rng.vec(v, 1.0));
        case.softcap = Some(5.0);
        for (parallel, budget) in [(true, 32 << 20), (false, 32 << 20), (true, 6000)] {
            // check() runs both weight-gradient modes; a small budget splits the rows into several chunks.
            let want = Want {
                parallel,
                budget,
                ..Want::default()
            };
            check::<bf16>(&case, want);
            check::<bf16>(
                &case,
                Want {
                    pad_hidden: 2,
                    pad_weight: 4,
                    ..want
                },
            );
        }
    }
    isa::set_override(None);
}
