//! The element types as stored (f32/f64/bf16/f16) and as computed in (f32, or f64 for f64).

use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};
#[cfg(target_arch = "x86_64")]
use std::any::TypeId;
use std::ops::{Add, AddAssign, Div, Mul, Neg, Sub};

/// The compute type: f32 or f64. `exp`/`tanh` are the vectorisable approximations for f32 (within ~2 ulp) and
/// std's for f64 (used for gradient checks, where speed does not matter).
pub(crate) trait Real:
    Copy
    + Send
    + Sync
    + 'static
    + Default
    + PartialOrd
    + Add<Output = Self>
    + Sub<Output = Self>
    + Mul<Output = Self>
    + Div<Output = Self>
    + Neg<Output = Self>
    + AddAssign
{
    const ZERO: Self;
    const ONE: Self;
    /// Logits-gradient entries below this in magnitude are written as 0 (`rowpass::write_gradient`): products of
    /// them with hidden values would be denormal, and x86 cores take a microcode assist for every operation on a
    /// denormal.
    const FLUSH_BELOW: Self;
    fn from_f64(x: f64) -> Self;
    fn to_f64(self) -> f64;
    fn exp(self) -> Self;
    fn tanh(self) -> Self;
    fn max(self, other: Self) -> Self;
}

impl Real for f64 {
    const ZERO: Self = 0.0;
    const ONE: Self = 1.0;
    // 2^-960 (exponent field 1023 - 960): times any hidden value above 1e-19 still normal (f64's smallest is
    // 2^-1022).
    const FLUSH_BELOW: Self = f64::from_bits(63 << 52);
    #[inline(always)]
    fn from_f64(x: f64) -> Self {
        x
    }
    #[inline(always)]
    fn to_f64(self) -> f64 {
        self
    }
    #[inline(always)]
    fn exp(self) -> Self {
        f64::exp(self)
    }
    #[inline(always)]
    fn tanh(self) -> Self {
        f64::tanh(self)
    }
    #[inline(always)]
    fn max(self, other: Self) -> Self {
        if self > other { self } else { other }
    }
}

impl Real for f32 {
    const ZERO: Self = 0.0;
    const ONE: Self = 1.0;
    // 2^-96 (exponent field 127 - 96): times any hidden value above 1e-9 still normal (f32's smallest is 2^-126).
    const FLUSH_BELOW: Self = f32::from_bits(31 << 23);
    #[inline(always)]
    fn from_f64(x: f64) -> Self {
        x as f32
    }
    #[inline(always)]
    fn to_f64(self) -> f64 {
        self as f64
    }
    #[inline(always)]
    fn exp(self) -> Self {
        exp_f32(self)
    }
    #[inline(always)]
    fn tanh(self) -> Self {
        // tanh|x| = (1 - e)/(1 + e) with e = exp(-2|x|) <= 1: no overflow for any x.
        let e = exp_f32(-2.0 * self.abs());
        ((1.0 - e) / (1.0 + e)).copysign(self)
    }
    #[inline(always)]
    fn max(self, other: Self) -> Self {
        // A plain compare-select (not f32::max's NaN rules) so the loop vectorises to vmaxps.
        if self > other { self } else { other }
    }
}

/// exp(x) for f32 written with only +, *, compare and bit casts so that loops over it vectorise. Range reduction
/// x = n·ln2 + r, |r| <= ln2/2, then a degree-6 Taylor polynomial (error < 2 ulp); x below -87.3 gives 0.
#[inline(always)]
pub(crate) fn exp_f32(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // 1.5·2^23: adding it rounds to the nearest integer, which then sits in the low mantissa bits.
    const MAGIC: f32 = 12_582_912.0;
    let x = if x < -88.0 { -88.0 } else { x };
    let x = if x > 88.0 { 88.0 } else { x };
    let k = x * LOG2E + MAGIC;
    let n = k - MAGIC;
    let ni = (k.to_bits() as i32).wrapping_sub(MAGIC.to_bits() as i32);
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = 1.0 / 720.0;
    let p = p * r + 1.0 / 120.0;
    let p = p * r + 1.0 / 24.0;
    let p = p * r + 1.0 / 6.0;
    let p = p * r + 0.5;
    let p = p * r + 1.0;
    let p = p * r + 1.0;
    // n is in [-127, 127]: n = -127 gives exponent bits 0, i.e. the result flushes to 0.
    let scale = f32::from_bits((ni.wrapping_add(127) << 23) as u32);
    p * scale
}

/// A stored element type with its compute type and bulk conversions.
pub(crate) trait Storage: Copy + Send + Sync + 'static {
    type C: Real;
    /// `Self == Self::C`: the GEMM engine reads the caller's buffers directly.
    const NATIVE: bool;
    fn load(src: &[Self], dst: &mut [Self::C]);
    fn store(src: &[Self::C], dst: &mut [Self]);
    fn zero() -> Self;
}

impl Storage for f32 {
    type C = f32;
    const NATIVE: bool = true;
    fn load(src: &[Self], dst: &mut [f32]) {
        dst.copy_from_slice(src);
    }
    fn store(src: &[f32], dst: &mut [Self]) {
        dst.copy_from_slice(src);
    }
    fn zero() -> Self {
        0.0
    }
}

impl Storage for f64 {
    type C = f64;
    const NATIVE: bool = true;
    fn load(src: &[Self], dst: &mut [f64]) {
        dst.copy_from_slice(src);
    }
    fn store(src: &[f64], dst: &mut [Self]) {
        dst.copy_from_slice(src);
    }
    fn zero() -> Self {
        0.0
    }
}

impl Storage for bf16 {
    type C = f32;
    const NATIVE: bool = false;
    fn load(src: &[Self], dst: &mut [f32]) {
        // bf16 → f32 is a 16-bit shift; written out so it vectorises (half's slice version is a scalar loop).
        for (d, s) in dst.iter_mut().zip(src) {
            *d = f32::from_bits((s.to_bits() as u32) << 16);
        }
    }
    fn store(src: &[f32], dst: &mut [Self]) {
        dst.convert_from_f32_slice(src);
    }
    fn zero() -> Self {
        bf16::ZERO
    }
}

impl Storage for f16 {
    type C = f32;
    const NATIVE: bool = false;
    fn load(src: &[Self], dst: &mut [f32]) {
        src.convert_to_f32_slice(dst);
    }
    fn store(src: &[f32], dst: &mut [Self]) {
        dst.convert_from_f32_slice(src);
    }
    fn zero() -> Self {
        f16::ZERO
    }
}

/// `x` as f32, when the compute type is f32.
#[cfg(target_arch = "x86_64")]
pub(crate) fn as_f32<C: 'static>(x: &[C]) -> Option<&[f32]> {
    if TypeId::of::<C>() == TypeId::of::<f32>() {
        // SAFETY: C is f32 (checked).
        Some(unsafe { std::slice::from_raw_parts(x.as_ptr().cast::<f32>(), x.len()) })
    } else {
        None
    }
}

/// `x` as f32, when the compute type is f32.
#[cfg(target_arch = "x86_64")]
pub(crate) fn as_f32_mut<C: 'static>(x: &mut [C]) -> Option<&mut [f32]> {
    if TypeId::of::<C>() == TypeId::of::<f32>() {
        // SAFETY: C is f32 (checked); the exclusive borrow moves into the result.
        Some(unsafe { std::slice::from_raw_parts_mut(x.as_mut_ptr().cast::<f32>(), x.len()) })
    } else {
        None
    }
}
