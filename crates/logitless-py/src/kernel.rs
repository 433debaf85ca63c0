//! Bindings for the fused op: `_core.fused_linear_cross_entropy`.
//!
//! Tensors cross zero-copy as `(data_ptr, shape, strides, dtype-name)` tuples built by `logitless/_rust.py` from
//! live `torch.Tensor`s that the caller keeps alive for the whole call. Everything about them is validated here
//! before any slice is formed; the kernel then runs with the GIL released. Kernel errors become Python exceptions in
//! `errors.rs`; a panic (a bug) is caught and raised as `RuntimeError`, never unwound into the interpreter.
use std::sync::{Arc, Mutex, TryLockError};

use half::{bf16, f16};
use logitless_kernel::isa::{self, Isa};
use logitless_kernel::{
    Element, Epilogue, GradScale, Grads, KernelError, LossSummary, LowRank, MatRef, Options,
    RowOutputs, TOKEN_STATS, WeightGrad, fused_linear_cross_entropy,
    fused_linear_cross_entropy_low_rank,
};
use pyo3::prelude::*;

use crate::errors::{LogitlessError, LogitlessTypeError, guarded, kernel_error};

/// `(data_ptr, shape, strides, dtype-name)` of a torch tensor, strides in elements.
#[derive(FromPyObject)]
pub struct TensorArg(usize, Vec<usize>, Vec<i64>, String);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum DType {
    F32,
    F64,
    BF16,
    F16,
    I64,
}

impl DType {
    fn parse(what: &str, name: &str) -> PyResult<Self> {
        Ok(match name {
            "float32" => Self::F32,
            "float64" => Self::F64,
            "bfloat16" => Self::BF16,
            "float16" => Self::F16,
            "int64" => Self::I64,
            other => {
                return Err(LogitlessTypeError::new_err(format!(
                    "{what}: expected dtype float32, bfloat16, float16, float64 or int64, got {other}"
                )));
            }
        })
    }
    fn name(self) -> &'static str {
        match self {
            Self::F32 => "float32",
            Self::F64 => "float64",
            Self::BF16 => "bfloat16",
            Self::F16 => "float16",
            Self::I64 => "int64",
        }
    }
    fn size(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::F64 | Self::I64 => 8,
            Self::BF16 | Self::F16 => 2,
        }
    }
}

/// A validated buffer: `len` elements of `dtype` starting at `ptr`, all addressed by the tensor's view.
#[derive(Clone, Copy, Debug)]
struct Buf {
    what: &'static str,
    ptr: usize,
    len: usize,
    dtype: DType,
    /// Matrices only: rows, cols, row stride (elements).
    rows: usize,
    cols: usize,
    row_stride: usize,
}

impl Buf {
    fn byte_range(&self) -> (usize, usize) {
        (self.ptr, self.ptr + self.len * self.dtype.size())
    }
}

fn value_error(msg: String) -> PyErr {
    LogitlessError::new_err(msg)
}

fn parse_common(
    what: &'static str,
    t: &TensorArg,
    ndim: usize,
) -> PyResult<(Vec<usize>, Vec<usize>, DType)> {
    let TensorArg(_, shape, strides, dtype) = t;
    let dtype = DType::parse(what, dtype)?;
    if shape.len() != ndim || strides.len() != ndim {
        return Err(value_error(format!(
            "{what}: expected a {ndim}-d tensor, got shape {shape:?} with strides {strides:?}"
        )));
    }
    let strides = strides
        .iter()
        .map(|&s| usize::try_from(s))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| {
            value_error(format!(
                "{what}: expected non-negative strides, got {strides:?}"
            ))
        })?;
    Ok((shape.clone(), strides, dtype))
}

fn check_ptr(what: &'static str, ptr: usize, len: usize, dtype: DType) -> PyResult<()> {
    if len > 0 && (ptr == 0 || !ptr.is_multiple_of(dtype.size())) {
        return Err(value_error(format!(
            "{what}: data pointer {ptr:#x} is null or not aligned for {}",
            dtype.name()
        )));
    }
    len.checked_mul(dtype.size())
        .and_then(|b| ptr.checked_add(b))
        .ok_or_else(|| {
            value_error(format!(
                "{what}: buffer of {len} elements overflows the address space"
            ))
        })?;
    Ok(())
}

/// A `rows × cols` matrix with unit column stride and any row stride at least `cols`.
fn matrix(what: &'static str, t: &TensorArg, contiguous: bool) -> PyResult<Buf> {
    let (shape, strides, dtype) = parse_common(what, t, 2)?;
    let (rows, cols) = (shape[0], shape[1]);
    // Strides of size-1 dimensions carry no meaning in torch; normalise them.
    if cols > 1 && strides[1] != 1 {
        return Err(value_error(format!(
            "{what}: expected unit column stride, got strides {strides:?}"
        )));
    }
    let row_stride = if rows <= 1 || cols == 0 {
        cols
    } else {
        strides[0]
    };
    if rows > 1 && (row_stride < cols || (contiguous && row_stride != cols)) {
        let want = if contiguous {
            "a contiguous"
        } else {
            "a row stride >= the row length"
        };
        return Err(value_error(format!(
            "{what}: expected {want} matrix, got shape {shape:?} strides {strides:?}"
        )));
    }
    let len = if rows == 0 || cols == 0 {
        0
    } else {
        (rows - 1)
            .checked_mul(row_stride)
            .and_then(|x| x.checked_add(cols))
            .ok_or_else(|| {
                value_error(format!(
                    "{what}: shape {shape:?} strides {strides:?} overflow"
                ))
            })?
    };
    check_ptr(what, t.0, len, dtype)?;
    Ok(Buf {
        what,
        ptr: t.0,
        len,
        dtype,
        rows,
        cols,
        row_stride,
    })
}

/// A contiguous vector.
fn vector(what: &'static str, t: &TensorArg) -> PyResult<Buf> {
    let (shape, strides, dtype) = parse_common(what, t, 1)?;
    let len = shape[0];
    if len > 1 && strides[0] != 1 {
        return Err(value_error(format!(
            "{what}: expected a contiguous vector, got stride {}",
            strides[0]
        )));
    }
    check_ptr(what, t.0, len, dtype)?;
    Ok(Buf {
        what,
        ptr: t.0,
        len,
        dtype,
        rows: len,
        cols: 1,
        row_stride: 1,
    })
}

fn expect(buf: &Buf, dtype: DType, shape: &[usize], got: &[usize]) -> PyResult<()> {
    if buf.dtype != dtype {
        return Err(LogitlessTypeError::new_err(format!(
            "{}: expected dtype {}, got {}",
            buf.what,
            dtype.name(),
            buf.dtype.name()
        )));
    }
    if shape != got {
        return Err(value_error(format!(
            "{}: expected shape {shape:?}, got {got:?}",
            buf.what
        )));
    }
    Ok(())
}

/// Everything the kernel call needs, validated.
struct Call {
    hidden: Buf,
    weight: Buf,
    bias: Option<Buf>,
    targets: Buf,
    logits_bias: Option<Buf>,
    row_scale: Option<Buf>,
    per_row_loss: Option<Buf>,
    token_stats: Option<Buf>,
    d_hidden: Option<Buf>,
    d_weight: Option<Buf>,
    d_bias: Option<Buf>,
    /// The low-rank term: `a` (N × r), `b` (V × r), f32, and its gradients' buffers (contiguous f32).
    low_a: Option<Buf>,
    low_b: Option<Buf>,
    d_low_a: Option<Buf>,
    d_low_b: Option<Buf>,
    grad_scale: f64,
    ignore_index: i64,
    label_smoothing: f32,
    z_loss: f32,
    scale_multiply: Option<f32>,
    scale_divide: Option<f32>,
    softcap: Option<f32>,
    temperature: Option<f32>,
    chunk_budget_bytes: Option<usize>,
    weight_grad: WeightGrad,
    parallel: bool,
    profile: bool,
}

impl Call {
    /// Inputs may alias one another (all read-only); each output must overlap nothing else, so that the
    /// `&mut` slices formed from them are unique.
    fn check_outputs_disjoint(&self) -> PyResult<()> {
        let outputs = [
            self.per_row_loss,
            self.token_stats,
            self.d_hidden,
            self.d_weight,
            self.d_bias,
            self.d_low_a,
            self.d_low_b,
        ];
        let all = [self.hidden, self.weight, self.targets]
            .into_iter()
            .chain(self.bias)
            .chain(self.logits_bias)
            .chain(self.row_scale)
            .chain(self.low_a)
            .chain(self.low_b)
            .chain(outputs.iter().flatten().copied())
            .collect::<Vec<_>>();
        for out in outputs.iter().flatten() {
            let (lo, hi) = out.byte_range();
            if lo == hi {
                continue;
            }
            for other in &all {
                if other.what == out.what {
                    continue;
                }
                let (olo, ohi) = other.byte_range();
                if olo < hi && lo < ohi {
                    return Err(value_error(format!(
                        "{}: output buffer overlaps {}",
                        out.what, other.what
                    )));
                }
            }
        }
        Ok(())
    }
}

/// # Safety
/// `buf` must describe memory that is valid for reads of `buf.len` elements of `T` for `'a` and is not written
/// during `'a` (see the validation in `fused_linear_cross_entropy`).
unsafe fn slice<'a, T>(buf: &Buf) -> &'a [T] {
    if buf.len == 0 {
        return &[];
    }
    // SAFETY: non-null and aligned (check_ptr), valid for buf.len reads (caller's contract).
    unsafe { std::slice::from_raw_parts(buf.ptr as *const T, buf.len) }
}

/// # Safety
/// As `slice`, and additionally valid for writes and not aliased by any other live reference during `'a`.
unsafe fn slice_mut<'a, T>(buf: &Buf) -> &'a mut [T] {
    if buf.len == 0 {
        return &mut [];
    }
    // SAFETY: non-null and aligned (check_ptr), valid and unaliased for buf.len elements (caller's contract).
    unsafe { std::slice::from_raw_parts_mut(buf.ptr as *mut T, buf.len) }
}

fn run<T: Element>(call: &Call) -> Result<LossSummary, KernelError> {
    // Why every slice below is sound: each Buf was validated against the shape, strides, dtype and pointer of a live
    // torch tensor that the Python caller (`logitless/_rust.py`) holds for the whole call; `len` counts exactly the
    // elements that tensor's view addresses, so the memory is allocated and initialised; pointers are non-null
    // and aligned for the dtype, which matches `T` (checked by the caller of `run`); outputs overlap no other
    // buffer (`check_outputs_disjoint`), so each `&mut` slice is the only reference to its memory.
    // SAFETY: as explained above.
    let hidden_data: &[T] = unsafe { slice(&call.hidden) };
    // SAFETY: as above.
    let weight_data: &[T] = unsafe { slice(&call.weight) };
    // SAFETY: as above.
    let bias: Option<&[T]> = call.bias.as_ref().map(|b| unsafe { slice(b) });
    // SAFETY: as above (targets are int64).
    let targets: &[i64] = unsafe { slice(&call.targets) };
    // SAFETY: as above (float32).
    let logits_bias: Option<&[f32]> = call.logits_bias.as_ref().map(|b| unsafe { slice(b) });
    // SAFETY: as above (float32).
    let row_scale: Option<&[f32]> = call.row_scale.as_ref().map(|b| unsafe { slice(b) });
    // SAFETY: as above (float64 output, unaliased).
    let per_row_loss: Option<&mut [f64]> =
        call.per_row_loss.as_ref().map(|b| unsafe { slice_mut(b) });
    // SAFETY: as above (float64 output, unaliased).
    let token_stats: Option<&mut [f64]> =
        call.token_stats.as_ref().map(|b| unsafe { slice_mut(b) });
    let grads = Grads::<T> {
        // SAFETY: as above (outputs, unaliased).
        d_hidden: call.d_hidden.as_ref().map(|b| unsafe { slice_mut(b) }),
        // SAFETY: as above.
        d_weight: call.d_weight.as_ref().map(|b| unsafe { slice_mut(b) }),
        // SAFETY: as above.
        d_bias: call.d_bias.as_ref().map(|b| unsafe { slice_mut(b) }),
    };
    let h = &call.hidden;
    let w = &call.weight;
    let hidden = MatRef::new(hidden_data, h.rows, h.cols, h.row_stride)?;
    let weight = MatRef::new(weight_data, w.rows, w.cols, w.row_stride)?;
    let mut options = Options {
        ignore_index: call.ignore_index,
        label_smoothing: call.label_smoothing,
        z_loss: call.z_loss,
        epilogue: Epilogue {
            logits_bias,
            scale_multiply: call.scale_multiply,
            scale_divide: call.scale_divide,
            softcap: call.softcap,
            temperature: call.temperature,
        },
        weight_grad: call.weight_grad,
        parallel: call.parallel,
        profile: call.profile,
        ..Options::default()
    };
    if let Some(budget) = call.chunk_budget_bytes {
        options.chunk_budget_bytes = budget;
    }
    let grad_scale = match row_scale {
        Some(s) => GradScale::PerRow(s),
        None => GradScale::Uniform(call.grad_scale),
    };
    let rows = RowOutputs {
        loss: per_row_loss,
        stats: token_stats,
    };
    let (Some(a), Some(b)) = (&call.low_a, &call.low_b) else {
        return fused_linear_cross_entropy(
            hidden, weight, bias, targets, &options, grad_scale, rows, grads,
        );
    };
    // SAFETY: as above (float32 inputs).
    let (a_data, b_data): (&[f32], &[f32]) = unsafe { (slice(a), slice(b)) };
    let low = LowRank {
        a: MatRef::new(a_data, a.rows, a.cols, a.row_stride)?,
        b: MatRef::new(b_data, b.rows, b.cols, b.row_stride)?,
        // SAFETY: as above (float32 outputs, unaliased).
        d_a: call.d_low_a.as_ref().map(|g| unsafe { slice_mut(g) }),
        // SAFETY: as above.
        d_b: call.d_low_b.as_ref().map(|g| unsafe { slice_mut(g) }),
    };
    fused_linear_cross_entropy_low_rank(
        hidden, weight, bias, low, targets, &options, grad_scale, rows, grads,
    )
}

/// The kernel's thread pool: sized to the caller's thread count (torch's `get_num_threads()`, which users and
/// launchers already set per rank), owned by the process that built it. rayon's global pool would use every
/// core whatever torch was told.
struct Pool {
    pid: u32,
    threads: usize,
    pool: Arc<rayon::ThreadPool>,
}

static POOL: Mutex<Option<Pool>> = Mutex::new(None);

/// The pool for `threads` threads, or `None` to run on the calling thread (one thread, or no pool could be had).
///
/// A `fork()`ed child inherits the parent's pool bookkeeping but none of its threads, so work submitted there
/// would never run: a pool built by another process is leaked, never used or dropped, and the child builds its
/// own. `try_lock`: a child forked while another thread held the lock must not wait for a thread it lacks.
fn pool_for(threads: usize) -> Option<Arc<rayon::ThreadPool>> {
    if threads <= 1 {
        return None;
    }
    let pid = std::process::id();
    let mut slot = match POOL.try_lock() {
        Ok(slot) => slot,
        Err(TryLockError::Poisoned(poisoned)) => poisoned.into_inner(),
        Err(TryLockError::WouldBlock) => return None,
    };
    if let Some(p) = slot.as_ref()
        && p.pid == pid
        && p.threads == threads
    {
        return Some(Arc::clone(&p.pool));
    }
    if let Some(old) = slot.take()
        && old.pid != pid
    {
        // Its worker threads exist only in the parent: dropping it here would signal threads that are not there.
        std::mem::forget(old);
    }
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(|i| format!("logitless-{i}"))
        .build()
        .ok()?;
    let pool = Arc::new(pool);
    *slot = Some(Pool {
        pid,
        threads,
        pool: Arc::clone(&pool),
    });
    Some(pool)
}

fn nonzero(x: Option<f64>) -> Option<f32> {
    x.filter(|v| *v != 0.0).map(|v| v as f32)
}

/// Fused linear + cross-entropy on CPU tensors; see `_core.pyi` and docs/design.md ("Binding contract").
#[pyfunction]
#[pyo3(name = "fused_linear_cross_entropy", signature = (hidden, weight, bias, targets, *, ignore_index, label_smoothing, z_loss, logits_bias=None,
    scale_multiply=None, scale_divide=None, softcap=None, temperature=None, grad_scale=None, row_scale=None,
    per_row_loss=None, token_stats=None, d_hidden=None, d_weight=None, d_bias=None, chunk_budget_bytes=None, weight_grad="accumulate", num_threads=1,
    kernel_isa=None, profile=false, low_a=None, low_b=None, d_low_a=None, d_low_b=None))]
#[allow(clippy::too_many_arguments)]
fn fused_linear_cross_entropy_py(
    py: Python<'_>,
    hidden: TensorArg,
    weight: TensorArg,
    bias: Option<TensorArg>,
    targets: TensorArg,
    ignore_index: i64,
    label_smoothing: f64,
    z_loss: f64,
    logits_bias: Option<TensorArg>,
    scale_multiply: Option<f64>,
    scale_divide: Option<f64>,
    softcap: Option<f64>,
    temperature: Option<f64>,
    grad_scale: Option<f64>,
    row_scale: Option<TensorArg>,
    per_row_loss: Option<TensorArg>,
    token_stats: Option<TensorArg>,
    d_hidden: Option<TensorArg>,
    d_weight: Option<TensorArg>,
    d_bias: Option<TensorArg>,
    chunk_budget_bytes: Option<usize>,
    weight_grad: &str,
    num_threads: usize,
    kernel_isa: Option<&str>,
    profile: bool,
    low_a: Option<TensorArg>,
    low_b: Option<TensorArg>,
    d_low_a: Option<TensorArg>,
    d_low_b: Option<TensorArg>,
) -> PyResult<(f64, usize)> {
    let weight_grad = match weight_grad {
        "accumulate" => WeightGrad::Accumulate,
        "recompute" => WeightGrad::Recompute,
        other => {
            return Err(value_error(format!(
                "weight_grad: expected 'accumulate' or 'recompute', got {other:?}"
            )));
        }
    };
    let cap = match kernel_isa {
        None => None,
        Some(name) => Some(Isa::parse(name).ok_or_else(|| {
            value_error(format!(
                "LOGITLESS_KERNEL_ISA: expected one of portable, avx2, avx512, avx512bf16, amx, got {name:?}"
            ))
        })?),
    };
    let h = matrix("hidden", &hidden, false)?;
    let w = matrix("weight", &weight, false)?;
    let (n, hd, v) = (h.rows, h.cols, w.rows);
    let dt = h.dtype;
    if dt == DType::I64 {
        return Err(LogitlessTypeError::new_err(
            "hidden: expected a float dtype, got int64",
        ));
    }
    expect(&w, dt, &[v, hd], &[w.rows, w.cols])?;
    let bias = bias.map(|b| vector("bias", &b)).transpose()?;
    if let Some(b) = &bias {
        expect(b, dt, &[v], &[b.len])?;
    }
    let t = vector("targets", &targets)?;
    expect(&t, DType::I64, &[n], &[t.len])?;
    let logits_bias = logits_bias.map(|b| vector("logits_bias", &b)).transpose()?;
    if let Some(b) = &logits_bias {
        expect(b, DType::F32, &[v], &[b.len])?;
    }
    let row_scale = row_scale.map(|b| vector("row_scale", &b)).transpose()?;
    if let Some(b) = &row_scale {
        expect(b, DType::F32, &[n], &[b.len])?;
    }
    if row_scale.is_some() && grad_scale.is_some() {
        return Err(value_error(
            "grad_scale and row_scale: expected at most one of them".into(),
        ));
    }
    let per_row_loss = per_row_loss
        .map(|b| vector("per_row_loss", &b))
        .transpose()?;
    if let Some(b) = &per_row_loss {
        expect(b, DType::F64, &[n], &[b.len])?;
    }
    let token_stats = token_stats
        .map(|b| matrix("token_stats", &b, true))
        .transpose()?;
    if let Some(b) = &token_stats {
        expect(b, DType::F64, &[n, TOKEN_STATS], &[b.rows, b.cols])?;
    }
    let d_hidden = d_hidden.map(|b| matrix("d_hidden", &b, true)).transpose()?;
    if let Some(b) = &d_hidden {
        expect(b, dt, &[n, hd], &[b.rows, b.cols])?;
    }
    let d_weight = d_weight.map(|b| matrix("d_weight", &b, true)).transpose()?;
    if let Some(b) = &d_weight {
        expect(b, dt, &[v, hd], &[b.rows, b.cols])?;
    }
    let d_bias = d_bias.map(|b| vector("d_bias", &b)).transpose()?;
    if let Some(b) = &d_bias {
        expect(b, dt, &[v], &[b.len])?;
    }
    let low_a = low_a.map(|m| matrix("low_a", &m, false)).transpose()?;
    let low_b = low_b.map(|m| matrix("low_b", &m, false)).transpose()?;
    let rank = match (&low_a, &low_b) {
        (Some(a), Some(b)) => {
            expect(b, DType::F32, &[v, b.cols], &[b.rows, b.cols])?;
            expect(a, DType::F32, &[n, b.cols], &[a.rows, a.cols])?;
            b.cols
        }
        (None, None) => 0,
        _ => {
            return Err(value_error(
                "low_a and low_b: expected both or neither".into(),
            ));
        }
    };
    let d_low_a = d_low_a.map(|m| matrix("d_low_a", &m, true)).transpose()?;
    let d_low_b = d_low_b.map(|m| matrix("d_low_b", &m, true)).transpose()?;
    for (g, rows) in [(&d_low_a, n), (&d_low_b, v)] {
        if let Some(g) = g {
            if low_a.is_none() {
                return Err(value_error(format!(
                    "{}: expected no gradient buffer without low_a and low_b",
                    g.what
                )));
            }
            expect(g, DType::F32, &[rows, rank], &[g.rows, g.cols])?;
        }
    }
    let call = Call {
        hidden: h,
        weight: w,
        bias,
        targets: t,
        logits_bias,
        row_scale,
        per_row_loss,
        token_stats,
        d_hidden,
        d_weight,
        d_bias,
        low_a,
        low_b,
        d_low_a,
        d_low_b,
        grad_scale: grad_scale.unwrap_or(1.0),
        ignore_index,
        label_smoothing: label_smoothing as f32,
        z_loss: z_loss as f32,
        scale_multiply: nonzero(scale_multiply),
        scale_divide: nonzero(scale_divide),
        softcap: nonzero(softcap),
        temperature: nonzero(temperature),
        chunk_budget_bytes,
        weight_grad,
        parallel: false,
        profile,
    };
    call.check_outputs_disjoint()?;
    // The environment is process-wide, and so is the cap (set on every call: the variable may have changed).
    isa::set_override(cap);
    let pool = pool_for(num_threads);
    let call = Call {
        parallel: pool.is_some(),
        ..call
    };

    let result = py.detach(|| {
        guarded(|| {
            let work = || match dt {
                DType::F32 => run::<f32>(&call),
                DType::F64 => run::<f64>(&call),
                DType::BF16 => run::<bf16>(&call),
                DType::F16 => run::<f16>(&call),
                DType::I64 => Err(KernelError::InvalidOption {
                    what: "hidden",
                    why: "int64 is not a float dtype".into(),
                }),
            };
            match &pool {
                Some(pool) => pool.install(work),
                None => work(),
            }
        })
    })?;
    result
        .map(|summary| (summary.loss_sum, summary.count))
        .map_err(kernel_error)
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(fused_linear_cross_entropy_py, m)?)?;
    Ok(())
}
