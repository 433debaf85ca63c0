//! [`WeightGrad::Recompute`](crate::WeightGrad): the bf16/f16 weight gradient in a second pass, vocabulary slab by
//! vocabulary slab, so no V×H f32 accumulator is ever held.
//!
//! The row blocks of `fused.rs` leave each active row's softmax constants ([`RowStats`]). Here, for each slab of
//! W's rows, every active row's logits on that slab are recomputed (GEMM), turned into the same gradient values
//! the row pass wrote (`process_slab`), and `d_weight[slab] = Σ_rows Gᵀ·H` is formed complete in an f32 slab
//! accumulator, then rounded once into the caller's buffer. Four GEMMs' worth of flops instead of three; scratch
//! stays inside the chunk budget whatever V·H is.

use crate::isa::Level;
use crate::matmul::{Layout, matmul};
use crate::pages::{fill, hint_huge_pages};
use crate::rowpass::{RowParams, RowStats, process_slab};
use crate::storage::{Real, Storage};
use crate::{GradScale, Job};
use rayon::prelude::*;

/// An active row of the call: its index and the constants its row pass left.
pub(crate) type ActiveRow<C> = (usize, RowStats<C>);

/// How the budget is split: `slab` W rows per slab (their f32 gradient, and for the widening engines their
/// f32 copy), `rows` logits rows per GEMM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SlabPlan {
    pub slab: usize,
    pub rows: usize,
}

pub(crate) fn plan(budget: usize, v: usize, h: usize, active: usize, widen_w: bool) -> SlabPlan {
    let c = size_of::<f32>();
    // Half the budget for the slab's f32 gradient (and, on the widening path, W's rows widened and the `gemm`
    // crate's packed copy of them), the rest for the logits rows and the hidden rows (widened, or packed twice as
    // bf16 pairs: the same bytes).
    let per_slab_row = c * h * if widen_w { 3 } else { 1 };
    let slab = (budget / 2 / per_slab_row.max(1)).clamp(1, v.max(1));
    let left = budget.saturating_sub(slab * per_slab_row);
    let rows = (left / (c * (slab + h)).max(1)).clamp(1, active.max(1));
    SlabPlan { slab, rows }
}

/// The AVX512_BF16 operands (W and hidden as bf16, read in place), when that engine runs.
#[cfg(target_arch = "x86_64")]
pub(crate) type Dp<'a> = Option<(crate::isa::Bf16Token, &'a [half::bf16], &'a [half::bf16])>;
#[cfg(not(target_arch = "x86_64"))]
pub(crate) type Dp<'a> = Option<((), (), ())>;

/// Writes the whole weight gradient `dw` (V×H, contiguous) of the rows in `active`.
pub(crate) fn run<S: Storage>(
    job: &Job<'_, S>,
    active: &[ActiveRow<S::C>],
    params: &RowParams<'_, S::C>,
    level: Level,
    dp: Dp<'_>,
    dw: &mut [S],
) {
    let (h, v) = (job.hidden.cols(), job.weight.rows());
    if h == 0 {
        return; // a V×0 gradient: nothing to write (and no row of width 0 to chunk by)
    }
    let parallel = job.options.parallel;
    let widen = dp.is_none();
    let sp = plan(job.options.chunk_budget_bytes, v, h, active.len(), widen);
    let mut acc = vec![S::C::ZERO; sp.slab * h];
    fill(&mut acc, S::C::ZERO, parallel);
    let mut wc = vec![S::C::ZERO; if widen { sp.slab * h } else { 0 }];
    let mut logits = vec![S::C::ZERO; sp.rows * sp.slab];
    hint_huge_pages(&mut logits);
    let mut hb = vec![S::C::ZERO; if widen { sp.rows * h } else { 0 }];
    let (mut hp1, mut hp3): (Vec<u32>, Vec<u32>) = (Vec::new(), Vec::new());
    let scale_of = |i: usize| match job.grad_scale {
        GradScale::Uniform(s) => S::C::from_f64(s),
        GradScale::PerRow(s) => S::C::from_f64(f64::from(s[i])),
    };

    for v0 in (0..v).step_by(sp.slab) {
        let vc = sp.slab.min(v - v0);
        // The bf16 gradient's rows sit in the front halves of the f32 rows (`dpbf16::round_row_in_place`).
        let gs = 2 * vc;
        let acc = &mut acc[..vc * h];
        if widen {
            for j in 0..vc {
                S::load(job.weight.row(v0 + j), &mut wc[j * h..(j + 1) * h]);
            }
        }
        for (b, block) in active.chunks(sp.rows).enumerate() {
            let r = block.len();
            let lg = &mut logits[..r * vc];
            // Logits of these rows on this slab.
            #[cfg(target_arch = "x86_64")]
            if let Some((cpu, w16, x16)) = dp {
                let (ws, hs) = (job.weight.row_stride(), job.hidden.row_stride());
                let row = |j: usize| &x16[block[j].0 * hs..block[j].0 * hs + h];
                crate::dpbf16::pack_hidden_for_logits(cpu, row, r, h, &mut hp1);
                crate::dpbf16::pack_hidden_for_dweight(cpu, row, r, h, &mut hp3);
                if let Some(out) = crate::storage::as_f32_mut(lg) {
                    crate::dpbf16::logits(cpu, &w16[v0 * ws..], ws, vc, h, &hp1, r, out, parallel);
                }
            }
            if widen {
                for (j, &(i, _)) in block.iter().enumerate() {
                    S::load(job.hidden.row(i), &mut hb[j * h..(j + 1) * h]);
                }
                matmul(
                    (r, vc, h),
                    lg,
                    Layout::row_major(vc),
                    false,
                    &hb[..r * h],
                    Layout::row_major(h),
                    &wc[..vc * h],
                    Layout::transposed(h),
                    parallel,
                );
            }
            // Their gradient, exactly as the row pass formed it.
            let slab_job = |(j, g): (usize, &mut [S::C])| {
                let (i, stats) = block[j];
                // In range: validated before any work.
                let t = job.targets[i] as usize;
                process_slab(level, g, v0, v, t, scale_of(i), stats, params);
                // The AVX512_BF16 GEMM reads it as bf16, rounded while the row is in this thread's cache.
                #[cfg(target_arch = "x86_64")]
                if let Some((cpu, _, _)) = dp
                    && let Some(g) = crate::storage::as_f32_mut(g)
                {
                    crate::dpbf16::round_row_in_place(cpu, g);
                }
            };
            if parallel {
                lg.par_chunks_mut(vc).enumerate().for_each(slab_job);
            } else {
                lg.chunks_mut(vc).enumerate().for_each(slab_job);
            }
            // d_weight[slab] (+)= Gᵀ · H_b.
            #[cfg(target_arch = "x86_64")]
            if let Some((cpu, _, _)) = dp
                && let Some(g) = crate::storage::as_f32_mut(lg)
                && let Some(out) = crate::storage::as_f32_mut(acc)
            {
                let g16 = crate::dpbf16::rounded_rows(g, r, vc);
                if b == 0 {
                    out.fill(0.0);
                }
                let acc = crate::dpbf16::WeightAcc::F32(out);
                crate::dpbf16::d_weight(cpu, g16, gs, r, vc, h, &hp3, acc, parallel);
            }
            if widen {
                matmul(
                    (vc, h, r),
                    acc,
                    Layout::row_major(h),
                    b > 0,
                    lg,
                    Layout::transposed(vc),
                    &hb[..r * h],
                    Layout::row_major(h),
                    parallel,
                );
            }
        }
        let out = &mut dw[v0 * h..(v0 + vc) * h];
        if parallel {
            out.par_chunks_mut(h)
                .zip(acc.par_chunks(h))
                .for_each(|(d, a)| S::store(a, d));
        } else {
            S::store(acc, out);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_stays_in_budget_and_takes_at_least_one_of_each() {
        for (budget, v, h, active) in [
            (60 << 20, 128_256, 2048, 8192),
            (1, 10, 4, 3),
            (4096, 7, 64, 100),
        ] {
            for widen in [false, true] {
                let p = plan(budget, v, h, active, widen);
                assert!(
                    p.slab >= 1 && p.slab <= v && p.rows >= 1 && p.rows <= active,
                    "{p:?}"
                );
                let bytes = 4 * (p.slab * h * if widen { 3 } else { 1 } + p.rows * (p.slab + h));
                assert!(
                    bytes <= budget || (p.slab == 1 || p.rows == 1),
                    "{p:?} uses {bytes} of {budget}"
                );
            }
        }
    }
}
