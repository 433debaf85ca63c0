//! Test support: a naive float64 reference (materialised logits, written plainly and independently of the
//! kernel), a small deterministic RNG, and a driver that runs the kernel for any dtype and compares.
#![allow(dead_code)]

use half::{bf16, f16};
use logitless_kernel::{
    Element, Epilogue, GradScale, Grads, LossSummary, MatRef, Options, RowOutputs, TOKEN_STATS,
    WeightGrad, fused_linear_cross_entropy,
};

/// Conversions the tests need for each element type.
pub trait TestElement: Element + std::fmt::Debug {
    fn from_f64(x: f64) -> Self;
    fn to_f64(self) -> f64;
    /// Relative tolerance for losses (computed in f32/f64 from exactly represented inputs).
    const LOSS_TOL: f64;
    /// Tolerance for gradients, relative to the largest reference magnitude (outputs are rounded to the dtype).
    const GRAD_TOL: f64;
}
impl TestElement for f64 {
    fn from_f64(x: f64) -> Self {
        x
    }
    fn to_f64(self) -> f64 {
        self
    }
    const LOSS_TOL: f64 = 1e-10;
    const GRAD_TOL: f64 = 1e-10;
}
impl TestElement for f32 {
    fn from_f64(x: f64) -> Self {
        x as f32
    }
    fn to_f64(self) -> f64 {
        self as f64
    }
    const LOSS_TOL: f64 = 2e-5;
    const GRAD_TOL: f64 = 2e-4;
}
impl TestElement for bf16 {
    fn from_f64(x: f64) -> Self {
        bf16::from_f64(x)
    }
    fn to_f64(self) -> f64 {
        bf16::to_f64(self)
    }
    const LOSS_TOL: f64 = 1e-3;
    const GRAD_TOL: f64 = 2e-2;
}
impl TestElement for f16 {
    fn from_f64(x: f64) -> Self {
        f16::from_f64(x)
    }
    fn to_f64(self) -> f64 {
        f16::to_f64(self)
    }
    const LOSS_TOL: f64 = 2e-5;
    const GRAD_TOL: f64 = 4e-3;
}

/// xorshift64*: deterministic test data without a dependency.
pub struct Rng(u64);
impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// Uniform in [-1, 1).
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 52) as f64 - 1.0
    }
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
    pub fn vec(&mut self, n: usize, scale: f64) -> Vec<f64> {
        (0..n).map(|_| self.uniform() * scale).collect()
    }
}

/// Everything one call needs, in f64 (values already representable in the dtype under test).
#[derive(Clone, Debug)]
pub struct Case {
    pub n: usize,
    pub h: usize,
    pub v: usize,
    pub hidden: Vec<f64>,
    pub weight: Vec<f64>,
    pub bias: Option<Vec<f64>>,
    pub targets: Vec<i64>,
    pub ignore_index: i64,
    pub smoothing: f64,
    pub z_loss: f64,
    pub logits_bias: Option<Vec<f32>>,
    pub multiply: Option<f32>,
    pub divide: Option<f32>,
    pub softcap: Option<f32>,
    /// Divides the logits after every other epilogue step.
    pub temperature: Option<f32>,
    /// Per-row scale (GradScale::PerRow) or one uniform scale.
    pub row_scale: Option<Vec<f32>>,
    pub uniform_scale: f64,
}

impl Case {
    /// Random data; about `ignored_frac` of targets are ignore_index.
    pub fn random(rng: &mut Rng, n: usize, h: usize, v: usize, ignored_frac: f64) -> Self {
        let hidden = rng.vec(n * h, 1.0);
        let weight = rng.vec(v * h, 1.0);
        let targets = (0..n)
            .map(|_| {
                if (rng.uniform() + 1.0) / 2.0 < ignored_frac {
                    -100
                } else {
                    rng.below(v) as i64
                }
            })
            .collect();
        Self {
            n,
            h,
            v,
            hidden,
            weight,
            bias: None,
            targets,
            ignore_index: -100,
            smoothing: 0.0,
            z_loss: 0.0,
            logits_bias: None,
            multiply: None,
            divide: None,
            softcap: None,
            temperature: None,
            row_scale: None,
            uniform_scale: 1.0,
        }
    }

    /// Rounds every input to what `T` can hold, so the reference sees exactly the kernel's inputs.
    pub fn rounded<T: TestElement>(mut self) -> Self {
        let r = |x: &mut f64| *x = T::from_f64(*x).to_f64();
        self.hidden.iter_mut().for_each(r);
        self.weight.iter_mut().for_each(r);
        if let Some(b) = self.bias.as_mut() {
            b.iter_mut().for_each(r);
        }
        self
    }

    pub fn scale_of(&self, i: usize) -> f64 {
        match &self.row_scale {
            Some(s) => s[i] as f64,
            None => self.uniform_scale,
        }
    }
}

/// Reference results.
#[derive(Clone, Debug)]
pub struct Out {
    pub loss_sum: f64,
    pub count: usize,
    pub per_row: Vec<f64>,
    pub d_hidden: Vec<f64>,
    pub d_weight: Vec<f64>,
    pub d_bias: Vec<f64>,
    /// `N × TOKEN_STATS` (entropy, mean logit, log Σp², target is argmax), zeros for ignored rows.
    pub stats: Vec<f64>,
    /// Per row, |z_t - max_{j≠t} z_j|: how close the argmax question is (1/0 may flip under rounding when tiny).
    pub top_gap: Vec<f64>,
}

/// The naive reference: the full logits matrix in f64, loss and gradients written out term by term.
pub fn reference(c: &Case) -> Out {
    let (n, h, v) = (c.n, c.h, c.v);
    let mut out = Out {
        loss_sum: 0.0,
        count: 0,
        per_row: vec![0.0; n],
        d_hidden: vec![0.0; n * h],
        d_weight: vec![0.0; v * h],
        d_bias: vec![0.0; v],
        stats: vec![0.0; n * TOKEN_STATS],
        top_gap: vec![f64::INFINITY; n],
    };
    let nz = |x: Option<f32>| x.filter(|&x| x != 0.0).map(|x| x as f64);
    for i in 0..n {
        if c.targets[i] == c.ignore_index {
            continue;
        }
        let t = c.targets[i] as usize;
        // Materialised logits through the epilogue, keeping u (pre-softcap) for the derivative.
        let mut z = vec![0.0f64; v];
        let mut u = vec![0.0f64; v];
        for j in 0..v {
            let mut y = 0.0;
            for k in 0..h {
                y += c.hidden[i * h + k] * c.weight[j * h + k];
            }
            if let Some(b) = &c.bias {
                y += b[j];
            }
            if let Some(lb) = &c.logits_bias {
                y += lb[j] as f64;
            }
            if let Some(m) = nz(c.multiply) {
                y *= m;
            }
            if let Some(d) = nz(c.divide) {
                y /= d;
            }
            u[j] = y;
            z[j] = match nz(c.softcap) {
                Some(cap) => cap * (y / cap).tanh(),
                None => y,
            };
            if let Some(temp) = nz(c.temperature) {
                z[j] /= temp;
            }
        }
        let max = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let lse = max + z.iter().map(|&x| (x - max).exp()).sum::<f64>().ln();
        let mean = z.iter().sum::<f64>() / v as f64;
        // The kernel takes these options as f32: use exactly those values.
        let eps = c.smoothing as f32 as f64;
        let zl = c.z_loss as f32 as f64;
        let loss = (1.0 - eps) * (lse - z[t]) + eps * (lse - mean) + zl * lse * lse;
        out.per_row[i] = loss;
        out.loss_sum += loss;
        out.count += 1;
        // Token statistics of p = softmax(z), written out as defined.
        let p: Vec<f64> = z.iter().map(|&x| (x - lse).exp()).collect();
        let entropy = -p
            .iter()
            .map(|&q| if q > 0.0 { q * q.ln() } else { 0.0 })
            .sum::<f64>();
        let log_sum_sq = p.iter().map(|&q| q * q).sum::<f64>().ln();
        let argmax = (0..v).fold(0, |best, j| if z[j] > z[best] { j } else { best });
        let stats = [
            entropy,
            mean,
            log_sum_sq,
            if argmax == t { 1.0 } else { 0.0 },
        ];
        out.stats[i * TOKEN_STATS..(i + 1) * TOKEN_STATS].copy_from_slice(&stats);
        let other = (0..v)
            .filter(|&j| j != t)
            .map(|j| z[j])
            .fold(f64::NEG_INFINITY, f64::max);
        out.top_gap[i] = (z[t] - other).abs();
        let s = c.scale_of(i);
        for j in 0..v {
            let p = (z[j] - lse).exp();
            let mut dz = p * (1.0 + 2.0 * zl * lse) - eps / v as f64;
            if j == t {
                dz -= 1.0 - eps;
            }
            let mut dy = dz;
            if let Some(temp) = nz(c.temperature) {
                dy /= temp;
            }
            if let Some(cap) = nz(c.softcap) {
                let th = (u[j] / cap).tanh();
                dy *= 1.0 - th * th;
            }
            if let Some(d) = nz(c.divide) {
                dy /= d;
            }
            if let Some(m) = nz(c.multiply) {
                dy *= m;
            }
            dy *= s;
            out.d_bias[j] += dy;
            for k in 0..h {
                out.d_hidden[i * h + k] += dy * c.weight[j * h + k];
                out.d_weight[j * h + k] += dy * c.hidden[i * h + k];
            }
        }
    }
    out
}

/// Which outputs to ask the kernel for, and how.
#[derive(Clone, Copy, Debug)]
pub struct Want {
    pub d_hidden: bool,
    pub d_weight: bool,
    pub d_bias: bool,
    pub per_row: bool,
    /// Ask for the token statistics too.
    pub stats: bool,
    pub parallel: bool,
    pub budget: usize,
    pub weight_grad: WeightGrad,
    /// Extra elements between rows of hidden / weight (strided views).
    pub pad_hidden: usize,
    pub pad_weight: usize,
}

impl Default for Want {
    fn default() -> Self {
        Self {
            d_hidden: true,
            d_weight: true,
            d_bias: true,
            per_row: true,
            stats: true,
            parallel: true,
            budget: 32 << 20,
            weight_grad: WeightGrad::Accumulate,
            pad_hidden: 0,
            pad_weight: 0,
        }
    }
}

/// Kernel results, converted to f64; gradients not asked for are None.
pub struct Got {
    pub summary: LossSummary,
    pub per_row: Option<Vec<f64>>,
    pub stats: Option<Vec<f64>>,
    pub d_hidden: Option<Vec<f64>>,
    pub d_weight: Option<Vec<f64>>,
    pub d_bias: Option<Vec<f64>>,
}

fn strided<T: TestElement>(x: &[f64], rows: usize, cols: usize, pad: usize) -> Vec<T> {
    let stride = cols + pad;
    let mut out = vec![T::from_f64(f64::NAN); rows * stride];
    for i in 0..rows {
        for j in 0..cols {
            out[i * stride + j] = T::from_f64(x[i * cols + j]);
        }
    }
    out
}

pub fn run<T: TestElement>(c: &Case, w: Want) -> Got {
    let (n, h, v) = (c.n, c.h, c.v);
    let hid = strided::<T>(&c.hidden, n, h, w.pad_hidden);
    let wt = strided::<T>(&c.weight, v, h, w.pad_weight);
    let bias: Option<Vec<T>> = c
        .bias
        .as_ref()
        .map(|b| b.iter().map(|&x| T::from_f64(x)).collect());
    let hidden = MatRef::new(&hid, n, h, h + w.pad_hidden).expect("hidden view");
    let weight = MatRef::new(&wt, v, h, h + w.pad_weight).expect("weight view");
    let options = Options {
        ignore_index: c.ignore_index,
        label_smoothing: c.smoothing as f32,
        z_loss: c.z_loss as f32,
        epilogue: Epilogue {
            logits_bias: c.logits_bias.as_deref(),
            scale_multiply: c.multiply,
            scale_divide: c.divide,
            softcap: c.softcap,
            temperature: c.temperature,
        },
        chunk_budget_bytes: w.budget,
        weight_grad: w.weight_grad,
        parallel: w.parallel,
        profile: false,
    };
    // Garbage in the output buffers: the kernel must overwrite all of it.
    let junk = T::from_f64(7.0);
    let mut dh = vec![junk; n * h];
    let mut dw = vec![junk; v * h];
    let mut db = vec![junk; v];
    let mut pr = vec![7.0f64; n];
    let mut st = vec![7.0f64; n * TOKEN_STATS];
    let scale = match &c.row_scale {
        Some(s) => GradScale::PerRow(s),
        None => GradScale::Uniform(c.uniform_scale),
    };
    let grads = Grads {
        d_hidden: w.d_hidden.then_some(&mut dh[..]),
        d_weight: w.d_weight.then_some(&mut dw[..]),
        d_bias: w.d_bias.then_some(&mut db[..]),
    };
    let summary = fused_linear_cross_entropy(
        hidden,
        weight,
        bias.as_deref(),
        &c.targets,
        &options,
        scale,
        RowOutputs {
            loss: w.per_row.then_some(&mut pr[..]),
            stats: w.stats.then_some(&mut st[..]),
        },
        grads,
    )
    .expect("kernel call");
    let f = |x: &[T]| x.iter().map(|&y| y.to_f64()).collect::<Vec<f64>>();
    Got {
        summary,
        per_row: w.per_row.then_some(pr),
        stats: w.stats.then_some(st),
        d_hidden: w.d_hidden.then(|| f(&dh)),
        d_weight: w.d_weight.then(|| f(&dw)),
        d_bias: w.d_bias.then(|| f(&db)),
    }
}

/// Gradients are compared relative to at least this magnitude: inputs are O(1), so rounding leaves residues of
/// ~1e-8 (f32) even where the exact gradient is 0 (V = 1, or smoothing cancelling the one-hot term).
const GRAD_FLOOR: f64 = 1e-3;

/// max |a - b| <= tol · max(max |b|, floor).
pub fn assert_close(what: &str, got: &[f64], want: &[f64], tol: f64, floor: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let scale = want.iter().fold(floor, |m, x| m.max(x.abs()));
    for (i, (a, b)) in got.iter().zip(want).enumerate() {
        assert!(
            (a - b).abs() <= tol * scale,
            "{what}[{i}]: got {a}, want {b} (tol {tol} x scale {scale})"
        );
    }
}

/// Runs the kernel for `T` on `case` (rounded to `T`) and checks every output against the reference, with the
/// weight gradient formed both ways when one is wanted (`Recompute` only differs for bf16/f16).
pub fn check<T: TestElement>(case: &Case, w: Want) {
    let case = case.clone().rounded::<T>();
    let want = reference(&case);
    check_against::<T>(&case, &want, w);
    if w.d_weight {
        let other = match w.weight_grad {
            WeightGrad::Accumulate => WeightGrad::Recompute,
            WeightGrad::Recompute => WeightGrad::Accumulate,
        };
        check_against::<T>(
            &case,
            &want,
            Want {
                weight_grad: other,
                ..w
            },
        );
    }
}

fn check_against<T: TestElement>(case: &Case, want: &Out, w: Want) {
    let got = run::<T>(case, w);
    let ctx = format!(
        "{} n={} h={} v={} {:?}",
        std::any::type_name::<T>(),
        case.n,
        case.h,
        case.v,
        w
    );
    assert_eq!(got.summary.count, want.count, "{ctx}: count");
    let lt = T::LOSS_TOL;
    assert!(
        (got.summary.loss_sum - want.loss_sum).abs() <= lt * (want.loss_sum.abs() + 1.0),
        "{ctx}: loss_sum {} vs {}",
        got.summary.loss_sum,
        want.loss_sum
    );
    if let Some(pr) = &got.per_row {
        let scale = want.per_row.iter().fold(1.0f64, |m, x| m.max(x.abs()));
        assert_close(&format!("{ctx}: per_row"), pr, &want.per_row, lt, scale);
    }
    if let Some(st) = &got.stats {
        check_stats(&ctx, case, want, st, lt);
    }
    let gt = T::GRAD_TOL;
    if let Some(g) = &got.d_hidden {
        assert_close(
            &format!("{ctx}: d_hidden"),
            g,
            &want.d_hidden,
            gt,
            GRAD_FLOOR,
        );
        // Ignored rows are exactly zero, not merely small.
        for (i, &t) in case.targets.iter().enumerate() {
            if t == case.ignore_index {
                assert!(
                    g[i * case.h..(i + 1) * case.h].iter().all(|&x| x == 0.0),
                    "{ctx}: ignored row {i}"
                );
            }
        }
    }
    if let Some(g) = &got.d_weight {
        assert_close(
            &format!("{ctx}: d_weight"),
            g,
            &want.d_weight,
            gt,
            GRAD_FLOOR,
        );
    }
    if let Some(g) = &got.d_bias {
        assert_close(&format!("{ctx}: d_bias"), g, &want.d_bias, gt, GRAD_FLOOR);
    }
}

fn check_stats(ctx: &str, case: &Case, want: &Out, got: &[f64], tol: f64) {
    for i in 0..case.n {
        let (g, w) = (
            &got[i * TOKEN_STATS..(i + 1) * TOKEN_STATS],
            &want.stats[i * TOKEN_STATS..(i + 1) * TOKEN_STATS],
        );
        if case.targets[i] == case.ignore_index {
            assert!(
                g.iter().all(|&x| x == 0.0),
                "{ctx}: token stats of ignored row {i}: {g:?}"
            );
            continue;
        }
        for (k, name) in ["entropy", "mean logit", "log sum p^2"].iter().enumerate() {
            assert!(
                (g[k] - w[k]).abs() <= tol * (w[k].abs() + 1.0),
                "{ctx}: row {i} {name}: got {}, want {}",
                g[k],
                w[k]
            );
        }
        // Logits formed in f32 may order two near-equal entries differently from f64.
        assert!(
            g[3] == w[3] || want.top_gap[i] <= 1e-4 * (w[1].abs() + 1.0),
            "{ctx}: row {i} is_top1: got {}, want {} (gap {})",
            g[3],
            w[3],
            want.top_gap[i]
        );
    }
}

/// The same check for all four dtypes.
pub fn check_all(case: &Case, w: Want) {
    check::<f64>(case, w);
    check::<f32>(case, w);
    check::<bf16>(case, w);
    check::<f16>(case, w);
}

/// The bf16 weight gradient rounded once to nearest on the instruction-set path `isa`. The tolerance checks
/// cannot tell a weight gradient rounded once to nearest from one truncated or rounded per block: both are within
/// a bf16 ulp. Here the reference mimics the path's arithmetic and sums in f64, then rounds once. The bf16
/// engines (AVX512_BF16, AMX) round the logits gradient to bf16 for the backward GEMMs, as a stock bf16 backward
/// does, and multiply bf16 × bf16 exactly; the other paths widen bf16 rows to f32 and keep the logits gradient in
/// f32. Only f32 summation order separates the kernel from the reference, which moves an element across a rounding
/// boundary rarely (and an element that cancels to near zero, by more of its own ulps, but by no more than f32
/// rounding of the largest: on the widening path's recompute, one element of 5,200 at 1.3e-5 moved 1.8e-7 with
/// the largest at 4); truncation would miss about half of them, rounding per block would miss by far more. Small
/// budgets make many row blocks, so the accumulator is added into many times.
pub fn check_bf16_weight_gradient_rounded_once(isa: logitless_kernel::isa::Isa) {
    use logitless_kernel::WeightGrad;
    use logitless_kernel::isa::Isa;
    let rounds_logits_gradient = matches!(isa, Isa::Avx512Bf16 | Isa::Amx);
    let mut rng = Rng::new(21);
    let (n, h, v) = (192, 40, 130);
    let case = Case::random(&mut rng, n, h, v, 0.0).rounded::<bf16>();
    let mut g = vec![0.0f64; n * v];
    for i in 0..n {
        let logits: Vec<f64> = (0..v)
            .map(|j| {
                (0..h)
                    .map(|k| case.hidden[i * h + k] * case.weight[j * h + k])
                    .sum()
            })
            .collect();
        let max = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let sum: f64 = logits.iter().map(|z| (z - max).exp()).sum();
        for j in 0..v {
            let p = (logits[j] - max).exp() / sum;
            let y = if case.targets[i] == j as i64 {
                1.0
            } else {
                0.0
            };
            let gij = (p - y) * case.scale_of(i);
            g[i * v + j] = if rounds_logits_gradient {
                bf16::from_f64(gij).to_f64()
            } else {
                gij
            };
        }
    }
    let want: Vec<bf16> = (0..v * h)
        .map(|jk| {
            let (j, k) = (jk / h, jk % h);
            bf16::from_f64((0..n).map(|i| g[i * v + j] * case.hidden[i * h + k]).sum())
        })
        .collect();
    let largest = want.iter().fold(0.0f64, |m, x| m.max(x.to_f64().abs()));
    for weight_grad in [WeightGrad::Accumulate, WeightGrad::Recompute] {
        for budget in [40_000, 200_000, 32 << 20] {
            let got = run::<bf16>(
                &case,
                Want {
                    budget,
                    weight_grad,
                    ..Want::default()
                },
            );
            let dw = got.d_weight.expect("d_weight");
            let mut off = 0;
            for (&a, &b) in dw.iter().zip(&want) {
                let (a, b) = (bf16::from_f64(a), b);
                if a != b {
                    off += 1;
                    let ulps = (a.to_bits() as i32 - b.to_bits() as i32).abs();
                    // An element near zero after cancellation can move further than one of its own ulps with
                    // the f32 summation order (many row blocks): within f32 rounding of the largest gradient.
                    let near_zero =
                        (a.to_f64() - b.to_f64()).abs() <= largest * f64::powi(2.0, -22);
                    assert!(
                        ulps <= 1 || near_zero,
                        "{isa:?} {weight_grad:?} budget {budget}: {a} vs {b}"
                    );
                }
            }
            assert!(
                off * 100 <= v * h,
                "{isa:?} {weight_grad:?} budget {budget}: {off} of {} elements not rounded to nearest",
                v * h
            );
        }
    }
}
