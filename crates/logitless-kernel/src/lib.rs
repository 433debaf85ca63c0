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
#![forbid(unsafe_op_in_unsafe_fn)]

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
    pub fn new(data: &'a [T], rows: usize, cols: usize, row_stride: usize) -> Result<Self, KernelError> {
        let needed = if rows == 0 || cols == 0 { 0 } else { (rows - 1) * row_stride + cols };
        if rows > 1 && row_stride < cols {
            return Err(KernelError::InvalidStride { what: "matrix", row_stride, cols });
        }
        if data.len() < needed {
            return Err(KernelError::BufferTooSmall { what: "matrix", needed, got: data.len() });
        }
        Ok(Self { data, rows, cols, row_stride })
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
}

#[derive(Clone, Copy, Debug)]
pub struct Options<'a> {
    pub ignore_index: i64,
    pub label_smoothing: f32,
    pub z_loss: f32,
    pub epilogue: Epilogue<'a>,
    /// Upper bound on the kernel's scratch memory for logits chunks, in bytes.
    pub chunk_budget_bytes: usize,
    /// `false` runs on the calling thread only (the bindings use it in a `fork()`ed child, where a rayon pool
    /// started by the parent is dead).
    pub parallel: bool,
}

impl Default for Options<'_> {
    fn default() -> Self {
        Self {
            ignore_index: -100,
            label_smoothing: 0.0,
            z_loss: 0.0,
            epilogue: Epilogue::default(),
            chunk_budget_bytes: 32 << 20,
            parallel: true,
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
        Self { d_hidden: None, d_weight: None, d_bias: None }
    }
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
    #[error("target {value} at row {row} is outside [0, {vocab}) and is not ignore_index ({ignore_index})")]
    TargetOutOfRange { row: usize, value: i64, vocab: usize, ignore_index: i64 },
    #[error("{what}: expected {expected}, got {got}")]
    ShapeMismatch { what: &'static str, expected: String, got: String },
    #[error("{what}: row stride {row_stride} is smaller than the row length {cols}")]
    InvalidStride { what: &'static str, row_stride: usize, cols: usize },
    #[error("{what}: buffer holds {got} elements, the view needs {needed}")]
    BufferTooSmall { what: &'static str, needed: usize, got: usize },
    #[error("invalid option {what}: {why}")]
    InvalidOption { what: &'static str, why: String },
}

/// Loss (always) and the requested gradients, in one pass.
///
/// `hidden`: N×H, `weight`: V×H, `bias`: V, `targets`: N, `per_row_loss`: N (written when given; ignored rows 0).
#[allow(clippy::too_many_arguments)]
pub fn fused_linear_cross_entropy<T: Element>(
    hidden: MatRef<'_, T>,
    weight: MatRef<'_, T>,
    bias: Option<&[T]>,
    targets: &[i64],
    options: &Options<'_>,
    grad_scale: GradScale<'_>,
    per_row_loss: Option<&mut [f64]>,
    grads: Grads<'_, T>,
) -> Result<LossSummary, KernelError> {
    let _ = (hidden, weight, bias, targets, options, grad_scale, per_row_loss, grads);
    Err(KernelError::InvalidOption { what: "kernel", why: "not implemented yet".into() })
}
