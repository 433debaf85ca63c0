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

/// A level this CPU supports: only [`level`] creates one, after detection, so holding one is the proof that the
/// SIMD code of its level (and of every level below it) may run. The `target_feature` entry points of the crate
/// take the tokens it hands out rather than trusting an unwritten invariant.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Level(Isa);

/// Proof that the CPU has AVX-512 F/BW/VL/DQ (and AVX2 + FMA).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Avx512Token(());

/// Proof that the CPU has AVX512_BF16 on top of [`Avx512Token`]'s features.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Bf16Token(());

/// Proof that the CPU has AVX2 + FMA.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Avx2Token(());

impl Level {
    pub fn isa(self) -> Isa {
        self.0
    }
    pub(crate) fn avx512(self) -> Option<Avx512Token> {
        matches!(self.0, Isa::Avx512 | Isa::Avx512Bf16).then_some(Avx512Token(()))
    }
    pub(crate) fn bf16(self) -> Option<Bf16Token> {
        (self.0 == Isa::Avx512Bf16).then_some(Bf16Token(()))
    }
    pub(crate) fn avx2(self) -> Option<Avx2Token> {
        matches!(self.0, Isa::Avx2 | Isa::Avx512 | Isa::Avx512Bf16).then_some(Avx2Token(()))
    }
}

/// The level to use now ([`current`]), as a token the SIMD entry points accept.
pub fn level() -> Level {
    Level(current())
}

/// The best level this machine supports.
pub fn detected() -> Isa {
    #[cfg(target_arch = "x86_64")]
    {
        let avx2 = std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma");
        // The AVX-512 paths also enable avx2/fma (every AVX-512 CPU has them; checked all the same).
        if avx2
            && std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512vl")
            && std::arch::is_x86_feature_detected!("avx512dq")
        {
            if std::arch::is_x86_feature_detected!("avx512bf16") {
                return Isa::Avx512Bf16;
            }
            return Isa::Avx512;
        }
        if avx2 {
            return Isa::Avx2;
        }
    }
    Isa::Portable
}

impl Isa {
    /// Parses `portable`, `avx2`, `avx512` or `avx512bf16` (any case).
    pub fn parse(name: &str) -> Option<Self> {
        match name.to_ascii_lowercase().as_str() {
            "portable" => Some(Isa::Portable),
            "avx2" => Some(Isa::Avx2),
            "avx512" => Some(Isa::Avx512),
            "avx512bf16" => Some(Isa::Avx512Bf16),
            _ => None,
        }
    }
}

/// Caps the level used by later calls (tests run every path on one machine; `None` restores detection). A level
/// above what the machine supports is lowered to the detected one. Process-wide.
pub fn set_override(isa: Option<Isa>) {
    OVERRIDE.store(isa.map_or(UNSET, encode), Ordering::Relaxed);
}

/// The level to use now: the detected one, capped by [`set_override`] (the Python package sets it from
/// `LOGITLESS_KERNEL_ISA`; this crate reads no environment).
pub fn current() -> Isa {
    let best = detected();
    let wanted = decode(OVERRIDE.load(Ordering::Relaxed));
    match wanted {
        Some(w) if encode(w) < encode(best) => w,
        _ => best,
    }
}
