//! Forward analysis and rewrite for transformers causal LMs (placeholder: owned by the rewriter work).
//! See docs/design.md §"Rewrite contract" for what the emitted code calls.

/// Why a forward was not rewritten.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub code: &'static str,
    pub message: String,
    pub line: usize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rewrite {
    pub source: String,
}

pub fn rewrite_forward(source: &str) -> Result<Rewrite, Refusal> {
    let _ = source;
    Err(Refusal { code: "not-implemented", message: "rewriter not implemented yet".into(), line: 0 })
}
