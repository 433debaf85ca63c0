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
    /// AVX512_BF16 plus AMX-BF16 tiles (`tdpbf16ps`, Sapphire Rapids and later), granted to this process by the
    /// OS: the bf16 GEMMs run on the tile unit.
    Amx,
}

const UNSET: u8 = 0;
static OVERRIDE: AtomicU8 = AtomicU8::new(UNSET);

fn encode(isa: Isa) -> u8 {
    match isa {
        Isa::Portable => 1,
        Isa::Avx2 => 2,
        Isa::Avx512 => 3,
        Isa::Avx512Bf16 => 4,
        Isa::Amx => 5,
    }
}

fn decode(v: u8) -> Option<Isa> {
    match v {
        1 => Some(Isa::Portable),
        2 => Some(Isa::Avx2),
        3 => Some(Isa::Avx512),
        4 => Some(Isa::Avx512Bf16),
        5 => Some(Isa::Amx),
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

/// Proof that the CPU has AVX512_BF16 on top of [`Avx512Token`]'s features; it carries the AMX proof when the
/// bf16 GEMMs are to run on tiles, so they pick their engine from the token they are handed.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Bf16Token(Option<AmxToken>);

/// Proof that the CPU has AMX-TILE and AMX-BF16 and that the OS let this process use the tile registers.
#[derive(Clone, Copy, Debug)]
pub(crate) struct AmxToken(());

impl Bf16Token {
    /// The AMX proof, when the level is [`Isa::Amx`].
    pub(crate) fn amx(self) -> Option<AmxToken> {
        self.0
    }
}

/// Proof that the CPU has AVX2 + FMA.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Avx2Token(());

impl Level {
    pub fn isa(self) -> Isa {
        self.0
    }
    /// Whether this level includes `floor`'s features (each level has those of every level below it).
    fn reaches(self, floor: Isa) -> bool {
        encode(self.0) >= encode(floor)
    }
    pub(crate) fn avx512(self) -> Option<Avx512Token> {
        self.reaches(Isa::Avx512).then_some(Avx512Token(()))
    }
    pub(crate) fn bf16(self) -> Option<Bf16Token> {
        let amx = self.reaches(Isa::Amx).then_some(AmxToken(()));
        self.reaches(Isa::Avx512Bf16).then_some(Bf16Token(amx))
    }
    pub(crate) fn avx2(self) -> Option<Avx2Token> {
        self.reaches(Isa::Avx2).then_some(Avx2Token(()))
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
                return if amx_granted() {
                    Isa::Amx
                } else {
                    Isa::Avx512Bf16
                };
            }
            return Isa::Avx512;
        }
        if avx2 {
            return Isa::Avx2;
        }
    }
    Isa::Portable
}

/// Whether this CPU has AMX-TILE and AMX-BF16 and the OS lets this process use them. Asked once per process: Linux
/// enables the tile data state only on request (`arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`), which
/// fails where the kernel or the CPU lacks it; elsewhere the answer is no.
#[cfg(target_arch = "x86_64")]
fn amx_granted() -> bool {
    static GRANTED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *GRANTED.get_or_init(|| {
        // CPUID leaf 7, sub-leaf 0, EDX: bit 22 AMX-BF16, bit 24 AMX-TILE (`is_x86_feature_detected!` does not take
        // the AMX names on stable Rust).
        // SAFETY: CPUID is available on every x86-64 CPU, and leaf 7 is answered (with zeros if unsupported).
        // (A safe function from Rust 1.94; unsafe for the crate's minimum, 1.89.)
        #[allow(unused_unsafe)]
        let edx = unsafe { std::arch::x86_64::__cpuid_count(7, 0) }.edx;
        if edx & (1 << 22) == 0 || edx & (1 << 24) == 0 {
            return false;
        }
        request_tile_data()
    })
}

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn request_tile_data() -> bool {
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    // SAFETY: arch_prctl with this code only changes which extended states the process may use; it reads and
    // writes no memory of ours. Granting is idempotent (torch's oneDNN makes the same request).
    let rc = unsafe {
        libc::syscall(
            libc::SYS_arch_prctl,
            ARCH_REQ_XCOMP_PERM,
            XFEATURE_XTILEDATA,
        )
    };
    rc == 0
}

#[cfg(all(target_arch = "x86_64", not(target_os = "linux")))]
fn request_tile_data() -> bool {
    false
}

impl Isa {
    /// Parses `portable`, `avx2`, `avx512`, `avx512bf16` or `amx` (any case).
    pub fn parse(name: &str) -> Option<Self> {
        match name.to_ascii_lowercase().as_str() {
            "portable" => Some(Isa::Portable),
            "avx2" => Some(Isa::Avx2),
            "avx512" => Some(Isa::Avx512),
            "avx512bf16" => Some(Isa::Avx512Bf16),
            "amx" => Some(Isa::Amx),
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
