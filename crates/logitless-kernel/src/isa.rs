//! Which instruction set the kernel's own SIMD loops use, chosen at run time (never `target-cpu=native`: a wheel
//! built here must run on any x86-64 or aarch64 machine).

use std::sync::atomic::{AtomicU8, Ordering};

/// An instruction-set level for the kernel's own loops (the GEMM engine dispatches on its own).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    /// Plain Rust, whatever the compile target's baseline gives (SSE2 on x86-64, NEON on aarch64).
    Portable,
    /// x86-64 AVX2 + FMA.
    Avx2,
    /// x86-64 AVX-512 F/BW/VL/DQ.
    Avx512,
    /// AVX-512 plus AVX512_BF16 (`vdpbf16ps`): the bf16 GEMMs run natively on bf16.
    Avx512Bf16,
}

const UNSET: u8 = 0;
static OVERRIDE: AtomicU8 = AtomicU8::new(UNSET);

fn encode(isa: Isa) -> u8 {
    match isa {
        Isa::Portable => 1,
        Isa::Avx2 => 2,
        Isa::Avx512 => 3,
        Isa::Avx512Bf16 => 4,
    }
}

fn decode(v: u8) -> Option<Isa> {
    match v {
        1 => Some(Isa::Portable),
        2 => Some(Isa::Avx2),
        3 => Some(Isa::Avx512),
        4 => Some(Isa::Avx512Bf16),
        _ => None,
    }
}

/// The best level this machine supports.
pub fn detected() -> Isa {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512vl")
            && std::arch::is_x86_feature_detected!("avx512dq")
        {
            if std::arch::is_x86_feature_detected!("avx512bf16") {
                return Isa::Avx512Bf16;
            }
            return Isa::Avx512;
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            return Isa::Avx2;
        }
    }
    Isa::Portable
}

/// Caps the level used by later calls (tests run every path on one machine; `None` restores detection). A level
/// above what the machine supports is lowered to the detected one. Process-wide.
pub fn set_override(isa: Option<Isa>) {
    OVERRIDE.store(isa.map_or(UNSET, encode), Ordering::Relaxed);
}

/// The level to use now: the detected one, capped by [`set_override`] or the `LOGITLESS_KERNEL_ISA` environment
/// variable (`portable`, `avx2`, `avx512`, `avx512bf16`; read on each call, it is cheap next to a kernel call).
pub fn current() -> Isa {
    let best = detected();
    let wanted = decode(OVERRIDE.load(Ordering::Relaxed)).or_else(|| {
        std::env::var("LOGITLESS_KERNEL_ISA").ok().and_then(|v| {
            match v.to_ascii_lowercase().as_str() {
                "portable" => Some(Isa::Portable),
                "avx2" => Some(Isa::Avx2),
                "avx512" => Some(Isa::Avx512),
                "avx512bf16" => Some(Isa::Avx512Bf16),
                _ => None,
            }
        })
    });
    match wanted {
        Some(w) if encode(w) < encode(best) => w,
        _ => best,
    }
}
