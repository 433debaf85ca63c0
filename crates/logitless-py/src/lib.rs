//! `logitless._core`: conversions, validation and error mapping only. The logic lives in
//! `logitless-kernel` and `logitless-rewrite`.
use pyo3::prelude::*;

mod errors;
mod kernel;
mod rewrite;

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    errors::register(m)?;
    kernel::register(m)?;
    rewrite::register(m)?;
    Ok(())
}
