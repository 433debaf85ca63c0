//! The one place where core errors become Python exceptions.
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;

pyo3::create_exception!(_core, LogitlessError, PyValueError, "Base class of logitless input errors (a ValueError).");
pyo3::create_exception!(_core, LogitlessTypeError, PyTypeError, "A dtype or type logitless cannot take (a TypeError).");

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("LogitlessError", m.py().get_type::<LogitlessError>())?;
    m.add("LogitlessTypeError", m.py().get_type::<LogitlessTypeError>())?;
    Ok(())
}

pub fn kernel_error(e: logitless_kernel::KernelError) -> PyErr {
    LogitlessError::new_err(e.to_string())
}
