//! Fused `cross_entropy(epilogue(hidden · weightᵀ + bias), targets)` on CPU — forward and backward in one call,
//! chunk by chunk, never holding the `[rows, vocab]` logits.
//!
//! API CONTRACT (fixed; the bindings crate is written against it — implementation owned by the kernel work):
//!
//! ```text
//! per-row loss, for a row i whose target t_i != ignore_index, with z = epilogue(h_i · Wᵀ + b):
//!     lse_i = log Σ_j exp(z_j)
//!     l_i   = (1-ε)·(lse_i - z_{t_i}) + ε·(lse_i - mean_j z_j) + z_loss·lse_i²
//! ignored rows: l_i = 0 and contribute nothing to any gradient.
//! gradients are those of  L = Σ_i s_i · l_i  where s_i comes from `GradScale`.
//! ```
//!
//! How it runs (see `fused.rs`): the non-ignored rows are taken in blocks whose full `[rows, V]` f32 logits fit
//! in `Options::chunk_budget_bytes`. Per block: logits = H·Wᵀ (GEMM), epilogue + log-sum-exp + loss + the
//! logits gradient in place (`rowpass.rs`), d_hidden = G·W (GEMM, complete for the block), d_weight += Gᵀ·H
//! (GEMM), d_bias += Σ G. Three GEMMs' worth of flops, no recomputation. A bf16/f16 d_weight goes to a V×H f32
//! accumulator (on the AVX512_BF16 path kept as two u16 planes, the upper one being the caller's bf16 output, so
//! it costs `2·V·H` bytes of scratch rather than `4·V·H`), or with [`WeightGrad::Recompute`] to a later pass over
//! vocabulary slabs (`weight_pass.rs`) that recomputes their logits from each row's softmax constants: four GEMMs'
//! worth, no accumulator. Fresh buffers are
//! written before any GEMM reads them, with transparent huge pages (`pages.rs`).
//!
//! Engines, chosen at run time (never `target-cpu=native`; [`isa::current`], capped by [`isa::set_override`], which
//! the Python package sets from `LOGITLESS_KERNEL_ISA`). The SIMD entry points take tokens that only
//! [`isa::level`] hands out after detection, so safe code cannot reach them on a CPU without the features:
//! - f32 on AVX-512: `fma32.rs`, 12×32 FMA micro-kernels reading W and the gradient in place (the hidden block
//!   packed for the logits and d_weight GEMMs);
//! - f64, and f32 without AVX-512: the `gemm` crate (its own runtime dispatch: AVX-512, AVX2+FMA, NEON, scalar)
//!   on the caller's buffers, called in vocabulary slices so its packing buffers stay small;
//! - bf16 with AVX512_BF16 (and even H and row strides): `dpbf16.rs`, `vdpbf16ps` micro-kernels reading bf16
//!   directly, f32 accumulation; the logits gradient is rounded to bf16 for the two backward GEMMs (as a stock
//!   bf16 backward does). Where the CPU also has AMX and the OS grants it (Sapphire Rapids and later), the same
//!   three products run on the tile unit instead (`amx.rs`, `tdpbf16ps` on 32×32 blocks; same rounding, same
//!   buffers);
//! - bf16 elsewhere, and f16: rows widened to f32 in chunks, then the f32 engine.
//!
//! The row pass has AVX-512, AVX2+FMA and portable builds of one generic body; the tests run every path.
//! `parallel: false` uses no rayon at all (safe in a `fork()`ed child whose parent started a pool).
//! `Options::profile` prints seconds per phase to stderr (benchmarking aid).
#![forbid(unsafe_op_in_unsafe_fn)]
// Off x86-64 the SIMD engines compile out, leaving their tokens and the buffers only they fill unused; the
// portable path is the one the x86 tests run at `Isa::Portable`.
#![cfg_attr(
    not(target_arch = "x86_64"),
    allow(dead_code, unused_variables, unused_mut)
)]

#[cfg(target_arch = "x86_64")]
mod amx;
#[cfg(target_arch = "x86_64")]
mod dpbf16;
#[cfg(target_arch = "x86_64")]
mod fma32;
mod fused;
pub mod isa;
mod matmul;
mod pages;
mod rowpass;
mod storage;
mod weight_pass;

use half::{bf16, f16};

/// The element types the kernel accepts. Math and accumulation are f32 for f32/bf16/f16 and f64 for f64.
pub trait Element: Copy + Send + Sync + 'static {
    const DTYPE: DType;
}
impl Element for f32 {
    const DTYPE: DType = DType::F32;
}
impl Element for f64 {
    const DTYPE: DType = DType::F64;
}
impl Element for bf16 {
    const DTYPE: DType = DType::BF16;
}
impl Element for f16 {
    const DTYPE: DType = DType::F16;
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DType {
    F32,
    F64,
    BF16,
    F16,
}

/// A row-major matrix view: `rows × cols`, unit column stride, `row_stride` elements between rows.
#[derive(Clone, Copy, Debug)]
pub struct MatRef<'a, T> {
    data: &'a [T],
    rows: usize,
    cols: usize,
    row_stride: usize,
}

impl<'a, T> MatRef<'a, T> {
    /// Checks that `data` holds every element the view addresses.
    pub fn new(
        data: &'a [T],
        rows: usize,
        cols: usize,
        row_stride: usize,
    ) -> Result<Self, KernelError> {
        if rows > 1 && row_stride < cols {
            return Err(KernelError::InvalidStride {
                what: "matrix",
                row_stride,
                cols,
            });
        }
        // An extent past usize::MAX cannot fit in any slice: report it as the buffer being too small.
        let needed = view_extent(rows, cols, row_stride).unwrap_or(usize::MAX);
        if data.len() < needed {
            return Err(KernelError::BufferTooSmall {
                what: "matrix",
                needed,
                got: data.len(),
            });
        }
        Ok(Self {
            data,
            rows,
            cols,
            row_stride,
        })
    }
    pub fn rows(&self) -> usize {
        self.rows
    }
    pub fn cols(&self) -> usize {
        self.cols
    }
    pub fn row_stride(&self) -> usize {
        self.row_stride
    }
    pub fn data(&self) -> &'a [T] {
        self.data
    }
    pub fn row(&self, i: usize) -> &'a [T] {
        &self.data[i * self.row_stride..i * self.row_stride + self.cols]
    }
}

/// Elements addressed by a `rows × cols` row-major view `row_stride` apart, or `None` when that overflows `usize`
/// (checked even in release builds: a wrapped extent would let a view reach past its slice).
pub(crate) fn view_extent(rows: usize, cols: usize, row_stride: usize) -> Option<usize> {
    if rows == 0 || cols == 0 {
        return Some(0);
    }
    (rows - 1).checked_mul(row_stride)?.checked_add(cols)
}

/// `len >= rows × cols` with the product checked (an overflowing product is never satisfied).
pub(crate) fn holds(len: usize, rows: usize, cols: usize) -> bool {
    rows.checked_mul(cols).is_some_and(|n| len >= n)
}

/// `len` covers a `rows × cols` view `row_stride` apart, the extent checked.
pub(crate) fn holds_view(len: usize, rows: usize, cols: usize, row_stride: usize) -> bool {
    view_extent(rows, cols, row_stride).is_some_and(|n| len >= n)
}

/// What models do to logits between the head and the loss, applied in this order, each only when set.
#[derive(Clone, Copy, Debug, Default)]
pub struct Epilogue<'a> {
    /// `+ logits_bias[j]` (Bart-style `final_logits_bias`); receives no gradient. Length V.
    pub logits_bias: Option<&'a [f32]>,
    /// `* s` (Cohere `logit_scale`).
    pub scale_multiply: Option<f32>,
    /// `/ s` (Granite `logits_scaling`).
    pub scale_divide: Option<f32>,
    /// `c · tanh(z / c)` (Gemma `final_logit_softcapping`).
    pub softcap: Option<f32>,
    /// `/ t` after every other step: a sampling temperature (TRL's `temperature`), which divides the model's
    /// final logits, softcapped or not.
    pub temperature: Option<f32>,
}

/// How the weight gradient of a bf16/f16 weight is formed: the speed/memory trade-off of the call.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum WeightGrad {
    /// In every row block (three GEMMs' worth of flops), into a V×H f32 accumulator rounded once at the end: the
    /// fastest, and `4·V·H` bytes on top of the chunk budget (`2·V·H` on the AVX512_BF16 path, which keeps the
    /// accumulator's upper halves in the bf16 output itself).
    #[default]
    Accumulate,
    /// In a second pass over vocabulary slabs that recomputes their logits (four GEMMs' worth): no V×H
    /// accumulator, so all scratch stays inside the chunk budget. Same values as `Accumulate` up to f32
    /// summation order.
    Recompute,
}

#[derive(Clone, Copy, Debug)]
pub struct Options<'a> {
    pub ignore_index: i64,
    pub label_smoothing: f32,
    pub z_loss: f32,
    pub epilogue: Epilogue<'a>,
    /// Upper bound on the kernel's scratch memory for logits chunks, in bytes. The default, 60 MiB (63 MB), keeps
    /// the scratch under 64 MB; at large V·H a bigger budget is faster (each row block re-reads W and, for a wanted
    /// weight gradient, rewrites V×H of it), see `bench/kernel_bench.md`.
    pub chunk_budget_bytes: usize,
    /// How a bf16/f16 weight gradient is formed (f32/f64 accumulate into the caller's buffer either way).
    pub weight_grad: WeightGrad,
    /// `false` runs on the calling thread only (the bindings use it in a `fork()`ed child, where a rayon pool
    /// started by the parent is dead). `true` uses the rayon pool the call runs in (the bindings size theirs to
    /// torch's thread count).
    pub parallel: bool,
    /// Print seconds per phase to stderr (benchmarking aid; the Python package sets it from
    /// `LOGITLESS_KERNEL_PROFILE`).
    pub profile: bool,
}

impl Default for Options<'_> {
    fn default() -> Self {
        Self {
            ignore_index: -100,
            label_smoothing: 0.0,
            z_loss: 0.0,
            epilogue: Epilogue::default(),
            chunk_budget_bytes: 60 << 20,
            weight_grad: WeightGrad::Accumulate,
            parallel: true,
            profile: false,
        }
    }
}

/// The weight `s_i` of each row's loss in the gradients that are computed.
#[derive(Clone, Copy, Debug)]
pub enum GradScale<'a> {
    /// Same `s` for every row (mean: `1/count` or `1/num_items_in_batch`; sum: 1).
    Uniform(f64),
    /// One `s_i` per row (reduction "none": the incoming per-row gradient). Length N.
    PerRow(&'a [f32]),
}

/// One call's inputs, as the row pass (`fused::run`) and the weight pass over vocabulary slabs (`weight_pass::run`)
/// read them.
#[derive(Clone, Copy)]
pub(crate) struct Job<'a, S> {
    pub hidden: MatRef<'a, S>,
    pub weight: MatRef<'a, S>,
    pub bias: Option<&'a [S]>,
    pub targets: &'a [i64],
    pub options: &'a Options<'a>,
    pub grad_scale: GradScale<'a>,
}

/// Per-row outputs besides the gradients; `None` = not wanted. Rows whose target is ignored are written as zeros.
#[derive(Default)]
pub struct RowOutputs<'a> {
    /// `N` losses `l_i` (unweighted by `GradScale`).
    pub loss: Option<&'a mut [f64]>,
    /// `N × TOKEN_STATS` statistics of each row's distribution `p = softmax(z)`, row-major, in the order of
    /// [`TokenStat`]. Computed in the same row pass as the loss, with no gradient.
    pub stats: Option<&'a mut [f64]>,
}

/// The columns of [`RowOutputs::stats`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(usize)]
pub enum TokenStat {
    /// `-Σ_j p_j log p_j = lse - Σ_j p_j z_j`.
    Entropy = 0,
    /// `Σ_j z_j / V`.
    MeanLogit = 1,
    /// `log Σ_j p_j²`.
    LogSumSqProbs = 2,
    /// 1.0 when the target is the argmax of `z` (ties go to the lowest index), else 0.0.
    IsTop1 = 3,
}

/// Columns of [`RowOutputs::stats`].
pub const TOKEN_STATS: usize = 4;

/// Where to write gradients; `None` means "not wanted" and skips that work entirely (a frozen head skips the
/// weight-gradient GEMM). Buffers are contiguous row-major: d_hidden `N×H`, d_weight `V×H`, d_bias `V`.
/// Rows of d_hidden whose target is ignored are written as zeros.
pub struct Grads<'a, T> {
    pub d_hidden: Option<&'a mut [T]>,
    pub d_weight: Option<&'a mut [T]>,
    pub d_bias: Option<&'a mut [T]>,
}

impl<T> Default for Grads<'_, T> {
    fn default() -> Self {
        Self {
            d_hidden: None,
            d_weight: None,
            d_bias: None,
        }
    }
}

/// A low-rank term added to the logits before the epilogue, `a · bᵀ` (a LoRA adapter on a frozen head: `a` holds
/// each row's `scaling · A·x`, `b` is the adapter's `B`), and where its gradients go. f32 factors, for f32, bf16 and
/// f16 inputs; the head's weight takes no gradient beside it.
pub struct LowRank<'a> {
    /// `N × r`.
    pub a: MatRef<'a, f32>,
    /// `V × r`.
    pub b: MatRef<'a, f32>,
    /// `N × r`, contiguous; rows whose target is ignored are written as zeros.
    pub d_a: Option<&'a mut [f32]>,
    /// `V × r`, contiguous.
    pub d_b: Option<&'a mut [f32]>,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LossSummary {
    /// Σ_i l_i over non-ignored rows (unweighted by GradScale).
    pub loss_sum: f64,
    /// Number of non-ignored rows.
    pub count: usize,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum KernelError {
    #[error(
        "targets: target {value} at row {row} is outside [0, {vocab}) and is not ignore_index ({ignore_index})"
    )]
    TargetOutOfRange {
        row: usize,
        value: i64,
        vocab: usize,
        ignore_index: i64,
    },
    #[error("{what}: expected {expected}, got {got}")]
    ShapeMismatch {
        what: &'static str,
        expected: String,
        got: String,
    },
    #[error("{what}: row stride {row_stride} is smaller than the row length {cols}")]
    InvalidStride {
        what: &'static str,
        row_stride: usize,
        cols: usize,
    },
    #[error("{what}: buffer holds {got} elements, the view needs {needed}")]
    BufferTooSmall {
        what: &'static str,
        needed: usize,
        got: usize,
    },
    #[error("{what}: {why}")]
    InvalidOption { what: &'static str, why: String },
}

/// Benchmark support (not part of the API): the bf16 engine's GEMMs timed alone.
#[doc(hidden)]
pub mod bench_support {
    /// Best-of-`reps` seconds of the three bf16 GEMMs (logits, d_hidden, d_weight) at full size on the
    /// AVX512_BF16 engine, or `None` where that engine is not used (no AVX512_BF16, or odd `h`).
    pub fn bf16_gemm_seconds(n: usize, h: usize, v: usize, reps: usize) -> Option<[f64; 3]> {
        #[cfg(target_arch = "x86_64")]
        if let Some(cpu) = crate::isa::level().bf16()
            && h.is_multiple_of(2)
        {
            return Some(crate::dpbf16::time_three(cpu, n, h, v, reps));
        }
        let _ = (n, h, v, reps);
        None
    }

    /// The same for f32 on the AVX-512 FMA engine, or `None` where the kernel uses the `gemm` crate for f32.
    pub fn f32_gemm_seconds(n: usize, h: usize, v: usize, reps: usize) -> Option<[f64; 3]> {
        #[cfg(target_arch = "x86_64")]
        if let Some(cpu) = crate::isa::level().avx512() {
            return Some(crate::fma32::time_three(cpu, n, h, v, reps));
        }
        let _ = (n, h, v, reps);
        None
    }
}

/// Loss (always) and the requested gradients, in one pass.
///
/// `hidden`: N×H, `weight`: V×H, `bias`: V, `targets`: N; `rows` (per-row losses and statistics, see [`RowOutputs`]) are
/// written when given, zeros for ignored rows.
///
/// Every argument is checked before any work (targets first-bad-row first, then shapes and options); outputs are
/// fully written (zeros where nothing contributes). Scratch memory: at most `options.chunk_budget_bytes`, but never
/// less than one row's worth (`4·(V + 2H)` bytes for f32/bf16/f16, 8· for f64); for bf16/f16 with `d_weight`
/// wanted and [`WeightGrad::Accumulate`], an f32 `V×H` accumulator on top, so the weight gradient is rounded once
/// (`2·V·H` bytes on the AVX512_BF16 path: the accumulator's upper halves live in `d_weight` itself;
/// [`WeightGrad::Recompute`] forms it slab by slab inside the budget instead).
#[allow(clippy::too_many_arguments)]
pub fn fused_linear_cross_entropy<T: Element>(
    hidden: MatRef<'_, T>,
    weight: MatRef<'_, T>,
    bias: Option<&[T]>,
    targets: &[i64],
    options: &Options<'_>,
    grad_scale: GradScale<'_>,
    rows: RowOutputs<'_>,
    grads: Grads<'_, T>,
) -> Result<LossSummary, KernelError> {
    call(
        hidden, weight, bias, None, targets, options, grad_scale, rows, grads,
    )
}

/// [`fused_linear_cross_entropy`] with a [`LowRank`] term added to the logits (before the epilogue), its gradients
/// formed in the same pass from the f32 logits gradient: two more GEMMs of rank `r` per row block
/// (`G·B` and `Gᵀ·A`), plus one for the term itself. Refused for f64 inputs and beside a wanted weight gradient.
#[allow(clippy::too_many_arguments)]
pub fn fused_linear_cross_entropy_low_rank<T: Element>(
    hidden: MatRef<'_, T>,
    weight: MatRef<'_, T>,
    bias: Option<&[T]>,
    low_rank: LowRank<'_>,
    targets: &[i64],
    options: &Options<'_>,
    grad_scale: GradScale<'_>,
    rows: RowOutputs<'_>,
    grads: Grads<'_, T>,
) -> Result<LossSummary, KernelError> {
    validate_low_rank::<T>(&low_rank, hidden.rows(), weight.rows(), &grads)?;
    call(
        hidden,
        weight,
        bias,
        Some(low_rank),
        targets,
        options,
        grad_scale,
        rows,
        grads,
    )
}

#[allow(clippy::too_many_arguments)]
fn call<T: Element>(
    hidden: MatRef<'_, T>,
    weight: MatRef<'_, T>,
    bias: Option<&[T]>,
    low: Option<LowRank<'_>>,
    targets: &[i64],
    options: &Options<'_>,
    grad_scale: GradScale<'_>,
    rows: RowOutputs<'_>,
    grads: Grads<'_, T>,
) -> Result<LossSummary, KernelError> {
    validate(
        &hidden,
        &weight,
        bias,
        targets,
        options,
        &grad_scale,
        &rows,
        &grads,
    )?;
    match T::DTYPE {
        DType::F32 => run_as::<T, f32>(
            hidden, weight, bias, low, targets, options, grad_scale, rows, grads,
        ),
        DType::F64 => run_as::<T, f64>(
            hidden, weight, bias, low, targets, options, grad_scale, rows, grads,
        ),
        DType::BF16 => run_as::<T, bf16>(
            hidden, weight, bias, low, targets, options, grad_scale, rows, grads,
        ),
        DType::F16 => run_as::<T, f16>(
            hidden, weight, bias, low, targets, options, grad_scale, rows, grads,
        ),
    }
}

fn validate_low_rank<T: Element>(
    low: &LowRank<'_>,
    n: usize,
    v: usize,
    grads: &Grads<'_, T>,
) -> Result<(), KernelError> {
    if T::DTYPE == DType::F64 {
        return Err(KernelError::InvalidOption {
            what: "low_rank",
            why: "its factors are f32: expected f32, bf16 or f16 inputs".into(),
        });
    }
    if grads.d_weight.is_some() {
        return Err(KernelError::InvalidOption {
            what: "low_rank",
            why: "expected a frozen head (no weight gradient) beside the low-rank term".into(),
        });
    }
    let r = low.b.cols();
    for (what, m, rows) in [("low_rank.a", &low.a, n), ("low_rank.b", &low.b, v)] {
        if m.rows() != rows || m.cols() != r {
            return Err(KernelError::ShapeMismatch {
                what,
                expected: format!("[{rows}, {r}]"),
                got: format!("[{}, {}]", m.rows(), m.cols()),
            });
        }
    }
    if let Some(g) = low.d_a.as_deref() {
        check_len("low_rank.d_a", g.len(), n * r)?;
    }
    if let Some(g) = low.d_b.as_deref() {
        check_len("low_rank.d_b", g.len(), v * r)?;
    }
    Ok(())
}

/// Reinterprets the caller's `T` as the concrete storage type its `DTYPE` names (they are the same type for the
/// four implementations here; an outside `Element` impl that lies about its DTYPE is refused, not transmuted).
fn cast<T: 'static, S: 'static>(x: &[T]) -> Result<&[S], KernelError> {
    if std::any::TypeId::of::<T>() != std::any::TypeId::of::<S>() {
        return Err(KernelError::InvalidOption {
            what: "element type",
            why:
                "Element::DTYPE does not match the type (only f32, f64, bf16 and f16 are supported)"
                    .into(),
        });
    }
    // SAFETY: T and S are the same type (checked above), so pointer, length and alignment carry over.
    Ok(unsafe { std::slice::from_raw_parts(x.as_ptr().cast::<S>(), x.len()) })
}

fn cast_mut<T: 'static, S: 'static>(x: Option<&mut [T]>) -> Result<Option<&mut [S]>, KernelError> {
    match x {
        None => Ok(None),
        Some(x) => {
            cast::<T, S>(&[])?;
            // SAFETY: T and S are the same type (checked just above); the exclusive borrow moves into the result.
            Ok(Some(unsafe {
                std::slice::from_raw_parts_mut(x.as_mut_ptr().cast::<S>(), x.len())
            }))
        }
    }
}

fn cast_mat<'a, T: 'static, S: 'static>(m: MatRef<'a, T>) -> Result<MatRef<'a, S>, KernelError> {
    Ok(MatRef {
        data: cast(m.data)?,
        rows: m.rows,
        cols: m.cols,
        row_stride: m.row_stride,
    })
}

#[allow(clippy::too_many_arguments)]
fn run_as<T: Element, S: storage::Storage>(
    hidden: MatRef<'_, T>,
    weight: MatRef<'_, T>,
    bias: Option<&[T]>,
    low: Option<LowRank<'_>>,
    targets: &[i64],
    options: &Options<'_>,
    grad_scale: GradScale<'_>,
    rows: RowOutputs<'_>,
    grads: Grads<'_, T>,
) -> Result<LossSummary, KernelError> {
    let job = Job {
        hidden: cast_mat::<T, S>(hidden)?,
        weight: cast_mat::<T, S>(weight)?,
        bias: bias.map(cast::<T, S>).transpose()?,
        targets,
        options,
        grad_scale,
    };
    let grads = Grads {
        d_hidden: cast_mut::<T, S>(grads.d_hidden)?,
        d_weight: cast_mut::<T, S>(grads.d_weight)?,
        d_bias: cast_mut::<T, S>(grads.d_bias)?,
    };
    Ok(fused::run(job, rows, grads, low))
}

fn check_len(what: &'static str, got: usize, expected: usize) -> Result<(), KernelError> {
    if got == expected {
        Ok(())
    } else {
        Err(KernelError::ShapeMismatch {
            what,
            expected: format!("length {expected}"),
            got: format!("length {got}"),
        })
    }
}

fn check_finite(what: &'static str, x: Option<f32>) -> Result<(), KernelError> {
    match x {
        Some(x) if !x.is_finite() => Err(KernelError::InvalidOption {
            what,
            why: format!("{x} is not finite"),
        }),
        _ => Ok(()),
    }
}

#[allow(clippy::too_many_arguments)]
fn validate<T>(
    hidden: &MatRef<'_, T>,
    weight: &MatRef<'_, T>,
    bias: Option<&[T]>,
    targets: &[i64],
    options: &Options<'_>,
    grad_scale: &GradScale<'_>,
    rows: &RowOutputs<'_>,
    grads: &Grads<'_, T>,
) -> Result<(), KernelError> {
    let (n, h, v) = (hidden.rows(), hidden.cols(), weight.rows());
    check_len("targets", targets.len(), n)?;
    let ignore_index = options.ignore_index;
    if let Some((row, &value)) = targets
        .iter()
        .enumerate()
        .find(|&(_, &t)| t != ignore_index && (t < 0 || t as u64 >= v as u64))
    {
        return Err(KernelError::TargetOutOfRange {
            row,
            value,
            vocab: v,
            ignore_index,
        });
    }
    if weight.cols() != h {
        return Err(KernelError::ShapeMismatch {
            what: "weight",
            expected: format!("[V, {h}] (hidden is [{n}, {h}])"),
            got: format!("[{v}, {}]", weight.cols()),
        });
    }
    if let Some(b) = bias {
        check_len("bias", b.len(), v)?;
    }
    if let Some(b) = options.epilogue.logits_bias {
        check_len("logits_bias", b.len(), v)?;
    }
    if let GradScale::PerRow(s) = grad_scale {
        check_len("grad_scale (per row)", s.len(), n)?;
    }
    if let Some(l) = rows.loss.as_deref() {
        check_len("per_row_loss", l.len(), n)?;
    }
    if let Some(st) = rows.stats.as_deref() {
        check_len("token_stats", st.len(), n.saturating_mul(TOKEN_STATS))?;
    }
    if let Some(g) = grads.d_hidden.as_deref() {
        check_len("d_hidden", g.len(), n * h)?;
    }
    if let Some(g) = grads.d_weight.as_deref() {
        check_len("d_weight", g.len(), v * h)?;
    }
    if let Some(g) = grads.d_bias.as_deref() {
        check_len("d_bias", g.len(), v)?;
    }
    let eps = options.label_smoothing;
    if !(0.0..=1.0).contains(&eps) {
        return Err(KernelError::InvalidOption {
            what: "label_smoothing",
            why: format!("{eps} is not in [0, 1]"),
        });
    }
    check_finite("z_loss", Some(options.z_loss))?;
    check_finite("scale_multiply", options.epilogue.scale_multiply)?;
    check_finite("scale_divide", options.epilogue.scale_divide)?;
    check_finite("softcap", options.epilogue.softcap)?;
    check_finite("temperature", options.epilogue.temperature)?;
    if options.epilogue.temperature.is_some_and(|t| t <= 0.0) {
        return Err(KernelError::InvalidOption {
            what: "temperature",
            why: "expected a value > 0".into(),
        });
    }
    if let GradScale::Uniform(s) = grad_scale
        && !s.is_finite()
    {
        return Err(KernelError::InvalidOption {
            what: "grad_scale",
            why: format!("{s} is not finite"),
        });
    }
    Ok(())
}
