//! f32 GEMMs on AVX-512 FMA for the three products of the fused kernel, with the same tiling as `dpbf16.rs`
//! (12×32 micro-tiles, 24 accumulators) but reading f32 operands in place where they are laid out right — W in
//! the logits GEMM, the gradient in d_hidden. Packed: the hidden block (once per block, for the logits GEMM and
//! again for d_weight), k blocks of W for d_hidden, each d_weight tile's columns of the gradient, and zero-padded
//! copies of tail tiles. Full tiles of d_hidden and d_weight are accumulated straight into the output with the
//! next tile's lines prefetched. x86-64 only; used for f32 when `isa::current()` is an AVX-512 level.

use crate::dpbf16::{
    MR, NR, PIECES_PER_THREAD, SharedMut, ceil_div, split, split_d_hidden, store_rows,
    store_transposed,
};
use crate::isa::Avx512Token;
use crate::{holds, holds_view};
use std::arch::x86_64::*;

/// k rows per block of the d_hidden GEMM (its k is the vocabulary): a 12×128 A tile (6 KiB) and a 128×32 B
/// panel (16 KiB) stay in L1 together.
const K_BLOCK: usize = 128;

/// `acc[i][j] = Σ_p A(i, p) · B(p, j)` for p < k, i < MR, j < 32, where A(i, p) is at `a + i·a_rs + p·a_ks` and
/// B(p, ·) is the 32 floats at `b + p·b_ks`; `acc[i][h]` holds columns 16h..16h + 16 of row i.
///
/// # Safety
/// The CPU must support avx512f, and every address above must be readable.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn product(
    k: usize,
    a: *const f32,
    a_rs: usize,
    a_ks: usize,
    b: *const f32,
    b_ks: usize,
) -> [[__m512; 2]; MR] {
    let mut c = [[_mm512_setzero_ps(); 2]; MR];
    for p in 0..k {
        // SAFETY: in bounds by the caller's contract; unaligned loads are allowed.
        let (b0, b1) = unsafe {
            (
                _mm512_loadu_ps(b.add(p * b_ks)),
                _mm512_loadu_ps(b.add(p * b_ks + 16)),
            )
        };
        for (i, ci) in c.iter_mut().enumerate() {
            // SAFETY: in bounds by the caller's contract.
            let av = _mm512_set1_ps(unsafe { a.add(i * a_rs + p * a_ks).read() });
            ci[0] = _mm512_fmadd_ps(av, b0, ci[0]);
            ci[1] = _mm512_fmadd_ps(av, b1, ci[1]);
        }
    }
    c
}

/// [`product`] into `out`, row i's 32 values at i·NR.
///
/// # Safety
/// As [`product`].
#[target_feature(enable = "avx512f")]
unsafe fn micro(
    k: usize,
    a: *const f32,
    a_rs: usize,
    a_ks: usize,
    b: *const f32,
    b_ks: usize,
    out: &mut [f32; MR * NR],
) {
    // SAFETY: the caller's contract is product's.
    let c = unsafe { product(k, a, a_rs, a_ks, b, b_ks) };
    for (i, ci) in c.iter().enumerate() {
        // SAFETY: `out` holds MR·NR f32 and row i's 32 values are at i·NR.
        unsafe {
            _mm512_storeu_ps(out.as_mut_ptr().add(i * NR), ci[0]);
            _mm512_storeu_ps(out.as_mut_ptr().add(i * NR + 16), ci[1]);
        }
    }
}

/// [`product`] stored transposed (`out[j·ldo + i]` for i < mrows, j < cols): the logits GEMM's micro-tile is W
/// rows × hidden rows, its C hidden rows × vocabulary.
///
/// # Safety
/// As [`product`] and [`store_transposed`].
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
unsafe fn micro_t(
    k: usize,
    a: *const f32,
    (a_rs, a_ks): (usize, usize),
    (b, b_ks): (*const f32, usize),
    out: *mut f32,
    ldo: usize,
    mrows: usize,
    cols: usize,
) {
    // SAFETY: the caller's contract is product's and store_transposed's.
    unsafe { store_transposed(&product(k, a, a_rs, a_ks, b, b_ks), out, ldo, mrows, cols) };
}

/// [`micro`] writing straight into row-major C (`ldc` between rows, a full MR×32 tile): `C = [C +] A·B`. During
/// its first MR k-steps it prefetches the MR×32 tile at `next` (the following call's C, `ldc` apart; any address,
/// prefetches never fault), so that tile's read-modify-write does not wait on memory.
///
/// # Safety
/// As [`micro`], and `c + i·ldc + j` must be readable and writable (and not touched by another thread) for
/// i < MR, j < 32.
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
unsafe fn micro_c(
    k: usize,
    a: *const f32,
    a_rs: usize,
    a_ks: usize,
    (b, b_ks): (*const f32, usize),
    c: *mut f32,
    ldc: usize,
    add: bool,
    next: *const f32,
) {
    let mut acc = [[_mm512_setzero_ps(); 2]; MR];
    for p in 0..k {
        // Prefetches are only hints: they never fault and read nothing the program sees.
        if p < MR {
            _mm_prefetch::<_MM_HINT_T0>(next.wrapping_add(p * ldc).cast());
            _mm_prefetch::<_MM_HINT_T0>(next.wrapping_add(p * ldc + 16).cast());
        }
        // SAFETY: in bounds by the caller's contract; unaligned loads are allowed.
        let (b0, b1) = unsafe {
            (
                _mm512_loadu_ps(b.add(p * b_ks)),
                _mm512_loadu_ps(b.add(p * b_ks + 16)),
            )
        };
        for (i, ci) in acc.iter_mut().enumerate() {
            // SAFETY: in bounds by the caller's contract.
            let av = _mm512_set1_ps(unsafe { a.add(i * a_rs + p * a_ks).read() });
            ci[0] = _mm512_fmadd_ps(av, b0, ci[0]);
            ci[1] = _mm512_fmadd_ps(av, b1, ci[1]);
        }
    }
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

/// Copies `rows × k` of A (`at(i, p)`) into `[k][MR]`, zero beyond `rows`: the tail tile's operand.
fn pad_a(rows: usize, k: usize, at: impl Fn(usize, usize) -> f32, out: &mut Vec<f32>) {
    out.clear();
    out.resize(k * MR, 0.0);
    for p in 0..k {
        for i in 0..rows {
            out[p * MR + i] = at(i, p);
        }
    }
}

/// Most bytes of packed hidden rows the logits GEMM keeps in use at once (half of Zen 4's 1 MiB L2).
const HP_GROUP_BYTES: usize = 512 << 10;

/// Packs the gathered hidden rows for the logits GEMM: panels of 32 rows, `[k][32]` (a transpose).
pub(crate) fn pack_hidden_for_logits<'a>(
    row: impl Fn(usize) -> &'a [f32],
    rows: usize,
    h: usize,
    out: &mut Vec<f32>,
) {
    let panels = ceil_div(rows, NR);
    out.clear();
    out.resize(panels * h * NR, 0.0);
    for r in 0..rows {
        let (q, j) = (r / NR, r % NR);
        let panel = &mut out[q * h * NR..(q + 1) * h * NR];
        for (p, &x) in row(r)[..h].iter().enumerate() {
            panel[p * NR + j] = x;
        }
    }
}

/// GEMM 1: `logits[j, v] = Σ_k hidden_j[k] · W[v, k]` for j < rows; W read in place (`ws` between rows),
/// hidden packed by [`pack_hidden_for_logits`].
#[allow(clippy::too_many_arguments)]
pub(crate) fn logits(
    _cpu: Avx512Token,
    w: &[f32],
    ws: usize,
    v: usize,
    h: usize,
    hp: &[f32],
    rows: usize,
    out: &mut [f32],
    parallel: bool,
) {
    let panels = ceil_div(rows, NR);
    assert!(ws >= h && holds_view(w.len(), v, h, ws), "logits: weight");
    assert!(
        holds(hp.len(), panels, h * NR) && holds(out.len(), rows, v),
        "logits: buffers"
    );
    let dst = SharedMut(out.as_mut_ptr());
    // Panels of `hp` in groups of at most HP_GROUP_BYTES, each group swept over all of this thread's W rows: the
    // group stays in L2 while W streams through (W is read once per group).
    let per_group = (HP_GROUP_BYTES / (h * NR * size_of::<f32>()).max(1)).clamp(1, panels.max(1));
    let per_group = ceil_div(panels, ceil_div(panels, per_group).max(1)).max(1);
    split(parallel, v, MR, PIECES_PER_THREAD, |v_start, v_end| {
        let mut tail = Vec::new();
        for g0 in (0..panels).step_by(per_group) {
            for v0 in (v_start..v_end).step_by(MR) {
                let mrows = MR.min(v_end - v0);
                let (a, a_rs, a_ks) = if mrows == MR {
                    (w[v0 * ws..].as_ptr(), ws, 1)
                } else {
                    pad_a(mrows, h, |i, p| w[(v0 + i) * ws + p], &mut tail);
                    (tail.as_ptr(), 1, MR)
                };
                for q in g0..panels.min(g0 + per_group) {
                    // SAFETY: the CPU has avx512f (the caller holds an Avx512Token); A reads W's rows v0..v0+MR up
                    // to column h (full tile, asserted above) or `tail`; B reads panel q of `hp`; rows q·32 + j <
                    // rows and columns v0 + i < v0 + mrows <= v_end <= v lie in `out` (asserted), and this thread
                    // owns columns [v_start, v_end).
                    unsafe {
                        micro_t(
                            h,
                            a,
                            (a_rs, a_ks),
                            (hp[q * h * NR..].as_ptr(), NR),
                            dst.at(q * NR * v + v0),
                            v,
                            mrows,
                            NR.min(rows - q * NR),
                        )
                    };
                }
            }
        }
    });
}

/// GEMM 2: `dh[j, :] = Σ_v g[j, v] · W[v, :]` for j < rows (`g` row-major with `v` columns).
#[allow(clippy::too_many_arguments)]
pub(crate) fn d_hidden(
    _cpu: Avx512Token,
    g: &[f32],
    rows: usize,
    w: &[f32],
    ws: usize,
    v: usize,
    h: usize,
    dh: &mut [f32],
    parallel: bool,
) {
    assert!(
        holds(g.len(), rows, v) && holds(dh.len(), rows, h),
        "d_hidden: buffers"
    );
    assert!(ws >= h && holds_view(w.len(), v, h, ws), "d_hidden: weight");
    split_d_hidden(parallel, rows, v, h, K_BLOCK, NR, dh, |ks, hs, dst| {
        // SAFETY: the CPU has avx512f (the token); `split_d_hidden` hands each piece a rows·h block (`dh` or its
        // own partial sum) whose columns `hs` no other piece writes.
        unsafe { block(g, rows, w, ws, v, h, ks, hs, dst) }
    });
}

/// `dh[j, c] = Σ_{v in k range} g[j, v] · W[v, c]` for j < rows and c in the column range, into `dst` (row-major,
/// `h` between rows).
///
/// # Safety
/// The CPU must support avx512f; `dst` must hold rows·h floats whose columns in the range no other thread touches.
#[allow(clippy::too_many_arguments)]
unsafe fn block(
    g: &[f32],
    rows: usize,
    w: &[f32],
    ws: usize,
    v: usize,
    h: usize,
    (k_start, k_end): (usize, usize),
    (h_start, h_end): (usize, usize),
    dst: SharedMut,
) {
    let (mut tail_a, mut bp) = (Vec::new(), Vec::new());
    let mut tile = [0f32; MR * NR];
    let panels = ceil_div(h_end - h_start, NR);
    for k0 in (k_start..k_end).step_by(K_BLOCK) {
        let kc = K_BLOCK.min(k_end - k0);
        // This block of W, packed as contiguous 32-column panels `[k][32]`: read in place, W's rows would be
        // a power-of-two stride apart for common H and fight over the same cache sets.
        bp.clear();
        bp.resize(panels * kc * NR, 0.0);
        for p in 0..kc {
            let src = &w[(k0 + p) * ws + h_start..(k0 + p) * ws + h_end];
            for (q, chunk) in src.chunks(NR).enumerate() {
                bp[(q * kc + p) * NR..(q * kc + p) * NR + chunk.len()].copy_from_slice(chunk);
            }
        }
        for r0 in (0..rows).step_by(MR) {
            let mrows = MR.min(rows - r0);
            let (a, a_rs, a_ks) = if mrows == MR {
                (g[r0 * v + k0..].as_ptr(), v, 1)
            } else {
                pad_a(mrows, kc, |i, p| g[(r0 + i) * v + k0 + p], &mut tail_a);
                (tail_a.as_ptr(), 1, MR)
            };
            for q in 0..panels {
                let h0 = h_start + q * NR;
                if mrows == MR && h0 + NR <= h_end {
                    let next = if h0 + 2 * NR <= h_end {
                        r0 * h + h0 + NR
                    } else {
                        (r0 + MR) * h + h_start
                    };
                    // SAFETY: the CPU has avx512f; A reads rows r0..r0+MR of `g`, columns k0..k0+kc; B reads
                    // panel q of `bp` (kc·32 floats); the full tile's rows r0..r0+MR <= rows and columns
                    // h0..h0+32 <= h_end <= h lie in `dh`, and this thread owns columns [h_start, h_end).
                    unsafe {
                        micro_c(
                            kc,
                            a,
                            a_rs,
                            a_ks,
                            (bp[q * kc * NR..].as_ptr(), NR),
                            dst.at(r0 * h + h0),
                            h,
                            k0 > k_start,
                            dst.at(next),
                        )
                    };
                    continue;
                }
                // SAFETY: the CPU has avx512f; A reads rows r0..r0+MR of `g`, columns k0..k0+kc (full tile) or
                // `tail_a`; B reads panel q of `bp` (kc·32 floats).
                unsafe { micro(kc, a, a_rs, a_ks, bp[q * kc * NR..].as_ptr(), NR, &mut tile) };
                // SAFETY: rows r0.. < rows and columns h0.. < h_end <= h lie in `dh`; this thread owns columns
                // [h_start, h_end).
                unsafe {
                    store_rows(
                        &tile,
                        dst.at(r0 * h + h0),
                        h,
                        mrows,
                        NR.min(h_end - h0),
                        k0 > k_start,
                    )
                };
            }
        }
    }
}

/// Most rows of G the d_weight GEMM reads in place: each k-step of a tile touches one line of a different row
/// (`4v` bytes apart), reused across all of H's panels while they stay cached and in the TLB. Measured at
/// H = 256, V = 128256: in place 20% faster than packing at 123–256 rows, 5–25% at 512, 2.3x slower at 2048.
const IN_PLACE_G_ROWS: usize = 512;

/// GEMM 3: `dw[v, :] += Σ_j g[j, v] · hb[j, :]` for j < rows (`hb` the gathered hidden rows, `h` apart). `bp` is
/// scratch for `hb` packed as 32-column panels `[rows][32]` (contiguous, so a panel streams through the cache
/// instead of touching `rows` lines `4h` bytes apart).
#[allow(clippy::too_many_arguments)]
pub(crate) fn d_weight(
    _cpu: Avx512Token,
    g: &[f32],
    rows: usize,
    v: usize,
    h: usize,
    hb: &[f32],
    dw: &mut [f32],
    bp: &mut Vec<f32>,
    parallel: bool,
) {
    assert!(
        holds(g.len(), rows, v) && holds(hb.len(), rows, h) && holds(dw.len(), v, h),
        "d_weight: buffers"
    );
    let panels = ceil_div(h, NR);
    let per_panel = rows * NR;
    bp.clear();
    bp.resize(panels * per_panel, 0.0);
    for p in 0..rows {
        for (q, chunk) in hb[p * h..(p + 1) * h].chunks(NR).enumerate() {
            bp[q * per_panel + p * NR..q * per_panel + p * NR + chunk.len()].copy_from_slice(chunk);
        }
    }
    let bp: &[f32] = bp;
    let dst = SharedMut(dw.as_mut_ptr());
    split(parallel, v, MR, PIECES_PER_THREAD, |v_start, v_end| {
        let mut ap = Vec::new();
        let mut tile = [0f32; MR * NR];
        for v0 in (v_start..v_end).step_by(MR) {
            let mrows = MR.min(v_end - v0);
            // A full tile of a short block reads its MR columns of G in place (row p's MR values are contiguous);
            // otherwise they are packed `[rows][MR]`, zero beyond mrows.
            let (a, a_ks) = if mrows == MR && rows <= IN_PLACE_G_ROWS {
                (g[v0..].as_ptr(), v)
            } else {
                pad_a(mrows, rows, |i, p| g[p * v + v0 + i], &mut ap);
                (ap.as_ptr(), MR)
            };
            for q in 0..panels {
                let h0 = q * NR;
                let ncols = NR.min(h - h0);
                let b = bp[q * per_panel..].as_ptr();
                if mrows == MR && ncols == NR {
                    // The next tile's C: the next panel of these rows, or the first panel of the next rows.
                    let next = if q + 1 < panels {
                        v0 * h + h0 + NR
                    } else {
                        (v0 + MR) * h
                    };
                    // SAFETY: the CPU has avx512f; A reads `ap` (rows·MR floats), B panel q of `bp`; the full
                    // tile's rows v0..v0+MR <= v_end <= v and columns h0..h0+32 <= h lie in `dw` (asserted), and
                    // this thread owns rows [v_start, v_end).
                    unsafe {
                        micro_c(
                            rows,
                            a,
                            1,
                            a_ks,
                            (b, NR),
                            dst.at(v0 * h + h0),
                            h,
                            true,
                            dst.at(next),
                        )
                    };
                    continue;
                }
                // SAFETY: the CPU has avx512f; A reads `ap`, B panel q of `bp` (zero-padded past h).
                unsafe { micro(rows, a, 1, a_ks, b, NR, &mut tile) };
                // SAFETY: rows v0.. < v_end <= v and columns h0.. < h lie in `dw`; this thread owns rows
                // [v_start, v_end).
                unsafe { store_rows(&tile, dst.at(v0 * h + h0), h, mrows, ncols, true) };
            }
        }
    });
}

/// Best-of-`reps` seconds of each of the three GEMMs above at full size (`n` rows at once) on synthetic data: the
/// f32 engine's own rate, for the throughput benchmark's ratio.
pub(crate) fn time_three(cpu: Avx512Token, n: usize, h: usize, v: usize, reps: usize) -> [f64; 3] {
    let x: Vec<f32> = (0..n * h)
        .map(|i| ((i % 97) as f32 - 48.0) / 64.0)
        .collect();
    let w: Vec<f32> = (0..v * h)
        .map(|i| ((i % 89) as f32 - 44.0) / 512.0)
        .collect();
    let mut g = vec![0.0f32; n * v];
    let mut dh = vec![0.0f32; n * h];
    let mut dw = vec![0.0f32; v * h];
    // Mapped before timing (a first touch inside a timed GEMM would bill it for page faults).
    crate::pages::fill(&mut g, 0.0, true);
    crate::pages::fill(&mut dh, 0.0, true);
    crate::pages::fill(&mut dw, 0.0, true);
    let mut hp = Vec::new();
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
        pack_hidden_for_logits(|j| &x[j * h..(j + 1) * h], n, h, &mut hp);
        logits(cpu, &w, h, v, h, &hp, n, &mut g, true);
    });
    let t2 = best(&mut || d_hidden(cpu, &g, n, &w, h, v, h, &mut dh, true));
    let mut bp = Vec::new();
    let t3 = best(&mut || d_weight(cpu, &g, n, v, h, &x, &mut dw, &mut bp, true));
    [t1, t2, t3]
}
