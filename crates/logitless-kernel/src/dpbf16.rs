//! bf16 GEMMs on AVX512_BF16 (`vdpbf16ps`: 32 bf16 products per instruction, f32 accumulation), for the three
//! products of the fused kernel. x86-64 only; used when `isa::current()` is `Avx512Bf16`, and the entry points for
//! `Amx` too, which hand the GEMMs to [`crate::amx`].
//!
//! `vdpbf16ps` multiplies pairs of bf16 along k inside each 32-bit lane, so every operand is read as `u32` pairs
//! `(x[k], x[k+1])`: the broadcast operand ("A", MR rows) either straight from bf16 rows whose k runs are
//! contiguous, or packed `[kp][MR]`; the vector operand ("B") packed `[kp][32 lanes]` per panel of 32 columns.
//! Operands that start as f32 (the logits gradient) are rounded to bf16 (nearest-even) while packing, as a stock
//! bf16 backward does. Every packing pads with zeros, so tails need no special kernel.

use crate::isa::Bf16Token;
use crate::{holds, holds_view};
use half::bf16;
use rayon::prelude::*;
use std::arch::x86_64::*;

/// Rows of the broadcast operand per micro-tile and lanes of the vector operand per panel: 12×32 accumulators
/// use 24 of the 32 zmm registers.
pub(crate) const MR: usize = 12;
pub(crate) const NR: usize = 32;

/// A raw pointer that threads may share because each writes a disjoint set of elements (argued at each use).
#[derive(Clone, Copy)]
pub(crate) struct SharedMut(pub *mut f32);
// SAFETY: only used to let threads write disjoint elements of one buffer that outlives the parallel section.
unsafe impl Send for SharedMut {}
// SAFETY: as above.
unsafe impl Sync for SharedMut {}

impl SharedMut {
    /// The element `offset` places on (a method, so closures capture the whole `Sync` wrapper, not the pointer).
    pub(crate) fn at(self, offset: usize) -> *mut f32 {
        self.0.wrapping_add(offset)
    }
}

/// f32 → bf16 bits, round to nearest even (NaN stays NaN by keeping a mantissa bit).
#[inline(always)]
fn to_bf16_bits(x: f32) -> u32 {
    let b = x.to_bits();
    if x.is_nan() {
        return (b >> 16) | 0x40;
    }
    (b.wrapping_add(0x7FFF + ((b >> 16) & 1))) >> 16
}

#[inline(always)]
fn pair(lo: u32, hi: u32) -> u32 {
    lo | (hi << 16)
}

/// One micro-tile's product: `acc[i][j] = Σ_p A(i, p) · B(p, j)` over `kp` k-pairs, for i < MR, j < 32. A(i, p)
/// is the u32 at `a + i·a_rs + p·a_ks`, B(p, ·) the 32 u32 at `b + 32·p`. When `prefetch` is given as
/// `([first, second], row_bytes)`, the first MR k-steps each prefetch one row of the next tile's C, as the two
/// cache lines at `first`/`second` plus `p·row_bytes`, so the misses overlap the arithmetic (prefetches are only
/// hints: they never fault and read nothing the program sees).
///
/// # Safety
/// The CPU must support avx512f and avx512bf16, and every address above must be readable.
#[target_feature(enable = "avx512f,avx512bf16,avx512bw,avx512vl")]
#[inline]
unsafe fn tile_product(
    kp: usize,
    a: *const u32,
    a_rs: usize,
    a_ks: usize,
    b: *const u32,
    prefetch: Option<([*const u8; 2], usize)>,
) -> [[__m512; 2]; MR] {
    let mut acc = [[_mm512_setzero_ps(); 2]; MR];
    for p in 0..kp {
        if p < MR
            && let Some(([first, second], row_bytes)) = prefetch
        {
            _mm_prefetch::<_MM_HINT_T0>(first.wrapping_add(p * row_bytes).cast());
            _mm_prefetch::<_MM_HINT_T0>(second.wrapping_add(p * row_bytes).cast());
        }
        // SAFETY: in bounds by the caller's contract; unaligned loads are allowed.
        let (b0, b1) = unsafe {
            (
                _mm512_loadu_si512(b.add(p * NR).cast()),
                _mm512_loadu_si512(b.add(p * NR + 16).cast()),
            )
        };
        let b0: __m512bh = _mm512_castsi512_ph_bh(b0);
        let b1: __m512bh = _mm512_castsi512_ph_bh(b1);
        for (i, ci) in acc.iter_mut().enumerate() {
            // SAFETY: in bounds by the caller's contract.
            let ai = unsafe { a.add(i * a_rs + p * a_ks).read_unaligned() };
            let av: __m512bh = _mm512_castsi512_ph_bh(_mm512_set1_epi32(ai as i32));
            ci[0] = _mm512_dpbf16_ps(ci[0], av, b0);
            ci[1] = _mm512_dpbf16_ps(ci[1], av, b1);
        }
    }
    acc
}

/// The micro-kernel into a scratch tile: `out = A·B` with A and B as in [`tile_product`], row i at `out[i·32..]`.
///
/// # Safety
/// As [`tile_product`].
#[target_feature(enable = "avx512f,avx512bf16,avx512bw,avx512vl")]
unsafe fn micro(
    kp: usize,
    a: *const u32,
    a_rs: usize,
    a_ks: usize,
    b: *const u32,
    out: &mut [f32; MR * NR],
) {
    // SAFETY: the caller's contract is tile_product's.
    let c = unsafe { tile_product(kp, a, a_rs, a_ks, b, None) };
    for (i, ci) in c.iter().enumerate() {
        // SAFETY: `out` holds MR·NR f32 and row i's 32 values are at i·NR.
        unsafe {
            _mm512_storeu_ps(out.as_mut_ptr().add(i * NR), ci[0]);
            _mm512_storeu_ps(out.as_mut_ptr().add(i * NR + 16), ci[1]);
        }
    }
}

/// A micro-tile stored transposed, `out[j·ldo + i] = c[i][j]` for i < mrows, j < cols (`c[i][h]` holding
/// columns 16h..16h + 16 of row i): two 16×16 register transposes and one masked store per column. The logits
/// GEMMs' tiles are W rows × hidden rows and their C hidden rows × vocabulary; element-wise stores made the f32
/// one 9% slower at H = 256.
///
/// # Safety
/// The CPU must support avx512f; `out + j·ldo + i` must be writable (and not touched by another thread) for
/// i < mrows ≤ MR, j < cols ≤ NR.
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn store_transposed(
    c: &[[__m512; 2]; MR],
    out: *mut f32,
    ldo: usize,
    mrows: usize,
    cols: usize,
) {
    let mask = ((1u32 << mrows.min(MR)) - 1) as __mmask16;
    for half in 0..2 {
        let mut r = [_mm512_setzero_si512(); 16];
        for (ri, ci) in r.iter_mut().zip(c) {
            *ri = _mm512_castps_si512(ci[half]);
        }
        let t = crate::amx::transpose16(&r);
        for (jj, tj) in t
            .iter()
            .enumerate()
            .take(cols.saturating_sub(16 * half).min(16))
        {
            // SAFETY: column j = 16·half + jj < cols; its lanes i < mrows are writable by the caller's contract
            // and the mask stores only those.
            unsafe {
                _mm512_mask_storeu_ps(
                    out.add((16 * half + jj) * ldo),
                    mask,
                    _mm512_castsi512_ps(*tj),
                )
            };
        }
    }
}

/// The micro-kernel writing straight into row-major C (`ldc` between rows, a full MR×32 tile): `C = [C +] A·B`
/// with A and B as in [`tile_product`], which prefetches the MR×32 tile at `next` (the following call's C, `ldc`
/// apart; any address) so that tile's read-modify-write does not wait on memory.
///
/// # Safety
/// As [`tile_product`], and `c + i·ldc + j` must be readable and writable (and not touched by another thread) for
/// i < MR, j < 32.
#[target_feature(enable = "avx512f,avx512bf16,avx512bw,avx512vl")]
#[allow(clippy::too_many_arguments)]
unsafe fn micro_c(
    kp: usize,
    a: *const u32,
    a_rs: usize,
    a_ks: usize,
    b: *const u32,
    c: *mut f32,
    ldc: usize,
    add: bool,
    next: *const f32,
) {
    let lines = [next.cast::<u8>(), next.wrapping_add(16).cast::<u8>()];
    // SAFETY: the caller's contract includes tile_product's.
    let mut acc = unsafe { tile_product(kp, a, a_rs, a_ks, b, Some((lines, 4 * ldc))) };
    for (i, ci) in acc.iter_mut().enumerate() {
        // SAFETY: row i's 32 values of the tile are readable and writable by the caller's contract.
        unsafe {
            if add {
                ci[0] = _mm512_add_ps(ci[0], _mm512_loadu_ps(c.add(i * ldc)));
                ci[1] = _mm512_add_ps(ci[1], _mm512_loadu_ps(c.add(i * ldc + 16)));
            }
            _mm512_storeu_ps(c.add(i * ldc), ci[0]);
            _mm512_storeu_ps(c.add(i * ldc + 16), ci[1]);
        }
    }
}

/// A row-major f32 matrix kept as two u16 planes: `hi` holds each value's upper 16 bits (its bf16 truncation),
/// `lo` the lower 16. Adding into it is exact f32 arithmetic, and [`round_split_into_hi`] turns `hi` into the
/// values rounded to bf16 (nearest even) at the end. The d_weight accumulator takes this form when `hi` is the
/// caller's bf16 output: half the memory of a separate f32 matrix, the same bits.
#[derive(Clone, Copy)]
pub(crate) struct SplitAcc {
    hi: *mut u16,
    lo: *mut u16,
}
// SAFETY: only used to let threads write disjoint elements of two buffers that outlive the parallel section (argued
// at each use).
unsafe impl Send for SplitAcc {}
// SAFETY: as above.
unsafe impl Sync for SplitAcc {}

impl SplitAcc {
    /// Both planes at element `offset` (methods, so closures capture the whole `Sync` wrapper).
    pub(crate) fn at(self, offset: usize) -> Self {
        Self {
            hi: self.hi.wrapping_add(offset),
            lo: self.lo.wrapping_add(offset),
        }
    }

    /// f32 element `i`.
    ///
    /// # Safety
    /// Element `i` of both planes must be readable.
    unsafe fn get(self, i: usize) -> f32 {
        // SAFETY: by the function's contract.
        let (h, l) = unsafe { (self.hi.add(i).read(), self.lo.add(i).read()) };
        join(h, l)
    }

    /// Sets f32 element `i` to `x`.
    ///
    /// # Safety
    /// Element `i` of both planes must be writable and not touched by another thread meanwhile.
    unsafe fn set(self, i: usize, x: f32) {
        let b = x.to_bits();
        // SAFETY: by the function's contract.
        unsafe {
            self.hi.add(i).write((b >> 16) as u16);
            self.lo.add(i).write(b as u16);
        }
    }

    /// Adds 16 f32 lanes into elements `i..i + 16`.
    ///
    /// # Safety
    /// As [`SplitAcc::set`] for the 16 elements; the CPU must support avx512f/bw.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    #[inline]
    unsafe fn add16(self, i: usize, x: __m512) {
        // SAFETY: readable and writable by the function's contract; unaligned accesses are allowed.
        unsafe {
            let old = _mm512_castsi512_ps(join16(self.hi.add(i), self.lo.add(i)));
            let sum = _mm512_castps_si512(_mm512_add_ps(x, old));
            // vpmovdw keeps each lane's low 16 bits.
            _mm256_storeu_si256(
                self.hi.add(i).cast(),
                _mm512_cvtepi32_epi16(_mm512_srli_epi32::<16>(sum)),
            );
            _mm256_storeu_si256(self.lo.add(i).cast(), _mm512_cvtepi32_epi16(sum));
        }
    }

    /// Adds `x` into elements `0..x.len()`.
    ///
    /// # Safety
    /// As [`SplitAcc::set`] for those elements; the CPU must support avx512f/bw.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    pub(crate) unsafe fn add_row(self, x: &[f32]) {
        let (whole, rest) = x.as_chunks::<16>();
        for (k, lanes) in whole.iter().enumerate() {
            // SAFETY: elements 16k..16k+16 are the caller's (by the function's contract), as are the CPU features.
            unsafe { self.add16(16 * k, _mm512_loadu_ps(lanes.as_ptr())) };
        }
        for (t, &y) in rest.iter().enumerate() {
            let i = 16 * whole.len() + t;
            // SAFETY: element i is the caller's.
            unsafe { self.set(i, self.get(i) + y) };
        }
    }

    /// The two planes (the same length, both zeroed by the caller) as one accumulator.
    pub(crate) fn new(hi: &mut [u16], lo: &mut [u16]) -> Self {
        assert_eq!(hi.len(), lo.len(), "SplitAcc planes");
        Self {
            hi: hi.as_mut_ptr(),
            lo: lo.as_mut_ptr(),
        }
    }
}

/// Rounds the split accumulator `hi`/`lo` (element for element) to bf16 in `hi`, in parallel when asked.
pub(crate) fn round_split_into_hi(_cpu: Bf16Token, hi: &mut [u16], lo: &[u16], parallel: bool) {
    assert_eq!(hi.len(), lo.len(), "round_split_into_hi");
    let run = |(h, l): (&mut [u16], &[u16])| {
        let mut k = 0;
        while k + 16 <= h.len() {
            // SAFETY: 16 elements at k in both (checked by the loop); the CPU has AVX512_BF16 and so
            // avx512f/bw (the caller holds a Bf16Token).
            unsafe { round_split16(h.as_mut_ptr().add(k), l.as_ptr().add(k)) };
            k += 16;
        }
        for (x, &y) in h[k..].iter_mut().zip(&l[k..]) {
            *x = to_bf16_bits(join(*x, y)) as u16;
        }
    };
    const PIECE: usize = 1 << 16;
    if parallel {
        hi.par_chunks_mut(PIECE)
            .zip(lo.par_chunks(PIECE))
            .for_each(run);
    } else {
        hi.chunks_mut(PIECE).zip(lo.chunks(PIECE)).for_each(run);
    }
}

/// [`round_split_into_hi`] on 16 elements.
///
/// # Safety
/// The CPU must support avx512f/bw; 16 u16 at `hi` must be readable and writable, 16 at `lo` readable.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn round_split16(hi: *mut u16, lo: *const u16) {
    // SAFETY: by the function's contract; unaligned accesses are allowed.
    unsafe { _mm256_storeu_si256(hi.cast(), round_bits16(join16(hi, lo))) };
}

/// The f32 whose upper and lower 16 bits are `hi` and `lo`.
#[inline(always)]
fn join(hi: u16, lo: u16) -> f32 {
    f32::from_bits(((hi as u32) << 16) | lo as u32)
}

/// [`join`] on 16 lanes: the f32 bits of elements `0..16` of the planes at `hi` and `lo`.
///
/// # Safety
/// The CPU must support avx512f/bw; 16 u16 at each of `hi` and `lo` must be readable.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
#[inline]
unsafe fn join16(hi: *const u16, lo: *const u16) -> __m512i {
    // SAFETY: by the function's contract; unaligned loads are allowed.
    let (h, l) = unsafe {
        (
            _mm512_cvtepu16_epi32(_mm256_loadu_si256(hi.cast())),
            _mm512_cvtepu16_epi32(_mm256_loadu_si256(lo.cast())),
        )
    };
    _mm512_or_si512(_mm512_slli_epi32::<16>(h), l)
}

/// The micro-kernel adding straight into a split accumulator (`ldc` between rows, a full MR×32 tile):
/// `C += A·B` with A and B as in [`tile_product`], which prefetches the tile at `next` of both planes.
///
/// # Safety
/// As [`tile_product`], and elements `i·ldc + j` of both planes of `c` must be readable and writable (and not
/// touched by another thread) for i < MR, j < 32.
#[target_feature(enable = "avx512f,avx512bf16,avx512bw,avx512vl")]
#[allow(clippy::too_many_arguments)]
unsafe fn micro_split(
    kp: usize,
    a: *const u32,
    a_rs: usize,
    a_ks: usize,
    b: *const u32,
    c: SplitAcc,
    ldc: usize,
    next: SplitAcc,
) {
    let lines = [
        next.hi.cast_const().cast::<u8>(),
        next.lo.cast_const().cast::<u8>(),
    ];
    // SAFETY: the caller's contract includes tile_product's.
    let acc = unsafe { tile_product(kp, a, a_rs, a_ks, b, Some((lines, 2 * ldc))) };
    for (i, ci) in acc.iter().enumerate() {
        // SAFETY: row i's 32 elements of both planes are ours by the caller's contract.
        unsafe {
            c.add16(i * ldc, ci[0]);
            c.add16(i * ldc + 16, ci[1]);
        }
    }
}

#[inline(always)]
fn _mm512_castsi512_ph_bh(x: __m512i) -> __m512bh {
    // SAFETY: both are plain 512-bit vectors; this only relabels the lanes.
    unsafe { std::mem::transmute::<__m512i, __m512bh>(x) }
}

/// k-pairs per packed block of the GEMM whose k is the vocabulary (d_hidden): 128 pairs × 32 lanes × 4 bytes =
/// 16 KiB per B micro-panel, which stays in L1 while a tile runs.
const KP_BLOCK: usize = 128;

pub(crate) fn ceil_div(a: usize, b: usize) -> usize {
    a.div_ceil(b)
}

/// k-pairs per packed panel for `k` values of k: whole AMX steps of 16 pairs (32 k), zero past `k`, so one panel
/// layout serves both engines (`vdpbf16ps` reads only the pairs it needs).
pub(crate) fn padded_pairs(k: usize) -> usize {
    ceil_div(k, 32) * 16
}

/// Pieces per rayon thread in [`split`] for the GEMMs split over W's rows (logits, d_weight): more than one, so
/// that when another process takes part of a core (the machines this runs on are often shared), the other
/// threads steal the delayed thread's remaining pieces instead of waiting for it.
pub(crate) const PIECES_PER_THREAD: usize = 4;

/// Runs `f(start, end)` over `[0, total)` split in `align`-multiples, `per_thread` pieces per rayon thread when
/// `parallel` (balanced by work stealing).
pub(crate) fn split(
    parallel: bool,
    total: usize,
    align: usize,
    per_thread: usize,
    f: impl Fn(usize, usize) + Sync,
) {
    let threads = if parallel {
        rayon::current_num_threads()
    } else {
        1
    };
    let piece = ceil_div(ceil_div(total, threads.max(1) * per_thread.max(1)), align) * align;
    if threads <= 1 || piece >= total {
        f(0, total);
        return;
    }
    let pieces = ceil_div(total, piece);
    (0..pieces)
        .into_par_iter()
        .with_max_len(1)
        .for_each(|t| f(t * piece, ((t + 1) * piece).min(total)));
}

/// Pieces over V of a parallel d_hidden with `threads` threads: each adds a `rows × h` float32 partial sum (at most
/// an eighth of the block's `rows × v` gradient), so one per thread while that holds.
pub(crate) fn d_hidden_v_pieces(v: usize, h: usize, threads: usize) -> usize {
    threads.min(1 + v / (8 * h.max(1))).max(1)
}

/// Runs d_hidden (`dh[j, :] = Σ_v g[j, v] · W[v, :]`, `rows × h` row-major) as pieces over V times pieces over H:
/// `f((k_start, k_end), (h_start, h_end), dst)` computes the k range's sum for the column range into `dst` (`h`
/// between rows). V ranges are `k_align`-multiples, H ranges `h_align`-multiples; the first V piece writes `dh`,
/// each later one its own partial sum, added to `dh` at the end. Over H alone every piece reads all of the block's
/// gradient rows and its own part of each W row; over V each reads its share of both, in whole W rows (measured at
/// 119×256×128256 on 2 cores, f32: 0.97 -> 0.82 s per call's d_hidden GEMMs).
#[allow(clippy::too_many_arguments)]
pub(crate) fn split_d_hidden(
    parallel: bool,
    rows: usize,
    v: usize,
    h: usize,
    k_align: usize,
    h_align: usize,
    dh: &mut [f32],
    f: impl Fn((usize, usize), (usize, usize), SharedMut) + Sync,
) {
    assert!(holds(dh.len(), rows, h), "d_hidden: output");
    if rows == 0 || h == 0 {
        return;
    }
    let threads = if parallel {
        rayon::current_num_threads().max(1)
    } else {
        1
    };
    let k_piece = ceil_div(
        ceil_div(v.max(1), d_hidden_v_pieces(v, h, threads)),
        k_align,
    ) * k_align;
    let pv = ceil_div(v.max(1), k_piece);
    let h_piece = ceil_div(ceil_div(h, ceil_div(threads, pv)), h_align) * h_align;
    let ph = ceil_div(h, h_piece);
    let mut parts = vec![0f32; (pv - 1) * rows * h];
    let (main, extra) = (SharedMut(dh.as_mut_ptr()), SharedMut(parts.as_mut_ptr()));
    let run = |t: usize| {
        let (iv, ih) = (t / ph, t % ph);
        let dst = if iv == 0 {
            main
        } else {
            SharedMut(extra.at((iv - 1) * rows * h))
        };
        let ks = (iv * k_piece, ((iv + 1) * k_piece).min(v));
        let hs = (ih * h_piece, ((ih + 1) * h_piece).min(h));
        f(ks, hs, dst);
    };
    if pv * ph == 1 {
        run(0);
    } else {
        (0..pv * ph).into_par_iter().with_max_len(1).for_each(run);
    }
    for part in parts.chunks_exact(rows * h) {
        for (d, p) in dh[..rows * h].iter_mut().zip(part) {
            *d += p;
        }
    }
}

/// Packs a k-major bf16 operand (`row(k)` is its k-th row, `k_rows` of them; columns `[c_start, c_end)`) as
/// consecutive 32-column panels, each `[padded_pairs(k_rows)][32]` pairs `(row 2p, row 2p+1)`; missing rows and
/// columns are zero. Rows are walked in order (each read once, front to back), panels written side by side.
/// Returns the u32 count per panel.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub(crate) fn pack_kmajor<'a>(
    row: &impl Fn(usize) -> &'a [bf16],
    k_rows: usize,
    c_start: usize,
    c_end: usize,
    out: &mut Vec<u32>,
) -> usize {
    let kp = ceil_div(k_rows, 2);
    let per_panel = padded_pairs(k_rows) * NR;
    let panels = ceil_div(c_end - c_start, NR);
    out.clear();
    out.resize(per_panel * panels, 0);
    for p in 0..kp {
        let lo = &row(2 * p)[c_start..c_end];
        let hi = (2 * p + 1 < k_rows).then(|| &row(2 * p + 1)[c_start..c_end]);
        for q in 0..panels {
            let (c0, width) = (q * NR, NR.min(c_end - c_start - q * NR));
            let o = &mut out[q * per_panel + p * NR..q * per_panel + p * NR + width];
            let lo = &lo[c0..c0 + width];
            if let (Some(hi), NR) = (hi, width) {
                let hi = &hi[c0..c0 + NR];
                for half in 0..2 {
                    // SAFETY: `lo`, `hi` hold 32 bf16 and `o` 32 u32 (width == NR), so the 16-element halves
                    // at 16·half are in bounds; the target features are enabled on this function.
                    unsafe {
                        let l = _mm256_loadu_si256(lo.as_ptr().add(16 * half).cast());
                        let u = _mm256_loadu_si256(hi.as_ptr().add(16 * half).cast());
                        let v = _mm512_or_si512(
                            _mm512_cvtepu16_epi32(l),
                            _mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(u)),
                        );
                        _mm512_storeu_si512(o.as_mut_ptr().add(16 * half).cast(), v);
                    }
                }
                continue;
            }
            match hi {
                Some(hi) => {
                    for ((o, l), h) in o.iter_mut().zip(lo).zip(&hi[c0..c0 + width]) {
                        *o = pair(l.to_bits() as u32, h.to_bits() as u32);
                    }
                }
                None => {
                    for (o, l) in o.iter_mut().zip(lo) {
                        *o = l.to_bits() as u32;
                    }
                }
            }
        }
    }
    per_panel
}

/// Packs the gathered hidden rows for the logits GEMM of `cpu`'s engine: here panels of 32 rows, `[kp][32]` pairs
/// along H (k-contiguous rows, so this is a transpose), rows past `rows` zero, `h` even; on AMX as
/// [`crate::amx::pack_rows`] lays them out.
pub(crate) fn pack_hidden_for_logits<'a>(
    cpu: Bf16Token,
    row: impl Fn(usize) -> &'a [bf16],
    rows: usize,
    h: usize,
    out: &mut Vec<u32>,
) {
    if let Some(amx) = cpu.amx() {
        return crate::amx::pack_rows(amx, row, rows, h, out);
    }
    let kp = h / 2;
    let panels = ceil_div(rows, NR);
    out.clear();
    out.resize(panels * kp * NR, 0);
    for r in 0..rows {
        let src = row(r);
        let (q, j) = (r / NR, r % NR);
        let panel = &mut out[q * kp * NR..(q + 1) * kp * NR];
        for p in 0..kp {
            panel[p * NR + j] = pair(src[2 * p].to_bits() as u32, src[2 * p + 1].to_bits() as u32);
        }
    }
}

/// Packs the gathered hidden rows for the weight-gradient GEMM: k = rows, panels of 32 columns of H (one layout
/// for both engines).
pub(crate) fn pack_hidden_for_dweight<'a>(
    _cpu: Bf16Token,
    row: impl Fn(usize) -> &'a [bf16],
    rows: usize,
    h: usize,
    out: &mut Vec<u32>,
) {
    // SAFETY: the caller holds a Bf16Token, so the CPU has AVX512_BF16 (and so avx512f/bw/vl).
    unsafe {
        pack_kmajor(&row, rows, 0, h, out);
    }
}

/// Writes one micro-tile result into row-major `c` (`ldc` between rows), `rows × cols` of it, adding when asked.
///
/// # Safety
/// `c + i·ldc + j` must be writable for i < rows, j < cols, and not written by another thread meanwhile.
#[inline(always)]
pub(crate) unsafe fn store_rows(
    out: &[f32; MR * NR],
    c: *mut f32,
    ldc: usize,
    rows: usize,
    cols: usize,
    add: bool,
) {
    for i in 0..rows {
        let src = &out[i * NR..i * NR + cols];
        // SAFETY: by the function's contract, row i's `cols` elements are ours to write.
        let dst = unsafe { std::slice::from_raw_parts_mut(c.add(i * ldc), cols) };
        if add {
            for (d, s) in dst.iter_mut().zip(src) {
                *d += s;
            }
        } else {
            dst.copy_from_slice(src);
        }
    }
}

/// GEMM 1: `logits[j, v] = Σ_k hidden_j[k] · W[v, k]` for j < rows, with W read in place (`ws` between rows,
/// even, as is `h`) and the hidden rows packed by [`pack_hidden_for_logits`].
#[allow(clippy::too_many_arguments)]
pub(crate) fn logits(
    cpu: Bf16Token,
    w: &[bf16],
    ws: usize,
    v: usize,
    h: usize,
    hp: &[u32],
    rows: usize,
    out: &mut [f32],
    parallel: bool,
) {
    if let Some(amx) = cpu.amx() {
        return crate::amx::logits(amx, w, ws, v, h, hp, rows, out, parallel);
    }
    let kp = h / 2;
    let panels = ceil_div(rows, NR);
    assert!(
        h.is_multiple_of(2) && ws.is_multiple_of(2) && ws >= h,
        "logits: layout"
    );
    assert!(holds_view(w.len(), v, h, ws), "logits: weight");
    assert!(
        holds(hp.len(), panels, kp * NR) && holds(out.len(), rows, v),
        "logits: buffers"
    );
    let dst = SharedMut(out.as_mut_ptr());
    split(parallel, v, MR, PIECES_PER_THREAD, |v_start, v_end| {
        let mut tail = vec![0u32; kp * MR];
        for v0 in (v_start..v_end).step_by(MR) {
            let mrows = MR.min(v_end - v0);
            // Full tiles broadcast straight from W's rows; the last partial one from a zero-padded copy.
            let (a, a_rs, a_ks) = if mrows == MR {
                (w[v0 * ws..].as_ptr().cast::<u32>(), ws / 2, 1)
            } else {
                for p in 0..kp {
                    for i in 0..MR {
                        tail[p * MR + i] = if i < mrows {
                            let r = &w[(v0 + i) * ws..];
                            pair(r[2 * p].to_bits() as u32, r[2 * p + 1].to_bits() as u32)
                        } else {
                            0
                        };
                    }
                }
                (tail.as_ptr(), 1, MR)
            };
            for q in 0..panels {
                // SAFETY: the CPU has AVX512_BF16 (the caller holds a Bf16Token); A reads stay in W's rows v0..v0+MR
                // (full tile, checked by the asserts) or in `tail`; B reads stay in panel q of `hp`. Rows q·32 + j <
                // rows and columns v0 + i < v0 + mrows <= v lie in `out` (asserted); this thread owns columns
                // [v_start, v_end).
                unsafe {
                    let c = tile_product(kp, a, a_rs, a_ks, hp[q * kp * NR..].as_ptr(), None);
                    store_transposed(&c, dst.at(q * NR * v + v0), v, mrows, NR.min(rows - q * NR));
                }
            }
        }
    });
}

/// Rounds f32 rows to bf16 (nearest even) into `out` with row stride `ld` (>= cols, even); the padding column
/// (if any) is zero, so k-pairs can be read straight from the rows.
pub(crate) fn round_rows(
    _cpu: Bf16Token,
    g: &[f32],
    rows: usize,
    cols: usize,
    ld: usize,
    out: &mut [u16],
    parallel: bool,
) {
    assert!(
        holds(g.len(), rows, cols) && holds(out.len(), rows, ld) && ld >= cols,
        "round_rows: buffers"
    );
    let work = |(src, dst): (&[f32], &mut [u16])| {
        // SAFETY: the CPU has AVX512_BF16 and so avx512f/bw (the caller holds a Bf16Token).
        unsafe { round_row(src, dst) }
    };
    if parallel {
        g[..rows * cols]
            .par_chunks(cols)
            .zip(out[..rows * ld].par_chunks_mut(ld))
            .for_each(work);
    } else {
        g[..rows * cols]
            .chunks(cols)
            .zip(out[..rows * ld].chunks_mut(ld))
            .for_each(work);
    }
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
fn round_row(src: &[f32], dst: &mut [u16]) {
    for (d, &s) in dst.iter_mut().zip(src) {
        *d = to_bf16_bits(s) as u16;
    }
    dst[src.len()..].fill(0);
}

/// GEMM 2: `dh[j, :] = Σ_v g[j, v] · W[v, :]` for j < rows, `g` already rounded to bf16 by [`round_rows`]
/// (row stride `gs`, even).
#[allow(clippy::too_many_arguments)]
pub(crate) fn d_hidden(
    cpu: Bf16Token,
    g: &[u16],
    gs: usize,
    rows: usize,
    w: &[bf16],
    ws: usize,
    v: usize,
    h: usize,
    dh: &mut [f32],
    parallel: bool,
) {
    if let Some(amx) = cpu.amx() {
        return crate::amx::d_hidden(amx, g, gs, rows, w, ws, v, h, dh, parallel);
    }
    assert!(
        gs.is_multiple_of(2) && gs >= v && holds(g.len(), rows, gs) && holds(dh.len(), rows, h),
        "d_hidden: buffers"
    );
    assert!(holds_view(w.len(), v, h, ws), "d_hidden: weight");
    let k_block = 2 * KP_BLOCK;
    split_d_hidden(
        parallel,
        rows,
        v,
        h,
        k_block,
        NR,
        dh,
        |(k_start, k_end), (h_start, h_end), dst| {
            let mut bp = Vec::new();
            let mut tail = vec![0u32; KP_BLOCK * MR];
            let mut tile = [0f32; MR * NR];
            for k0 in (k_start..k_end).step_by(k_block) {
                let kc = k_block.min(k_end - k0);
                let kp = ceil_div(kc, 2);
                let wrow = |k: usize| &w[(k0 + k) * ws..(k0 + k) * ws + h];
                // SAFETY: the CPU has AVX512_BF16 and so avx512f/bw/vl (the caller holds a Bf16Token).
                let per_panel = unsafe { pack_kmajor(&wrow, kc, h_start, h_end, &mut bp) };
                for r0 in (0..rows).step_by(MR) {
                    let mrows = MR.min(rows - r0);
                    // Pairs straight from the rounded rows (k0 is even, and an odd kc ends on the zero padding or
                    // on column v+.. of the padded row, which is zero); a partial tile from a zero-padded copy.
                    let (a, a_rs, a_ks) = if mrows == MR {
                        (g[r0 * gs + k0..].as_ptr().cast::<u32>(), gs / 2, 1)
                    } else {
                        for p in 0..kp {
                            for i in 0..MR {
                                tail[p * MR + i] = if i < mrows {
                                    let r = &g[(r0 + i) * gs + k0..];
                                    let hi = if 2 * p + 1 < kc {
                                        r[2 * p + 1] as u32
                                    } else {
                                        0
                                    };
                                    pair(r[2 * p] as u32, hi)
                                } else {
                                    0
                                };
                            }
                        }
                        (tail.as_ptr(), 1, MR)
                    };
                    for (q, h0) in (h_start..h_end).step_by(NR).enumerate() {
                        if mrows == MR && h0 + NR <= h_end {
                            let next = if h0 + 2 * NR <= h_end {
                                r0 * h + h0 + NR
                            } else {
                                (r0 + MR) * h + h_start
                            };
                            // SAFETY: the caller holds a Bf16Token; A reads rows r0..r0+MR of `g` up to column
                            // k0 + 2·kp <= gs; B reads panel q of `bp`; the full tile's rows r0..r0+MR <= rows and
                            // columns h0..h0+32 <= h_end <= h lie in `dh`, and this thread owns [h_start, h_end).
                            unsafe {
                                micro_c(
                                    kp,
                                    a,
                                    a_rs,
                                    a_ks,
                                    bp[q * per_panel..].as_ptr(),
                                    dst.at(r0 * h + h0),
                                    h,
                                    k0 > k_start,
                                    dst.at(next),
                                )
                            };
                            continue;
                        }
                        // SAFETY: the caller holds a Bf16Token; A reads rows r0..r0+MR of `g` up to column
                        // k0 + 2·kp <= gs (full tile) or `tail`; B reads panel q of `bp`.
                        unsafe {
                            micro(kp, a, a_rs, a_ks, bp[q * per_panel..].as_ptr(), &mut tile)
                        };
                        // SAFETY: rows r0.. < rows and columns h0.. < h_end <= h lie in `dh`; this thread owns
                        // columns [h_start, h_end).
                        unsafe {
                            store_rows(
                                &tile,
                                dst.at(r0 * h + h0),
                                h,
                                mrows,
                                NR.min(h_end - h0),
                                k0 > k_start,
                            );
                        }
                    }
                }
            }
        },
    );
}

/// Where GEMM 3 accumulates the V×H weight gradient: a plain f32 matrix (f32 storage, or a separate
/// accumulator), or a [`SplitAcc`] over the caller's bf16 output and a u16 plane.
pub(crate) enum WeightAcc<'a> {
    F32(&'a mut [f32]),
    Split {
        hi: &'a mut [u16],
        lo: &'a mut [u16],
    },
}

/// [`WeightAcc`] as shareable raw pointers for the threads (each writes its own rows).
#[derive(Clone, Copy)]
pub(crate) enum Target {
    F32(SharedMut),
    Split(SplitAcc),
}

impl WeightAcc<'_> {
    /// The accumulator of a `v × h` weight gradient as a [`Target`] (panics if it is smaller).
    pub(crate) fn target(self, v: usize, h: usize) -> Target {
        match self {
            WeightAcc::F32(c) => {
                assert!(holds(c.len(), v, h), "d_weight");
                Target::F32(SharedMut(c.as_mut_ptr()))
            }
            WeightAcc::Split { hi, lo } => {
                assert!(holds(hi.len(), v, h), "d_weight");
                Target::Split(SplitAcc::new(hi, lo))
            }
        }
    }
}

/// GEMM 3: `dw[v, :] += Σ_j g[j, v] · hidden_j`, `g` rounded by [`round_rows`] (row stride `gs`); hidden packed
/// by [`pack_hidden_for_dweight`] from the same `rows` rows.
#[allow(clippy::too_many_arguments)]
pub(crate) fn d_weight(
    cpu: Bf16Token,
    g: &[u16],
    gs: usize,
    rows: usize,
    v: usize,
    h: usize,
    hp: &[u32],
    dw: WeightAcc<'_>,
    parallel: bool,
) {
    if let Some(amx) = cpu.amx() {
        return crate::amx::d_weight(amx, g, gs, rows, v, h, hp, dw, parallel);
    }
    let kp = ceil_div(rows, 2);
    let per_panel = padded_pairs(rows) * NR;
    let panels = ceil_div(h, NR);
    assert!(
        gs >= v && holds(g.len(), rows, gs) && holds(hp.len(), panels, per_panel),
        "d_weight"
    );
    let dst = dw.target(v, h);
    split(parallel, v, MR, PIECES_PER_THREAD, |v_start, v_end| {
        let mut ap = vec![0u32; kp * MR];
        let mut tile = [0f32; MR * NR];
        for v0 in (v_start..v_end).step_by(MR) {
            let mrows = MR.min(v_end - v0);
            for p in 0..kp {
                let lo = &g[2 * p * gs + v0..2 * p * gs + v0 + mrows];
                let o = &mut ap[p * MR..(p + 1) * MR];
                if 2 * p + 1 < rows {
                    let hi = &g[(2 * p + 1) * gs + v0..(2 * p + 1) * gs + v0 + mrows];
                    for i in 0..mrows {
                        o[i] = pair(lo[i] as u32, hi[i] as u32);
                    }
                } else {
                    for i in 0..mrows {
                        o[i] = lo[i] as u32;
                    }
                }
                o[mrows..].fill(0);
            }
            for q in 0..panels {
                let h0 = q * NR;
                let b = hp[q * per_panel..].as_ptr();
                if mrows == MR && h0 + NR <= h {
                    // The next tile's C: the next panel of these rows, or the first panel of the next rows.
                    let next = if q + 1 < panels {
                        v0 * h + h0 + NR
                    } else {
                        (v0 + MR) * h
                    };
                    // The full tile's rows v0..v0+MR <= v_end <= v and columns h0..h0+32 <= h lie in the
                    // accumulator (asserted), and this thread owns rows [v_start, v_end).
                    let c = v0 * h + h0;
                    match dst {
                        // SAFETY: the caller holds a Bf16Token; A reads `ap`, B reads panel q of `hp`; C as above.
                        Target::F32(d) => unsafe {
                            micro_c(kp, ap.as_ptr(), 1, MR, b, d.at(c), h, true, d.at(next))
                        },
                        // SAFETY: as for the F32 arm, in both planes.
                        Target::Split(d) => unsafe {
                            micro_split(kp, ap.as_ptr(), 1, MR, b, d.at(c), h, d.at(next))
                        },
                    }
                    continue;
                }
                // SAFETY: the caller holds a Bf16Token; A reads `ap`, B reads panel q of `hp`.
                unsafe { micro(kp, ap.as_ptr(), 1, MR, b, &mut tile) };
                let cols = NR.min(h - h0);
                // Rows v0.. < v_end <= v and columns h0.. < h lie in the accumulator; this thread owns rows
                // [v_start, v_end).
                match dst {
                    // SAFETY: as above.
                    Target::F32(d) => unsafe {
                        store_rows(&tile, d.at(v0 * h + h0), h, mrows, cols, true)
                    },
                    Target::Split(d) => {
                        let d = d.at(v0 * h + h0);
                        for i in 0..mrows {
                            for j in 0..cols {
                                let k = i * h + j;
                                // SAFETY: as above.
                                unsafe { d.set(k, d.get(k) + tile[i * NR + j]) };
                            }
                        }
                    }
                }
            }
        }
    });
}

/// Best-of-`reps` seconds of each of the three GEMMs above at full size (`n` rows at once, no blocking), on
/// synthetic data: the bf16 engine's own rate, for the throughput benchmark's ratio.
pub(crate) fn time_three(cpu: Bf16Token, n: usize, h: usize, v: usize, reps: usize) -> [f64; 3] {
    let x: Vec<bf16> = (0..n * h)
        .map(|i| bf16::from_f32(((i % 97) as f32 - 48.0) / 64.0))
        .collect();
    let w: Vec<bf16> = (0..v * h)
        .map(|i| bf16::from_f32(((i % 89) as f32 - 44.0) / 512.0))
        .collect();
    let mut logits_out = vec![0.0f32; n * v];
    let gs = v + v % 2;
    let mut g16 = vec![0u16; n * gs];
    let mut dh = vec![0.0f32; n * h];
    let mut dw = vec![0.0f32; v * h];
    // Mapped before timing (a first touch inside a timed GEMM would bill it for page faults).
    crate::pages::fill(&mut logits_out, 0.0, true);
    crate::pages::fill(&mut dh, 0.0, true);
    crate::pages::fill(&mut dw, 0.0, true);
    let (mut hp1, mut hp3) = (Vec::new(), Vec::new());
    let row = |j: usize| &x[j * h..(j + 1) * h];
    let best = |f: &mut dyn FnMut()| {
        (0..reps.max(1))
            .map(|_| {
                let t = std::time::Instant::now();
                f();
                t.elapsed().as_secs_f64()
            })
            .fold(f64::INFINITY, f64::min)
    };
    let t1 = best(&mut || {
        pack_hidden_for_logits(cpu, row, n, h, &mut hp1);
        logits(cpu, &w, h, v, h, &hp1, n, &mut logits_out, true);
    });
    round_rows(cpu, &logits_out, n, v, gs, &mut g16, true);
    let t2 = best(&mut || d_hidden(cpu, &g16, gs, n, &w, h, v, h, &mut dh, true));
    let t3 = best(&mut || {
        pack_hidden_for_dweight(cpu, row, n, h, &mut hp3);
        d_weight(cpu, &g16, gs, n, v, h, &hp3, WeightAcc::F32(&mut dw), true);
    });
    [t1, t2, t3]
}

/// [`to_bf16_bits`] on 16 lanes: reads 16 f32 at `src`, then writes their bf16 bits at `dst` (which may overlap
/// `src`: all of it is read first).
///
/// # Safety
/// The CPU must support avx512f/bw; `src` must be readable for 16 f32 and `dst` writable for 16 u16.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn round16(src: *const f32, dst: *mut u16) {
    // SAFETY: readable and writable by the caller's contract; unaligned accesses are allowed.
    unsafe { _mm256_storeu_si256(dst.cast(), round_bits16(_mm512_loadu_si512(src.cast()))) };
}

/// [`to_bf16_bits`] on 16 lanes of f32 bits.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
#[inline]
fn round_bits16(x: __m512i) -> __m256i {
    let hi = _mm512_srli_epi32::<16>(x);
    let lsb = _mm512_and_si512(hi, _mm512_set1_epi32(1));
    let rounded = _mm512_srli_epi32::<16>(_mm512_add_epi32(
        x,
        _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF)),
    ));
    let xf = _mm512_castsi512_ps(x);
    let nan = _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(xf, xf);
    let r = _mm512_mask_mov_epi32(rounded, nan, _mm512_or_si512(hi, _mm512_set1_epi32(0x40)));
    // vpmovdw keeps each lane's low 16 bits.
    _mm512_cvtepi32_epi16(r)
}

/// Rounds an f32 row to bf16 in place, into the front of its own memory: u16 `k` becomes element `k` rounded for
/// k < len, and u16 `len` is 0 when `len` is odd (the pair the GEMMs read past an odd end). A row stays inside its
/// own bytes, so the rows of a block round in parallel, each right after the row pass while it is still in its
/// thread's cache (one thread compacting the whole block took 0.1 s of the demo head's 1.45 s call);
/// [`rounded_rows`] then reads them `2·len` u16 apart, so the logits block doubles as the bf16 gradient.
pub(crate) fn round_row_in_place(_cpu: Bf16Token, row: &mut [f32]) {
    const CHUNK: usize = 16;
    let cols = row.len();
    let base = row.as_mut_ptr();
    let out = base.cast::<u16>();
    let mut k = 0;
    while k + CHUNK <= cols {
        // SAFETY: f32 k..k+16 lie in `row` and are loaded before u16 k..k+16 (bytes 2k..2k+32, all at or before
        // the chunk's own f32, which end at byte 4k+64) are stored, so nothing unread is overwritten; the CPU has
        // AVX512_BF16 and so avx512f/bw (the token). Only raw pointers from `base` touch the row while this runs.
        unsafe { round16(base.add(k), out.add(k)) };
        k += CHUNK;
    }
    if k < cols {
        let n = cols - k;
        let mut tmp = [0f32; CHUNK];
        // SAFETY: f32 k..cols lie in the row; read before any of the writes below.
        unsafe { std::ptr::copy_nonoverlapping(base.add(k), tmp.as_mut_ptr(), n) };
        for (t, &x) in tmp[..n].iter().enumerate() {
            // SAFETY: u16 k + t < cols lies in the row's first half (2·cols bytes <= its 4·cols), over f32 that
            // were read already (those before k, or the tail copied to `tmp`).
            unsafe { out.add(k + t).write(to_bf16_bits(x) as u16) };
        }
    }
    if cols % 2 == 1 {
        // SAFETY: byte 2·cols + 2 <= 4·cols (cols >= 1): inside the row, past every rounded value.
        unsafe { out.add(cols).write(0) };
    }
}

/// The bf16 rows [`round_row_in_place`] left at the front of the first `rows` f32 rows (`cols` apart) of `buf`,
/// as u16 rows `2·cols` apart (their other halves hold the old f32 bits, which the GEMMs never read).
pub(crate) fn rounded_rows(buf: &[f32], rows: usize, cols: usize) -> &[u16] {
    assert!(holds(buf.len(), rows, cols), "rounded_rows");
    // SAFETY: the first rows·cols f32 of `buf` are initialised and span rows·cols·2 u16 (f32's alignment covers
    // u16's); any bit pattern is a u16, and `buf` stays borrowed for the result's life.
    unsafe { std::slice::from_raw_parts(buf.as_ptr().cast::<u16>(), rows * cols * 2) }
}
