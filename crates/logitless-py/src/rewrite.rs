//! Bindings for the forward rewriter: conversions to dicts only (docs/design.md §"Rewrite contract").
use std::path::Path;

use logitless_rewrite::{
    ClassReport, EpilogueStep, ModuleValue, Outcome, Refusal, Rewrite, RewriteOptions,
};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};

use crate::errors::{audit_error, guarded};

fn epilogue_list<'py>(py: Python<'py>, steps: &[EpilogueStep]) -> PyResult<Bound<'py, PyList>> {
    let list = PyList::empty(py);
    for step in steps {
        let d = PyDict::new(py);
        d.set_item("kind", step.kind.as_str())?;
        d.set_item("expr", &step.expr)?;
        list.append(d)?;
    }
    Ok(list)
}

fn refusal_dict<'py>(py: Python<'py>, r: &Refusal) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("status", "refused")?;
    d.set_item("code", r.code.as_str())?;
    d.set_item("reason", &r.message)?;
    d.set_item("line", r.line)?;
    Ok(d)
}

fn rewrite_dict<'py>(py: Python<'py>, r: &Rewrite) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("status", "patched")?;
    d.set_item("source", &r.source)?;
    d.set_item("head", &r.head)?;
    d.set_item("hidden", &r.hidden)?;
    d.set_item("logits", &r.logits)?;
    d.set_item("loss", &r.loss)?;
    d.set_item("labels", &r.labels)?;
    d.set_item("vocab", r.vocab.as_deref())?;
    d.set_item("epilogue", epilogue_list(py, &r.epilogue)?)?;
    let extra = PyDict::new(py);
    for (name, expr) in &r.extra_loss_kwargs {
        extra.set_item(name, expr)?;
    }
    d.set_item("extra_loss_kwargs", extra)?;
    d.set_item("kwargs", r.kwargs.as_deref())?;
    d.set_item("loss_form", r.loss_form.as_str())?;
    d.set_item("ce_class", r.ce_class.as_deref())?;
    d.set_item("fused_guards", &r.fused_guards)?;
    d.set_item(
        "delegate_target",
        r.delegate_target.as_ref().map(|t| t.as_str()),
    )?;
    let elsewhere = match &r.labels_elsewhere {
        None => None,
        Some(e) => {
            let u = PyDict::new(py);
            u.set_item("decoder_inputs", e.decoder_inputs)?;
            u.set_item("disables_cache", e.disables_cache)?;
            u.set_item("validates", e.validates)?;
            Some(u)
        }
    };
    d.set_item("labels_elsewhere", elsewhere)?;
    d.set_item("line", r.line)?;
    Ok(d)
}

/// `rewrite_forward(source) -> dict`: the rewritten forward and what was recognised, or the refusal.
#[pyfunction]
#[pyo3(name = "rewrite_forward")]
fn rewrite_forward_py<'py>(py: Python<'py>, source: &str) -> PyResult<Bound<'py, PyDict>> {
    let result = py.detach(|| {
        guarded(|| logitless_rewrite::rewrite_forward(source, &RewriteOptions::default()))
    })?;
    match result {
        Ok(rewrite) => rewrite_dict(py, &rewrite),
        Err(refusal) => refusal_dict(py, &refusal),
    }
}

/// `split_head_forward(source) -> dict`: a composite head's forward as prefix + final sub-module, or the refusal.
#[pyfunction]
#[pyo3(name = "split_head_forward")]
fn split_head_forward_py<'py>(py: Python<'py>, source: &str) -> PyResult<Bound<'py, PyDict>> {
    match py.detach(|| guarded(|| logitless_rewrite::split_head_forward(source)))? {
        Ok(split) => {
            let d = PyDict::new(py);
            d.set_item("status", "split")?;
            d.set_item("final", &split.final_attr)?;
            d.set_item("prefix_source", &split.prefix_source)?;
            d.set_item("line", split.line)?;
            Ok(d)
        }
        Err(refusal) => refusal_dict(py, &refusal),
    }
}

/// `analyse_epilogue_module(source) -> dict`: the epilogue an epilogue module's forward applies, or the refusal.
#[pyfunction]
#[pyo3(name = "analyse_epilogue_module")]
fn analyse_epilogue_module_py<'py>(py: Python<'py>, source: &str) -> PyResult<Bound<'py, PyDict>> {
    match py.detach(|| guarded(|| logitless_rewrite::analyse_epilogue_module(source)))? {
        Ok(steps) => {
            let list = PyList::empty(py);
            for step in &steps {
                let d = PyDict::new(py);
                d.set_item("kind", step.kind.as_str())?;
                match &step.value {
                    ModuleValue::Attribute(path) => d.set_item("attribute", path)?,
                    ModuleValue::Number(n) => d.set_item("number", n)?,
                }
                list.append(d)?;
            }
            let d = PyDict::new(py);
            d.set_item("status", "understood")?;
            d.set_item("steps", list)?;
            Ok(d)
        }
        Err(refusal) => refusal_dict(py, &refusal),
    }
}

fn report_dict<'py>(py: Python<'py>, r: &ClassReport) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("class", &r.class)?;
    d.set_item("module", &r.module)?;
    d.set_item("kind", r.kind.as_str())?;
    let (status, code, reason) = match &r.outcome {
        Outcome::Patched => ("patched", None, None),
        Outcome::Refused(refusal) => (
            "refused",
            Some(refusal.code.as_str()),
            Some(refusal.message.as_str()),
        ),
    };
    d.set_item("status", status)?;
    d.set_item("head", r.head.as_deref())?;
    d.set_item("head_is_linear", r.head_is_linear)?;
    d.set_item("head_path", &r.head_path)?;
    d.set_item("epilogue", epilogue_list(py, &r.epilogue)?)?;
    d.set_item("code", code)?;
    d.set_item("reason", reason)?;
    d.set_item("line", r.line)?;
    d.set_item("loss_form", r.loss_form.map(|f| f.as_str()))?;
    d.set_item("forward_from", r.forward_from.as_deref())?;
    Ok(d)
}

/// `audit_tree(models_dir) -> list[dict]`: every causal-LM class under a transformers `models/` directory.
#[pyfunction]
#[pyo3(name = "audit_tree")]
fn audit_tree_py<'py>(py: Python<'py>, models_dir: &str) -> PyResult<Bound<'py, PyList>> {
    let reports = py
        .detach(|| guarded(|| logitless_rewrite::audit_tree(Path::new(models_dir))))?
        .map_err(audit_error)?;
    let list = PyList::empty(py);
    for r in &reports {
        list.append(report_dict(py, r)?)?;
    }
    Ok(list)
}

/// `class_kind(name) -> str | None`: whether the installer patches a class of this name, and as which kind.
#[pyfunction]
#[pyo3(name = "class_kind")]
fn class_kind_py(name: &str) -> Option<&'static str> {
    logitless_rewrite::class_kind(name).map(|k| k.as_str())
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(class_kind_py, m)?)?;
    m.add_function(wrap_pyfunction!(rewrite_forward_py, m)?)?;
    m.add_function(wrap_pyfunction!(audit_tree_py, m)?)?;
    m.add_function(wrap_pyfunction!(split_head_forward_py, m)?)?;
    m.add_function(wrap_pyfunction!(analyse_epilogue_module_py, m)?)?;
    Ok(())
}
