//! Why a forward was not rewritten: a stable reason code, a human message and a source line.

use std::fmt;

/// Stable reason codes. Their kebab-case strings ([`ReasonCode::as_str`]) are part of the public output
/// (`python -m logitless audit --json`), so they never change meaning once released.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ReasonCode {
    /// The source does not parse as Python.
    ParseError,
    /// No `def forward` (the class inherits one we could not resolve, or the input is not a function).
    NoForward,
    /// No top-level `if labels is not None:` branch that computes a loss.
    NoLabelsBranch,
    /// The labels branch has an `elif` or `else`.
    NonEmptyElse,
    /// The loss is not `self.loss_function(...)` nor a plain `CrossEntropyLoss()` call in a known shape.
    UnsupportedLoss,
    /// The loss is computed from something other than the head's output (shifted or sliced logits).
    LossInputNotLogits,
    /// No `logits = self.<head>(...)` assignment found before the labels branch.
    NoHeadCall,
    /// The head is known not to be a plain `nn.Linear` (e.g. BERT-style `self.cls`, or built otherwise).
    HeadNotLinear,
    /// The head attribute's construction could not be found (audit only).
    HeadUnresolved,
    /// Several heads stacked (`torch.stack([head(h) for head in self.lm_heads])`).
    StackedHeads,
    /// The head call is not `self.<attr>(<hidden>)` with one positional argument.
    HeadCallShape,
    /// The head's input reads the logits variable itself.
    HiddenReadsLogits,
    /// The logits variable is rebound by something that is not a supported epilogue.
    LogitsRebound,
    /// The logits tensor is mutated in place (subscript or augmented assignment).
    LogitsMutated,
    /// The labels branch does more than the loss call, and the extra work reads the logits.
    LabelsBranchReadsLogits,
    /// `labels` is rebound or aliased before the loss call (other than a device move).
    LabelsMutated,
    /// Epilogue steps are repeated or not in the order the fused op applies them.
    EpilogueOrder,
    /// An epilogue guard reads the logits or has an `else`.
    EpilogueGuard,
    /// A statement between the head call and the labels branch is not understood.
    UnexpectedStatement,
    /// An argument evaluated on the fused path (vocab size, loss keyword, epilogue value) reads the logits.
    LossArgsReadLogits,
    /// A name the fused path does not bind (e.g. `loss_fct`, a moved `labels`) is read later.
    DroppedNameUsed,
    /// The logits are used after the loss other than by being returned.
    LogitsUsedAfterLoss,
    /// Formatting the emitter cannot re-indent safely (multi-line strings in the region, tab indentation).
    UnsupportedFormatting,
    /// The emitted code did not re-parse (an internal error; never emitted).
    ReparseFailed,
}

impl ReasonCode {
    /// The stable kebab-case string of this code.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ParseError => "parse-error",
            Self::NoForward => "no-forward",
            Self::NoLabelsBranch => "no-labels-branch",
            Self::NonEmptyElse => "non-empty-else",
            Self::UnsupportedLoss => "unsupported-loss",
            Self::LossInputNotLogits => "loss-input-not-logits",
            Self::NoHeadCall => "no-head-call",
            Self::HeadNotLinear => "head-not-linear",
            Self::HeadUnresolved => "head-unresolved",
            Self::StackedHeads => "stacked-heads",
            Self::HeadCallShape => "head-call-shape",
            Self::HiddenReadsLogits => "hidden-reads-logits",
            Self::LogitsRebound => "logits-rebound",
            Self::LogitsMutated => "logits-mutated",
            Self::LabelsBranchReadsLogits => "labels-branch-reads-logits",
            Self::LabelsMutated => "labels-mutated",
            Self::EpilogueOrder => "epilogue-order",
            Self::EpilogueGuard => "epilogue-guard",
            Self::UnexpectedStatement => "unexpected-statement",
            Self::LossArgsReadLogits => "loss-args-read-logits",
            Self::DroppedNameUsed => "dropped-name-used",
            Self::LogitsUsedAfterLoss => "logits-used-after-loss",
            Self::UnsupportedFormatting => "unsupported-formatting",
            Self::ReparseFailed => "reparse-failed",
        }
    }
}

impl fmt::Display for ReasonCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A forward the rewriter does not fully understand; the class keeps its stock forward.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code} (line {line}): {message}")]
pub struct Refusal {
    pub code: ReasonCode,
    pub message: String,
    /// 1-based line in the analysed source (0 when not tied to a line).
    pub line: usize,
}

impl Refusal {
    pub(crate) fn new(code: ReasonCode, line: usize, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            line,
        }
    }
}
