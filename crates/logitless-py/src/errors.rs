//! The one place where core errors become Python exceptions.
use pyo3::exceptions::{PyRuntimeError, PyTypeError, PyValueError};
use pyo3::prelude::*;

pyo3::create_exception!(
    _core,
    LogitlessError,
    PyValueError,
    "Base class of logitless input errors (a ValueError)."
);
pyo3::create_exception!(
    _core,
    LogitlessTypeError,
    PyTypeError,
    "A dtype or type logitless cannot take (a TypeError)."
);

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("LogitlessError", m.py().get_type::<LogitlessError>())?;
    m.add(
        "LogitlessTypeError",
        m.py().get_type::<LogitlessTypeError>(),
    )?;
    Ok(())
}

pub fn kernel_error(e: logitless_kernel::KernelError) -> PyErr {
    LogitlessError::new_err(e.to_string())
}

/// A panic caught at the boundary: a bug in logitless, reported instead of unwinding into the interpreter.
fn internal_error(panic: Box<dyn std::any::Any + Send>) -> PyErr {
    let msg = panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".to_owned());
    PyRuntimeError::new_err(format!("logitless internal error (please report): {msg}"))
}

/// Runs `f`, turning a panic (a bug) into the `RuntimeError` of [`internal_error`]: a `PanicException` is a
/// `BaseException`, which would escape the installer's handlers and break `import transformers.models.X`.
pub fn guarded<T>(f: impl FnOnce() -> T) -> PyResult<T> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).map_err(internal_error)
}

/// A transformers tree the audit cannot read (missing directory, unreadable file).
pub fn audit_error(e: logitless_rewrite::AuditError) -> PyErr {
    LogitlessError::new_err(e.to_string())
}
