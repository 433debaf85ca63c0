//! The per-row work between the two GEMMs: epilogue, log-sum-exp, loss, and the logits gradient written in place.
//!
//! For one row with pre-epilogue logits `y` (already `h·Wᵀ`), `z = epilogue(y + b)`, `p = softmax(z)`:
//! `dl/dz_j = p_j·(1 + 2·z_loss·lse) - ε/V - (1-ε)·[j = t]`, and the chain rule through the epilogue gives
//! `dl/dy_j = dl/dz_j · k · (1 - (z_j/c)²)` (`k` = multiply/divide factor, the last factor only with softcap).

use crate::isa::Level;
use crate::storage::Real;

/// Lanes of the reductions: enough independent accumulators for 512-bit vectors of f32.
const LANES: usize = 16;

/// Epilogue and loss constants shared by every row of a call.
pub(crate) struct RowParams<'a, C> {
    /// lm_head bias, converted to the compute type.
    pub bias: Option<&'a [C]>,
    pub logits_bias: Option<&'a [f32]>,
    /// `multiply / divide`, when either is set.
    pub scale: Option<C>,
    pub softcap: Option<C>,
    /// `1 / temperature` applied after the softcap (without a softcap the temperature is folded into `scale`).
    pub post_scale: Option<C>,
    pub smoothing: f64,
    pub z_loss: f64,
    /// Compute [`RowResult::token_stats`].
    pub want_stats: bool,
}

/// What one row contributes, and what [`process_slab`] needs to rebuild any slab of its logits gradient.
pub(crate) struct RowResult<C> {
    pub loss: f64,
    pub stats: RowStats<C>,
    /// The row's distribution statistics, in `crate::TokenStat` order (zeros unless `RowParams::want_stats`).
    pub token_stats: [f64; crate::TOKEN_STATS],
}

/// A row's softmax constants: `p_j = exp(z_j - max) / Σ`, and `a = s·(1 + 2·z_loss·lse) / Σ`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct RowStats<C> {
    pub max: C,
    pub a: C,
}

/// Turns `row` (pre-epilogue logits) into the gradient of `s·l` with respect to them when `grad` is set (left as
/// the epilogue's output otherwise) and returns the row's loss. `target` is in range (checked by the caller).
pub(crate) fn process_row<C: Real>(
    level: Level,
    row: &mut [C],
    target: usize,
    s: C,
    grad: bool,
    p: &RowParams<'_, C>,
) -> RowResult<C> {
    #[cfg(target_arch = "x86_64")]
    {
        if level.avx512().is_some() {
            // SAFETY: an Avx512Token exists only when detection found avx512f/bw/vl/dq, avx2 and fma.
            return unsafe { row_avx512(row, target, s, grad, p) };
        }
        if level.avx2().is_some() {
            // SAFETY: an Avx2Token exists only when detection found avx2 and fma.
            return unsafe { row_avx2(row, target, s, grad, p) };
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = level;
    row_body(row, target, s, grad, p)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")]
fn row_avx512<C: Real>(
    row: &mut [C],
    target: usize,
    s: C,
    grad: bool,
    p: &RowParams<'_, C>,
) -> RowResult<C> {
    row_body(row, target, s, grad, p)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn row_avx2<C: Real>(
    row: &mut [C],
    target: usize,
    s: C,
    grad: bool,
    p: &RowParams<'_, C>,
) -> RowResult<C> {
    row_body(row, target, s, grad, p)
}

/// Σ f(x) with LANES independent accumulators (a plain running sum would not vectorise: float addition is not
/// reassociated by the compiler).
#[inline(always)]
fn lane_sum<C: Real>(xs: &[C], f: impl Fn(C) -> C) -> C {
    let (chunks, rest) = xs.as_chunks::<LANES>();
    let mut acc = [C::ZERO; LANES];
    for c in chunks {
        for l in 0..LANES {
            acc[l] += f(c[l]);
        }
    }
    let mut total = C::ZERO;
    for &x in rest {
        total += f(x);
    }
    for a in acc {
        total += a;
    }
    total
}

#[inline(always)]
fn lane_max<C: Real>(xs: &[C]) -> C {
    let (chunks, rest) = xs.as_chunks::<LANES>();
    let first = xs.first().copied().unwrap_or(C::ZERO);
    let mut acc = [first; LANES];
    for c in chunks {
        for l in 0..LANES {
            acc[l] = acc[l].max(c[l]);
        }
    }
    let mut m = first;
    for &x in rest {
        m = m.max(x);
    }
    for a in acc {
        m = m.max(a);
    }
    m
}

/// Turns `slab` (pre-epilogue logits of columns `[v0, v0 + slab.len())` of a row whose constants `stats` came
/// from [`process_row`] on the whole row) into the same values of the logits gradient that `process_row` writes
/// there. `p` holds the bias vectors of the whole vocabulary (`v_total` columns).
#[allow(clippy::too_many_arguments)]
pub(crate) fn process_slab<C: Real>(
    level: Level,
    slab: &mut [C],
    v0: usize,
    v_total: usize,
    target: usize,
    s: C,
    stats: RowStats<C>,
    p: &RowParams<'_, C>,
) {
    #[cfg(target_arch = "x86_64")]
    {
        if level.avx512().is_some() {
            // SAFETY: as in `process_row`.
            return unsafe { slab_avx512(slab, v0, v_total, target, s, stats, p) };
        }
        if level.avx2().is_some() {
            // SAFETY: as in `process_row`.
            return unsafe { slab_avx2(slab, v0, v_total, target, s, stats, p) };
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = level;
    slab_body(slab, v0, v_total, target, s, stats, p)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")]
fn slab_avx512<C: Real>(
    slab: &mut [C],
    v0: usize,
    v_total: usize,
    target: usize,
    s: C,
    stats: RowStats<C>,
    p: &RowParams<'_, C>,
) {
    slab_body(slab, v0, v_total, target, s, stats, p)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn slab_avx2<C: Real>(
    slab: &mut [C],
    v0: usize,
    v_total: usize,
    target: usize,
    s: C,
    stats: RowStats<C>,
    p: &RowParams<'_, C>,
) {
    slab_body(slab, v0, v_total, target, s, stats, p)
}

#[inline(always)]
fn slab_body<C: Real>(
    slab: &mut [C],
    v0: usize,
    v_total: usize,
    target: usize,
    s: C,
    stats: RowStats<C>,
    p: &RowParams<'_, C>,
) {
    let cols = v0..v0 + slab.len();
    apply_epilogue(slab, cols.clone(), p);
    let t = cols.contains(&target).then(|| target - v0);
    write_gradient(slab, t, v_total, s, stats, p);
}

/// The epilogue, one vectorisable loop per step, in the spec's order; `cols` are the row's columns in `row`.
#[inline(always)]
fn apply_epilogue<C: Real>(row: &mut [C], cols: std::ops::Range<usize>, p: &RowParams<'_, C>) {
    if let Some(b) = p.bias {
        for (z, &b) in row.iter_mut().zip(&b[cols.clone()]) {
            *z += b;
        }
    }
    if let Some(lb) = p.logits_bias {
        for (z, &b) in row.iter_mut().zip(&lb[cols]) {
            *z += C::from_f64(b as f64);
        }
    }
    if let Some(k) = p.scale {
        for z in row.iter_mut() {
            *z = *z * k;
        }
    }
    if let Some(c) = p.softcap {
        let inv = C::ONE / c;
        let out = c * p.post_scale.unwrap_or(C::ONE);
        for z in row.iter_mut() {
            *z = out * (*z * inv).tanh();
        }
    }
}

/// `x`, or 0 where `|x| < C::FLUSH_BELOW`.
#[inline(always)]
fn flushed<C: Real>(x: C) -> C {
    if x < C::FLUSH_BELOW && x > -C::FLUSH_BELOW {
        C::ZERO
    } else {
        x
    }
}

/// Overwrites post-epilogue logits `z` with `d(s·l)/dy`; `target` is the target's index in `z`, if there.
///
/// Entries below `C::FLUSH_BELOW` (2^-96 in f32) are written as 0. A confident row's softmax puts most of the
/// vocabulary below f32's smallest normal once scaled (a logit ~80 below the row's maximum), and the GEMMs that
/// read this gradient then ran on denormals, one microcode assist per operation: the f32 engine's two backward
/// GEMMs took 6.5 s each instead of 0.37 at 256×4096×32000 with a loss of 74. The bf16 engines' instructions
/// (`vdpbf16ps`, `tdpbf16ps`) treat denormal inputs as 0 themselves. What is dropped is below 2^-96 per entry.
#[inline(always)]
fn write_gradient<C: Real>(
    z: &mut [C],
    target: Option<usize>,
    v_total: usize,
    s: C,
    RowStats { max, a }: RowStats<C>,
    p: &RowParams<'_, C>,
) {
    let base = s * C::from_f64(p.smoothing / v_total as f64);
    let onehot = s * C::from_f64(1.0 - p.smoothing);
    let k = p.scale.unwrap_or(C::ONE);
    match p.softcap {
        Some(c) => {
            // z = q·c·tanh(y'/c) (q = 1/temperature, y' = k·y), so dz/dy = k·q·(1 - tanh²) with tanh = z/(q·c),
            // taken from z itself before it is overwritten.
            let q = p.post_scale.unwrap_or(C::ONE);
            let inv = C::ONE / (c * q);
            let kq = k * q;
            let fac = |z: C| kq * (C::ONE - (z * inv) * (z * inv));
            let z_t = target.map(|t| z[t]);
            for z in z.iter_mut() {
                *z = flushed((a * (*z - max).exp() - base) * fac(*z));
            }
            if let (Some(t), Some(z_t)) = (target, z_t) {
                z[t] = z[t] - onehot * fac(z_t);
            }
        }
        None => {
            for z in z.iter_mut() {
                *z = flushed((a * (*z - max).exp() - base) * k);
            }
            if let Some(t) = target {
                z[t] = z[t] - onehot * k;
            }
        }
    }
}

#[inline(always)]
fn row_body<C: Real>(
    row: &mut [C],
    target: usize,
    s: C,
    grad: bool,
    p: &RowParams<'_, C>,
) -> RowResult<C> {
    let v = row.len();
    apply_epilogue(row, 0..v, p);
    let max = lane_max(row);
    let sum_exp = lane_sum(row, |z| (z - max).exp());
    let lse = max.to_f64() + sum_exp.to_f64().ln();
    let z_t = row[target];
    let eps = p.smoothing;
    let mut loss = (1.0 - eps) * (lse - z_t.to_f64()) + p.z_loss * lse * lse;
    if eps != 0.0 {
        let mean = lane_sum(row, |z| z).to_f64() / v as f64;
        loss += eps * (lse - mean);
    }
    // p_j = exp(z_j - max) / Σ: z_j - max is exact near the top, where rounding lse to C would not be.
    let stats = RowStats {
        max,
        a: s * C::from_f64((1.0 + 2.0 * p.z_loss * lse) / sum_exp.to_f64()),
    };
    let token_stats = if p.want_stats {
        token_stats(row, target, max, sum_exp)
    } else {
        [0.0; crate::TOKEN_STATS]
    };
    if grad {
        write_gradient(row, Some(target), v, s, stats, p);
    }
    RowResult {
        loss,
        stats,
        token_stats,
    }
}

/// Entropy, mean logit, log Σp² and "target is the argmax" of the post-epilogue row `z` (`crate::TokenStat`).
/// Entropy is `log Σ - Σ_j p_j (z_j - max)`: both terms relative to the max, so a peaked row loses no digits to
/// the cancellation `lse - Σ p z` would have.
#[inline(always)]
fn token_stats<C: Real>(z: &[C], target: usize, max: C, sum_exp: C) -> [f64; crate::TOKEN_STATS] {
    let log_sum = sum_exp.to_f64().ln();
    let weighted = lane_sum(z, |z| (z - max).exp() * (z - max)).to_f64() / sum_exp.to_f64();
    let mean = lane_sum(z, |z| z).to_f64() / z.len() as f64;
    let sum_sq = lane_sum(z, |z| ((z - max) + (z - max)).exp()).to_f64();
    // The first index holding the max: ties go to the lowest index.
    let top1 = z.iter().position(|&x| x == max) == Some(target);
    [
        log_sum - weighted,
        mean,
        sum_sq.ln() - 2.0 * log_sum,
        f64::from(u8::from(top1)),
    ]
}
