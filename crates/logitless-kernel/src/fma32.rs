//! f32 GEMMs on AVX-512 FMA for the three products of the fused kernel, with the same tiling as `dpbf16.rs`
//! (12×32 micro-tiles, 24 accumulators) but reading f32 operands in place where they are laid out right — no
//! packing except the hidden block for the logits GEMM and zero-padded copies of tail tiles. x86-64 only; used
//! for f32 when `isa::current()` is an AVX-512 level.

use crate::dpbf16::{MR, NR, SharedMut, ceil_div, split, store_rows};
use std::arch::x86_64::*;

/// k rows per block of the d_hidden GEMM (its k is the vocabulary): a 12×128 A tile (6 KiB) and a 128×32 B
/// panel (16 KiB) stay in L1 together.
const K_BLOCK: usize = 128;

/// `acc[i][j] = Σ_p A(i, p) · B(p, j)` for p < k, i < MR, j < 32, where A(i, p) is at `a + i·a_rs + p·a_ks` and
/// B(p, ·) is the 32 floats at `b + p·b_ks`.
///
/// # Safety
/// The CPU must support avx512f, and every address above must be readable.
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
unsafe fn micro(
    k: usize,
    a: *const f32,
    a_rs: usize,
    a_ks: usize,
    b: *const f32,
    b_ks: usize,
    out: &mut [f32; MR * NR],
) {
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
    for (i, ci) in c.iter().enumerate() {
        // SAFETY: `out` holds MR·NR f32 and row i's 32 values are at i·NR.
        unsafe {
            _mm512_storeu_ps(out.as_mut_ptr().add(i * NR), ci[0]);
            _mm512_storeu_ps(out.as_mut_ptr().add(i * NR + 16), ci[1]);
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

/// Copies `k × cols` of B (`row(p)` starting at the panel's first column) into `[k][32]`, zero beyond `cols`.
fn pad_b<'a>(k: usize, cols: usize, row: impl Fn(usize) -> &'a [f32], out: &mut Vec<f32>) {
    out.clear();
    out.resize(k * NR, 0.0);
    for p in 0..k {
        out[p * NR..p * NR + cols].copy_from_slice(&row(p)[..cols]);
    }
}

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
    assert!(
        ws >= h && (v == 0 || w.len() >= (v - 1) * ws + h),
        "logits: weight"
    );
    assert!(
        hp.len() >= panels * h * NR && out.len() >= rows * v,
        "logits: buffers"
    );
    let dst = SharedMut(out.as_mut_ptr());
    split(parallel, v, MR, |v_start, v_end| {
        let mut tail = Vec::new();
        let mut tile = [0f32; MR * NR];
        for v0 in (v_start..v_end).step_by(MR) {
            let mrows = MR.min(v_end - v0);
            let (a, a_rs, a_ks) = if mrows == MR {
                (w[v0 * ws..].as_ptr(), ws, 1)
            } else {
                pad_a(mrows, h, |i, p| w[(v0 + i) * ws + p], &mut tail);
                (tail.as_ptr(), 1, MR)
            };
            for q in 0..panels {
                // SAFETY: the CPU has avx512f (module invariant); A reads W's rows v0..v0+MR up to column h (full
                // tile, asserted above) or `tail`; B reads panel q of `hp`.
                unsafe { micro(h, a, a_rs, a_ks, hp[q * h * NR..].as_ptr(), NR, &mut tile) };
                for j in 0..NR.min(rows - q * NR) {
                    for i in 0..mrows {
                        // SAFETY: row q·32+j < rows and column v0+i < v lie in `out` (asserted); this thread owns
                        // columns [v_start, v_end).
                        unsafe { *dst.at((q * NR + j) * v + v0 + i) = tile[i * NR + j] };
                    }
                }
            }
        }
    });
}

/// GEMM 2: `dh[j, :] = Σ_v g[j, v] · W[v, :]` for j < rows (`g` row-major with `v` columns).
#[allow(clippy::too_many_arguments)]
pub(crate) fn d_hidden(
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
        g.len() >= rows * v && dh.len() >= rows * h,
        "d_hidden: buffers"
    );
    assert!(
        ws >= h && (v == 0 || w.len() >= (v - 1) * ws + h),
        "d_hidden: weight"
    );
    let dst = SharedMut(dh.as_mut_ptr());
    split(parallel, h, NR, |h_start, h_end| {
        let (mut tail_a, mut bp) = (Vec::new(), Vec::new());
        let mut tile = [0f32; MR * NR];
        let panels = ceil_div(h_end - h_start, NR);
        for k0 in (0..v).step_by(K_BLOCK) {
            let kc = K_BLOCK.min(v - k0);
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
                            k0 > 0,
                        )
                    };
                }
            }
        }
    });
}

/// GEMM 3: `dw[v, :] += Σ_j g[j, v] · hb[j, :]` for j < rows (`hb` the gathered hidden rows, `h` apart).
#[allow(clippy::too_many_arguments)]
pub(crate) fn d_weight(
    g: &[f32],
    rows: usize,
    v: usize,
    h: usize,
    hb: &[f32],
    dw: &mut [f32],
    parallel: bool,
) {
    assert!(
        g.len() >= rows * v && hb.len() >= rows * h && dw.len() >= v * h,
        "d_weight: buffers"
    );
    let dst = SharedMut(dw.as_mut_ptr());
    split(parallel, v, MR, |v_start, v_end| {
        let (mut tail_a, mut tail_b) = (Vec::new(), Vec::new());
        let mut tile = [0f32; MR * NR];
        // The last, partial panel of H is the same for every tile: pad it once.
        let last = h - h % NR;
        if last < h {
            pad_b(rows, h - last, |p| &hb[p * h + last..], &mut tail_b);
        }
        for v0 in (v_start..v_end).step_by(MR) {
            let mrows = MR.min(v_end - v0);
            let (a, a_rs, a_ks) = if mrows == MR {
                (g[v0..].as_ptr(), 1, v)
            } else {
                pad_a(mrows, rows, |i, p| g[p * v + v0 + i], &mut tail_a);
                (tail_a.as_ptr(), 1, MR)
            };
            for h0 in (0..h).step_by(NR) {
                let ncols = NR.min(h - h0);
                let (b, b_ks) = if ncols == NR {
                    (hb[h0..].as_ptr(), h)
                } else {
                    (tail_b.as_ptr(), NR)
                };
                // SAFETY: the CPU has avx512f; A reads g[p·v + v0 + i] for p < rows, i < MR (full tile: v0+MR <=
                // v) or `tail_a`; B reads hb rows 0..rows, columns h0..h0+32 <= h (full panel) or `tail_b`.
                unsafe { micro(rows, a, a_rs, a_ks, b, b_ks, &mut tile) };
                // SAFETY: rows v0.. < v_end <= v and columns h0.. < h lie in `dw`; this thread owns rows
                // [v_start, v_end).
                unsafe { store_rows(&tile, dst.at(v0 * h + h0), h, mrows, ncols, true) };
            }
        }
    });
}

/// Best-of-`reps` seconds of each of the three GEMMs above at full size (`n` rows at once) on synthetic data: the
/// f32 engine's own rate, for the throughput benchmark's ratio.
pub(crate) fn time_three(n: usize, h: usize, v: usize, reps: usize) -> [f64; 3] {
    let x: Vec<f32> = (0..n * h)
        .map(|i| ((i % 97) as f32 - 48.0) / 64.0)
        .collect();
    let w: Vec<f32> = (0..v * h)
        .map(|i| ((i % 89) as f32 - 44.0) / 512.0)
        .collect();
    let mut g = vec![0.0f32; n * v];
    let mut dh = vec![0.0f32; n * h];
    let mut dw = vec![0.0f32; v * h];
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
        logits(&w, h, v, h, &hp, n, &mut g, true);
    });
    let t2 = best(&mut || d_hidden(&g, n, &w, h, v, h, &mut dh, true));
    let t3 = best(&mut || d_weight(&g, n, v, h, &x, &mut dw, true));
    [t1, t2, t3]
}
