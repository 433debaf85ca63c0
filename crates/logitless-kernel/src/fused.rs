//! The driver: row blocks of non-ignored rows, each with its full `[rows, V]` logits block in scratch.
//!
//! Per block: logits = H_b·Wᵀ (GEMM 1), per-row epilogue/LSE/loss/gradient in place, d_hidden_b = G·W (GEMM 2,
//! complete for the block), d_weight += Gᵀ·H_b (GEMM 3), d_bias += column sums of G. The GEMM engine splits each
//! product across threads by output tiles, so threads never write the same element (our engines' d_hidden
//! also over V, each piece into its own partial sum, added at the end). f32 runs on our FMA engine for short
//! blocks of narrow heads and on the gemm crate's kernels from `FMA32_MAX_BLOCK` rows × H.
//!
//! Memory: the block's logits, gathered hidden rows and d_hidden rows (and, for bf16/f16, a converted chunk of
//! W) fit in `chunk_budget_bytes`, with at least one row whatever the budget. For bf16/f16 weights with a
//! wanted d_weight, a V×H f32 accumulator is added on top (the weight gradient is cast once at the end); on the
//! AVX512_BF16 path its upper 16 bits live in the caller's bf16 d_weight and only the lower 16 are scratch.

use crate::isa::{self, Isa};
use crate::matmul::{Layout, matmul};
use crate::pages::{fill, hint_huge_pages};
use crate::rowpass::{RowParams, RowStats, process_row};
use crate::storage::{Real, Storage};
#[cfg(target_arch = "x86_64")]
use crate::storage::{as_f32, as_f32_mut};
use crate::weight_pass::{self, ActiveRow};
use crate::{
    GradScale, Grads, Job, LossSummary, LowRank, MatRef, RowOutputs, TOKEN_STATS, WeightGrad,
};
use rayon::prelude::*;
use std::any::TypeId;

/// `x` seen as the compute type, when storage and compute type are the same (f32, f64).
fn as_compute<S: Storage>(x: &[S]) -> Option<&[S::C]> {
    if TypeId::of::<S>() == TypeId::of::<S::C>() {
        // SAFETY: S and S::C are the same type, so the pointer, length and alignment are valid for S::C.
        Some(unsafe { std::slice::from_raw_parts(x.as_ptr().cast::<S::C>(), x.len()) })
    } else {
        None
    }
}

fn as_compute_mut<S: Storage>(x: &mut [S]) -> Option<&mut [S::C]> {
    if TypeId::of::<S>() == TypeId::of::<S::C>() {
        // SAFETY: S and S::C are the same type; the exclusive borrow moves into the returned slice.
        Some(unsafe { std::slice::from_raw_parts_mut(x.as_mut_ptr().cast::<S::C>(), x.len()) })
    } else {
        None
    }
}

/// f32 data as the compute type, when that is f32 (a low-rank term is refused for f64 before any work).
fn f32_as_compute<C: 'static>(x: &[f32]) -> Option<&[C]> {
    if TypeId::of::<C>() == TypeId::of::<f32>() {
        // SAFETY: C is f32 (checked), so pointer, length and alignment carry over.
        Some(unsafe { std::slice::from_raw_parts(x.as_ptr().cast::<C>(), x.len()) })
    } else {
        None
    }
}

fn f32_as_compute_mut<C: 'static>(x: &mut [f32]) -> Option<&mut [C]> {
    if TypeId::of::<C>() == TypeId::of::<f32>() {
        // SAFETY: C is f32 (checked); the exclusive borrow moves into the returned slice.
        Some(unsafe { std::slice::from_raw_parts_mut(x.as_mut_ptr().cast::<C>(), x.len()) })
    } else {
        None
    }
}

/// A [`LowRank`] term in the compute type: `a` (N × r, row stride `a_stride`), `b` (V × r, `b_stride`).
struct Low<'a, C> {
    a: &'a [C],
    a_stride: usize,
    b: &'a [C],
    b_stride: usize,
    rank: usize,
    d_a: Option<&'a mut [C]>,
    d_b: Option<&'a mut [C]>,
}

impl<'a, C: 'static> Low<'a, C> {
    /// `None` when there is no term; also when the compute type is not f32, which validation refuses first.
    fn of(low: Option<LowRank<'a>>) -> Option<Self> {
        let LowRank { a, b, d_a, d_b } = low?;
        Some(Self {
            a: f32_as_compute(a.data())?,
            a_stride: a.row_stride(),
            b: f32_as_compute(b.data())?,
            b_stride: b.row_stride(),
            rank: b.cols(),
            d_a: match d_a {
                Some(d) => Some(f32_as_compute_mut(d)?),
                None => None,
            },
            d_b: match d_b {
                Some(d) => Some(f32_as_compute_mut(d)?),
                None => None,
            },
        })
    }
}

/// `x` as bf16, when the storage type is bf16.
#[cfg(target_arch = "x86_64")]
fn as_bf16<S: Storage>(x: &[S]) -> Option<&[half::bf16]> {
    if TypeId::of::<S>() == TypeId::of::<half::bf16>() {
        // SAFETY: S is bf16 (checked), so pointer, length and alignment carry over.
        Some(unsafe { std::slice::from_raw_parts(x.as_ptr().cast::<half::bf16>(), x.len()) })
    } else {
        None
    }
}

/// `x`'s bits as u16, when the storage type is bf16 (the split d_weight accumulator's upper plane).
#[cfg(target_arch = "x86_64")]
fn as_bf16_bits_mut<S: Storage>(x: &mut [S]) -> Option<&mut [u16]> {
    if TypeId::of::<S>() == TypeId::of::<half::bf16>() {
        // SAFETY: S is bf16 (checked), a 16-bit plain-data type like u16: same size and alignment, every bit
        // pattern valid both ways; the exclusive borrow moves into the result.
        Some(unsafe { std::slice::from_raw_parts_mut(x.as_mut_ptr().cast::<u16>(), x.len()) })
    } else {
        None
    }
}

/// Vocabulary columns per call of the f32/f64 engine in the logits GEMM (bounds the engine's packing buffer to
/// about `H·ENGINE_COLUMNS` elements).
const ENGINE_COLUMNS: usize = 2048;

/// A row's loss, softmax constants and token statistics, as the row pass leaves them.
type RowOut<C> = (f64, RowStats<C>, [f64; TOKEN_STATS]);
/// One row of a block in the row pass: its index in the block, its logits, where its results go.
type RowItem<'a, C> = (usize, (&'a mut [C], &'a mut RowOut<C>));

/// How the budget is split.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Plan {
    /// Rows per block.
    pub rows: usize,
    /// W rows converted to the compute type at a time (bf16/f16 only; 0 for f32/f64).
    pub w_chunk: usize,
}

/// Rows × H of a row block from which f32 goes to the gemm crate's GEMMs (AVX-512 kernels of their own, with
/// cache blocking) instead of our FMA engine, which wins on short blocks of narrow heads by reading W and the
/// gradient in place. Fused call, 2-core Xeon (`throughput N H V f32`, `THROUGHPUT_BUDGET_MB` for the rows),
/// FMA engine vs gemm crate, rows × H (V 32000 unless said):
/// - 119 × 256 (V 128256): 2.6 vs 3.0 s;
/// - 96 × 1024: 1.07 vs 1.69 s; 192 × 1024: 1.06 vs 1.02 s; 416 × 1024: 1.08 vs 0.88 s;
/// - 115 × 2048: 2.06–2.12 vs 2.13–2.27 s; 230 × 2048: 1.78–1.80 vs 1.67–1.74 s; 384 × 2048: 2.1 vs 1.7 s;
/// - 116 × 4096: 4.5–4.9 vs 4.4 s; 448 × 4096: 4.1–4.6 vs 3.4–3.5 s.
const FMA32_MAX_BLOCK: usize = 1 << 18;

#[allow(clippy::too_many_arguments)]
pub(crate) fn plan<S: Storage>(
    budget: usize,
    v: usize,
    h: usize,
    active: usize,
    want_dh: bool,
    dpbf16: bool,
    fma32: bool,
    dh_parts: usize,
) -> Plan {
    let c = size_of::<S::C>();
    let w_chunk = if S::NATIVE || dpbf16 {
        0
    } else {
        (budget / 4 / (h * c).max(1)).clamp(1, v.max(1))
    };
    // Per row: its logits (rounded to bf16 in place for the AVX512_BF16 GEMMs), its hidden row (widened, packed
    // for the FMA engine, or packed twice as bf16 pairs), its d_hidden row (and `dh_parts` partial ones).
    let per_row =
        c * (v + h + if want_dh { h * (1 + dh_parts) } else { 0 }) + if fma32 { c * h } else { 0 };
    // Fixed: bias and d_bias vectors, the widened W chunk, and the GEMM packing buffers (the bf16 path packs 256
    // rows of W at a time).
    // The f32/f64 engine packs up to about min(H, 512) × ENGINE_COLUMNS elements per call.
    let engine = if dpbf16 {
        256 * h * 2
    } else if fma32 {
        0
    } else {
        ENGINE_COLUMNS * h.min(512) * c
    };
    let fixed = w_chunk * h * c + 2 * v * c + engine;
    let left = budget.saturating_sub(fixed);
    let mut rows = (left / per_row.max(1)).clamp(1, active.max(1));
    // The AVX-512 engines' logits GEMM puts 32 rows in each vector panel: a partial last panel wastes lanes.
    // Round down to whole panels unless that gives up more than an eighth of the rows (each block re-reads W
    // and d_weight, so fewer rows cost memory traffic).
    if (dpbf16 || fma32) && rows >= 32 && rows < active && (rows - rows % 32) * 8 >= rows * 7 {
        rows -= rows % 32;
    }
    Plan { rows, w_chunk }
}

pub(crate) fn run<S: Storage>(
    job: Job<'_, S>,
    rows: RowOutputs<'_>,
    grads: Grads<'_, S>,
    low: Option<LowRank<'_>>,
) -> LossSummary {
    let Job {
        hidden,
        weight,
        bias,
        targets,
        options,
        grad_scale,
    } = job;
    let (n, h, v) = (hidden.rows(), hidden.cols(), weight.rows());
    let level = isa::level();
    let isa = level.isa();
    let parallel = options.parallel;
    let ignore = options.ignore_index;
    let Grads {
        mut d_hidden,
        mut d_weight,
        mut d_bias,
    } = grads;
    let (want_dh, want_dw, want_db) = (d_hidden.is_some(), d_weight.is_some(), d_bias.is_some());
    let mut low = Low::<S::C>::of(low);
    let want_low = low
        .as_ref()
        .is_some_and(|l| l.d_a.is_some() || l.d_b.is_some());
    let want_grad = want_dh || want_dw || want_db || want_low;

    let RowOutputs {
        loss: mut per_row_loss,
        stats: mut token_stats,
    } = rows;
    let mut prof = Profile::new(options.profile);
    if let Some(st) = token_stats.as_deref_mut() {
        st.fill(0.0);
    }
    if let Some(l) = per_row_loss.as_deref_mut() {
        l.fill(0.0);
    }
    for g in [
        d_hidden.as_deref_mut(),
        d_weight.as_deref_mut(),
        d_bias.as_deref_mut(),
    ]
    .into_iter()
    .flatten()
    {
        fill(g, S::zero(), parallel);
    }
    if let Some(l) = low.as_mut() {
        for g in [l.d_a.as_deref_mut(), l.d_b.as_deref_mut()]
            .into_iter()
            .flatten()
        {
            fill(g, S::C::ZERO, parallel);
        }
    }
    let active = targets.iter().filter(|&&t| t != ignore).count();
    if active == 0 {
        return LossSummary {
            loss_sum: 0.0,
            count: 0,
        };
    }

    let ws = weight.row_stride();
    // The AVX512_BF16 path reads W's bf16 pairs in place: it needs even H and row stride.
    #[cfg(target_arch = "x86_64")]
    let dp = match (level.bf16(), as_bf16(weight.data()), as_bf16(hidden.data())) {
        (Some(cpu), Some(w), Some(x)) if h % 2 == 0 && ws % 2 == 0 && ws >= h && h > 0 => {
            Some((cpu, w, x))
        }
        _ => None,
    };
    #[cfg(not(target_arch = "x86_64"))]
    let dp: Option<((), (), ())> = None;
    // f32 on AVX-512: our FMA engine, which reads W and the gradient in place. H == 0 (the logits are the bias)
    // takes the `gemm` crate's path, which every ISA path runs (tests/isa_paths.rs).
    #[cfg(target_arch = "x86_64")]
    let mut fma: Option<(crate::isa::Avx512Token, &[f32])> = match level.avx512() {
        Some(cpu) if ws >= h && h > 0 => as_f32(weight.data()).map(|w| (cpu, w)),
        _ => None,
    };
    #[cfg(not(target_arch = "x86_64"))]
    let mut fma: Option<()> = None;
    let plan_with = |fma32: bool| {
        // Our engines' d_hidden adds a partial sum per piece over V beyond the first.
        #[cfg(target_arch = "x86_64")]
        let dh_parts = if (fma32 || dp.is_some()) && want_dh && parallel {
            crate::dpbf16::d_hidden_v_pieces(v, h, rayon::current_num_threads()) - 1
        } else {
            0
        };
        #[cfg(not(target_arch = "x86_64"))]
        let dh_parts = 0;
        plan::<S>(
            options.chunk_budget_bytes,
            v,
            h,
            active,
            want_dh,
            dp.is_some(),
            fma32,
            dh_parts,
        )
    };
    let mut plan = plan_with(fma.is_some());
    if fma.is_some() && plan.rows.saturating_mul(h) >= FMA32_MAX_BLOCK {
        fma = None;
        plan = plan_with(false);
    }
    let r_max = plan.rows;
    let epi = &options.epilogue;
    let nonzero = |x: Option<f32>| x.filter(|&x| x != 0.0).map(f64::from);
    let softcap = nonzero(epi.softcap);
    // A temperature after no softcap is one more divisor of the linear scale; after a softcap it is its own step.
    let temperature = nonzero(epi.temperature).filter(|&t| t != 1.0);
    let pre_temperature = if softcap.is_none() { temperature } else { None };
    let scale = match (
        nonzero(epi.scale_multiply),
        nonzero(epi.scale_divide),
        pre_temperature,
    ) {
        (None, None, None) => None,
        (m, d, t) => Some(S::C::from_f64(
            m.unwrap_or(1.0) / d.unwrap_or(1.0) / t.unwrap_or(1.0),
        )),
    };
    let bias_c: Option<Vec<S::C>> = bias.map(|b| {
        let mut out = vec![S::C::ZERO; v];
        S::load(b, &mut out);
        out
    });
    let params = RowParams {
        bias: bias_c.as_deref(),
        logits_bias: epi.logits_bias,
        scale,
        softcap: softcap.map(S::C::from_f64),
        post_scale: softcap.and(temperature).map(|t| S::C::from_f64(1.0 / t)),
        smoothing: f64::from(options.label_smoothing),
        z_loss: f64::from(options.z_loss),
        want_stats: token_stats.is_some(),
    };

    let w_native = as_compute(weight.data());
    let mut logits = vec![S::C::ZERO; r_max * v];
    hint_huge_pages(&mut logits);
    let mut hb = vec![S::C::ZERO; if dp.is_some() { 0 } else { r_max * h }];
    let (mut hp1, mut hp3): (Vec<u32>, Vec<u32>) = (Vec::new(), Vec::new());
    let mut hpf: Vec<f32> = Vec::new();
    // Row stride of the bf16 gradient for the AVX512_BF16 GEMMs: each row is rounded into the front of its own
    // f32 row (`dpbf16::round_row_in_place`).
    let gs = 2 * v;
    let mut dhb = if want_dh {
        vec![S::C::ZERO; r_max * h]
    } else {
        Vec::new()
    };
    let mut wc = vec![S::C::ZERO; plan.w_chunk * h];
    let mut db_acc = if want_db {
        vec![S::C::ZERO; v]
    } else {
        Vec::new()
    };
    // bf16/f16 weight gradients: in the row blocks into a V×H f32 accumulator, or in a later slab pass.
    let recompute_dw =
        want_dw && w_native.is_none() && options.weight_grad == WeightGrad::Recompute;
    let dw_in_blocks = want_dw && !recompute_dw;
    let mut active_rows: Vec<ActiveRow<S::C>> = Vec::new();
    // On the AVX512_BF16 path the accumulator is split: upper halves in the caller's (zeroed) bf16 output, lower
    // halves in `dw_lo`, which halves its memory for the same f32 sums. Elsewhere it is a plain f32 matrix.
    let split_dw = dw_in_blocks && dp.is_some();
    let mut dw_lo: Vec<u16> = if split_dw {
        let mut lo = vec![0u16; v * h];
        fill(&mut lo, 0, parallel);
        lo
    } else {
        Vec::new()
    };
    let mut dw_acc = if dw_in_blocks && w_native.is_none() && !split_dw {
        let mut acc = vec![S::C::ZERO; v * h];
        fill(&mut acc, S::C::ZERO, parallel);
        acc
    } else {
        Vec::new()
    };
    let no_stats = RowStats {
        max: S::C::ZERO,
        a: S::C::ZERO,
    };
    let mut losses = vec![(0.0f64, no_stats, [0.0f64; TOKEN_STATS]); r_max];
    // The low-rank term's rows of `a` for the block, and the block's rows of its gradient.
    let rank = low.as_ref().map_or(0, |l| l.rank);
    let mut ab = vec![S::C::ZERO; r_max * rank];
    let mut dab = vec![S::C::ZERO; if want_low { r_max * rank } else { 0 }];
    prof.lap(5);
    let mut idx: Vec<usize> = Vec::with_capacity(r_max);

    let mut loss_sum = 0.0f64;
    let mut next = 0usize;
    loop {
        idx.clear();
        while idx.len() < r_max && next < n {
            if targets[next] != ignore {
                idx.push(next);
            }
            next += 1;
        }
        if idx.is_empty() {
            break;
        }
        let r = idx.len();
        if dp.is_none() {
            for (j, &i) in idx.iter().enumerate() {
                S::load(hidden.row(i), &mut hb[j * h..(j + 1) * h]);
            }
        }
        let hb = &hb[..if dp.is_some() { 0 } else { r * h }];
        let lg = &mut logits[..r * v];

        // GEMM 1: logits = H_b · Wᵀ.
        #[cfg(target_arch = "x86_64")]
        if let Some((cpu, w16, x16)) = dp {
            let hs = hidden.row_stride();
            let row = |j: usize| &x16[idx[j] * hs..idx[j] * hs + h];
            crate::dpbf16::pack_hidden_for_logits(cpu, row, r, h, &mut hp1);
            // The compute type is f32 for bf16 storage; the casts cannot fail.
            if let Some(out) = as_f32_mut(lg) {
                crate::dpbf16::logits(cpu, w16, ws, v, h, &hp1, r, out, parallel);
            }
            if dw_in_blocks {
                crate::dpbf16::pack_hidden_for_dweight(cpu, row, r, h, &mut hp3);
            }
        }
        #[cfg(target_arch = "x86_64")]
        if let Some((cpu, w)) = fma
            && let (Some(x), Some(out)) = (as_f32(hb), as_f32_mut(lg))
        {
            crate::fma32::pack_hidden_for_logits(|j| &x[j * h..(j + 1) * h], r, h, &mut hpf);
            crate::fma32::logits(cpu, w, ws, v, h, &hpf, r, out, parallel);
        }
        match w_native {
            _ if dp.is_some() || fma.is_some() => {}
            Some(w) => {
                // In vocabulary slices: the engine packs its whole right operand (H × columns), which for all
                // of V would be a second logits-sized buffer outside the budget.
                for v0 in (0..v).step_by(ENGINE_COLUMNS) {
                    let vc = ENGINE_COLUMNS.min(v - v0);
                    matmul(
                        (r, vc, h),
                        &mut lg[v0..],
                        Layout::row_major(v),
                        false,
                        hb,
                        Layout::row_major(h),
                        &w[v0 * ws..],
                        Layout::transposed(ws),
                        parallel,
                    );
                }
            }
            None => {
                for v0 in (0..v).step_by(plan.w_chunk) {
                    let vc = plan.w_chunk.min(v - v0);
                    load_rows(&weight, v0, vc, &mut wc[..vc * h]);
                    matmul(
                        (r, vc, h),
                        &mut lg[v0..],
                        Layout::row_major(v),
                        false,
                        hb,
                        Layout::row_major(h),
                        &wc[..vc * h],
                        Layout::transposed(h),
                        parallel,
                    );
                }
            }
        }
        // The low-rank term, `lg += A_b · Bᵀ` (rank-r GEMM), in vocabulary slices like GEMM 1.
        if let Some(l) = low.as_ref() {
            let ab = &mut ab[..r * rank];
            for (j, &i) in idx.iter().enumerate() {
                ab[j * rank..(j + 1) * rank]
                    .copy_from_slice(&l.a[i * l.a_stride..i * l.a_stride + rank]);
            }
            for v0 in (0..v).step_by(ENGINE_COLUMNS) {
                let vc = ENGINE_COLUMNS.min(v - v0);
                matmul(
                    (r, vc, rank),
                    &mut lg[v0..],
                    Layout::row_major(v),
                    true,
                    ab,
                    Layout::row_major(rank),
                    &l.b[v0 * l.b_stride..],
                    Layout::transposed(l.b_stride),
                    parallel,
                );
            }
        }

        prof.lap(0);
        // The AVX512_BF16 GEMMs read the gradient as bf16: the row job rounds each row in place once its f32
        // values are done with, unless the bias gradient still needs them (then a pass of its own, below).
        #[cfg(target_arch = "x86_64")]
        let round_in_job = dp
            .filter(|_| want_grad && !want_db && !want_low)
            .map(|(cpu, _, _)| cpu);
        // Per-row epilogue, LSE, loss and (in place) the logits gradient.
        let row_job = |(j, (row, out)): RowItem<'_, S::C>| {
            let i = idx[j];
            let s = match grad_scale {
                GradScale::Uniform(s) => S::C::from_f64(s),
                GradScale::PerRow(s) => S::C::from_f64(f64::from(s[i])),
            };
            // In range: validated before any work.
            let t = targets[i] as usize;
            let res = process_row(level, row, t, s, want_grad, &params);
            #[cfg(target_arch = "x86_64")]
            if let Some(cpu) = round_in_job
                && let Some(g) = as_f32_mut(row)
            {
                crate::dpbf16::round_row_in_place(cpu, g);
            }
            *out = (res.loss, res.stats, res.token_stats);
        };
        if parallel {
            lg.par_chunks_mut(v)
                .zip(losses[..r].par_iter_mut())
                .enumerate()
                .for_each(row_job);
        } else {
            lg.chunks_mut(v)
                .zip(losses[..r].iter_mut())
                .enumerate()
                .for_each(row_job);
        }
        for (j, &i) in idx.iter().enumerate() {
            loss_sum += losses[j].0;
            if recompute_dw {
                active_rows.push((i, losses[j].1));
            }
            if let Some(l) = per_row_loss.as_deref_mut() {
                l[i] = losses[j].0;
            }
            if let Some(st) = token_stats.as_deref_mut() {
                st[i * TOKEN_STATS..(i + 1) * TOKEN_STATS].copy_from_slice(&losses[j].2);
            }
        }
        if !want_grad {
            prof.lap(1);
            continue;
        }
        if want_db {
            for row in logits[..r * v].chunks(v) {
                for (a, &g) in db_acc.iter_mut().zip(row) {
                    *a += g;
                }
            }
        }
        // The low-rank term's gradients, from the f32 logits gradient (before any rounding to bf16):
        // d_a_b = G · B and d_b += Gᵀ · A_b.
        if let Some(l) = low.as_mut().filter(|_| want_low) {
            let g = &logits[..r * v];
            let ab = &ab[..r * rank];
            if let Some(d_a) = l.d_a.as_deref_mut() {
                let dab = &mut dab[..r * rank];
                matmul(
                    (r, rank, v),
                    dab,
                    Layout::row_major(rank),
                    false,
                    g,
                    Layout::row_major(v),
                    l.b,
                    Layout::row_major(l.b_stride),
                    parallel,
                );
                for (j, &i) in idx.iter().enumerate() {
                    d_a[i * rank..(i + 1) * rank].copy_from_slice(&dab[j * rank..(j + 1) * rank]);
                }
            }
            if let Some(d_b) = l.d_b.as_deref_mut() {
                matmul(
                    (v, rank, r),
                    d_b,
                    Layout::row_major(rank),
                    true,
                    g,
                    Layout::transposed(v),
                    ab,
                    Layout::row_major(rank),
                    parallel,
                );
            }
        }
        #[cfg(target_arch = "x86_64")]
        let (lg, g16): (&[S::C], &[u16]) = match dp {
            Some((cpu, _, _)) => match as_f32_mut(&mut logits[..r * v]) {
                Some(g) => {
                    if round_in_job.is_none() {
                        let round = |row: &mut [f32]| crate::dpbf16::round_row_in_place(cpu, row);
                        if parallel {
                            g.par_chunks_mut(v).for_each(round);
                        } else {
                            g.chunks_mut(v).for_each(round);
                        }
                    }
                    (&[], crate::dpbf16::rounded_rows(g, r, v))
                }
                // Unreachable: the bf16 path computes in f32.
                None => (&[], &[]),
            },
            None => (&logits[..r * v], &[]),
        };
        #[cfg(not(target_arch = "x86_64"))]
        let lg: &[S::C] = &logits[..r * v];
        prof.lap(1);

        // GEMM 2: d_hidden_b = G · W, complete for the block.
        if let Some(dh) = d_hidden.as_deref_mut() {
            let dhb = &mut dhb[..r * h];
            #[cfg(target_arch = "x86_64")]
            if let Some((cpu, w16, _)) = dp
                && let Some(out) = as_f32_mut(dhb)
            {
                crate::dpbf16::d_hidden(cpu, g16, gs, r, w16, ws, v, h, out, parallel);
            }
            #[cfg(target_arch = "x86_64")]
            if let Some((cpu, w)) = fma
                && let (Some(g), Some(out)) = (as_f32(lg), as_f32_mut(dhb))
            {
                crate::fma32::d_hidden(cpu, g, r, w, ws, v, h, out, parallel);
            }
            match w_native {
                _ if dp.is_some() || fma.is_some() => {}
                Some(w) => {
                    // In vocabulary slices, for the same reason as GEMM 1 (here the engine packs the left operand).
                    for v0 in (0..v).step_by(ENGINE_COLUMNS) {
                        let vc = ENGINE_COLUMNS.min(v - v0);
                        matmul(
                            (r, h, vc),
                            dhb,
                            Layout::row_major(h),
                            v0 > 0,
                            &lg[v0..],
                            Layout::row_major(v),
                            &w[v0 * ws..],
                            Layout::row_major(ws),
                            parallel,
                        );
                    }
                }
                None => {
                    for v0 in (0..v).step_by(plan.w_chunk) {
                        let vc = plan.w_chunk.min(v - v0);
                        load_rows(&weight, v0, vc, &mut wc[..vc * h]);
                        matmul(
                            (r, h, vc),
                            dhb,
                            Layout::row_major(h),
                            v0 > 0,
                            &lg[v0..],
                            Layout::row_major(v),
                            &wc[..vc * h],
                            Layout::row_major(h),
                            parallel,
                        );
                    }
                }
            }
            for (j, &i) in idx.iter().enumerate() {
                S::store(&dhb[j * h..(j + 1) * h], &mut dh[i * h..(i + 1) * h]);
            }
        }

        prof.lap(2);
        // GEMM 3: d_weight += Gᵀ · H_b.
        if let Some(dw) = d_weight.as_deref_mut().filter(|_| dw_in_blocks) {
            #[cfg(target_arch = "x86_64")]
            if let Some((cpu, _, _)) = dp {
                // bf16 storage, so the cast cannot fail: the split accumulator, upper halves in `dw` itself.
                if let Some(hi) = as_bf16_bits_mut(dw) {
                    let acc = crate::dpbf16::WeightAcc::Split { hi, lo: &mut dw_lo };
                    crate::dpbf16::d_weight(cpu, g16, gs, r, v, h, &hp3, acc, parallel);
                }
                prof.lap(3);
                continue;
            }
            let dst: &mut [S::C] = match as_compute_mut(dw) {
                Some(native) => native,
                None => &mut dw_acc,
            };
            #[cfg(target_arch = "x86_64")]
            if let Some((cpu, _)) = fma
                && let (Some(g), Some(x), Some(acc)) = (as_f32(lg), as_f32(hb), as_f32_mut(dst))
            {
                // The hidden block packed for the logits GEMM is done with: its buffer holds this GEMM's packing.
                crate::fma32::d_weight(cpu, g, r, v, h, x, acc, &mut hpf, parallel);
                prof.lap(3);
                continue;
            }
            // In vocabulary slices: the engine packs G (as its right operand, after transposing the problem).
            for v0 in (0..v).step_by(ENGINE_COLUMNS) {
                let vc = ENGINE_COLUMNS.min(v - v0);
                matmul(
                    (vc, h, r),
                    &mut dst[v0 * h..],
                    Layout::row_major(h),
                    true,
                    &lg[v0..],
                    Layout::transposed(v),
                    hb,
                    Layout::row_major(h),
                    parallel,
                );
            }
        }
        prof.lap(3);
    }

    if let Some(db) = d_bias {
        S::store(&db_acc, db);
    }
    if recompute_dw && let Some(dw) = d_weight.as_deref_mut() {
        // The row blocks' scratch is done with: the slab pass gets the whole budget.
        drop((logits, hb, hp1, hp3, hpf, dhb, wc));
        weight_pass::run(&job, &active_rows, &params, level, dp, dw);
        prof.lap(3);
    }
    #[cfg(target_arch = "x86_64")]
    if split_dw
        && let Some((cpu, _, _)) = dp
        && let Some(hi) = d_weight.as_deref_mut().and_then(as_bf16_bits_mut)
    {
        crate::dpbf16::round_split_into_hi(cpu, hi, &dw_lo, parallel);
    }
    if let Some(dw) = d_weight
        && !dw_acc.is_empty()
    {
        // One cast at the end; rows are independent, so split them across threads when allowed.
        let rows = h.max(1) * 4096;
        if parallel {
            dw.par_chunks_mut(rows)
                .zip(dw_acc.par_chunks(rows))
                .for_each(|(d, a)| S::store(a, d));
        } else {
            S::store(&dw_acc, dw);
        }
    }
    prof.lap(4);
    prof.report(plan, isa);
    LossSummary {
        loss_sum,
        count: active,
    }
}

/// Seconds per phase, printed to stderr when `Options::profile` is set (for benchmarking only).
struct Profile {
    last: Option<std::time::Instant>,
    secs: [f64; 6],
}

impl Profile {
    fn new(on: bool) -> Self {
        Self {
            last: on.then(std::time::Instant::now),
            secs: [0.0; 6],
        }
    }
    fn lap(&mut self, phase: usize) {
        if let Some(t) = self.last {
            self.secs[phase] += t.elapsed().as_secs_f64();
            self.last = Some(std::time::Instant::now());
        }
    }
    fn report(&self, plan: Plan, isa: Isa) {
        if self.last.is_some() {
            let s = self.secs;
            eprintln!(
                "logitless-kernel profile ({isa:?}, {plan:?}): logits GEMM {:.3}s, rows {:.3}s, d_hidden GEMM \
                 {:.3}s, d_weight GEMM {:.3}s, final cast {:.3}s, buffers {:.3}s",
                s[0], s[1], s[2], s[3], s[4], s[5]
            );
        }
    }
}

fn load_rows<S: Storage>(m: &MatRef<'_, S>, first: usize, count: usize, out: &mut [S::C]) {
    let h = m.cols();
    for j in 0..count {
        S::load(m.row(first + j), &mut out[j * h..(j + 1) * h]);
    }
}
