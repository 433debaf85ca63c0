//! Bindings for the forward rewriter (placeholder: owned by the rewriter work).
use pyo3::prelude::*;

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let _ = m;
    Ok(())
}
