//! Rewrites a transformers causal-LM `forward` so its loss is computed without logits, and audits a
//! transformers source tree. Pure Rust on ruff's parser; no Python needed.
//!
//! ```
//! let source = r#"
//! def forward(self, input_ids, labels=None, **kwargs):
//!     hidden_states = self.model(input_ids).last_hidden_state
//!     logits = self.lm_head(hidden_states)
//!     loss = None
//!     if labels is not None:
//!         loss = self.loss_function(logits, labels, self.vocab_size, **kwargs)
//!     return loss, logits
//! "#;
//! let rewrite = logitless_rewrite::rewrite_forward(source, &Default::default()).unwrap();
//! assert_eq!(rewrite.head, "lm_head");
//! assert!(rewrite.source.contains("__logitless__.hf_loss(hidden_states, self.lm_head, labels"));
//! ```
//!
//! - [`rewrite_forward`]: one `def forward` in, a [`Rewrite`] or a [`Refusal`] (reason code + message + line) out.
//! - [`analyse_epilogue_module`]: a sub-module called on the logits (`logits = self.logit_softcap(logits)`), whose
//!   class is only known at run time: the epilogue its `forward` applies, or a [`Refusal`].
//! - [`audit_tree`]: every language-model head ([`class_kind`]: `*ForCausalLM`, cross-entropy
//!   `*ForConditionalGeneration`, and the older names such as `GPT2LMHeadModel` and `MarianMTModel`) under a
//!   `models/` directory, scanned in parallel.
//!
//! The emitted code calls the `__logitless__` runtime object as fixed in docs/design.md.

mod analysis;
mod audit;
mod delegate;
mod emit;
mod epilogue;
mod epilogue_module;
mod head;
mod labels_use;
mod loss;
mod refusal;
mod source;

pub use audit::{AuditError, ClassKind, ClassReport, Outcome, audit_file, audit_tree, class_kind};
pub use delegate::DelegateTarget;
pub use epilogue::{EpilogueKind, EpilogueStep};
pub use epilogue_module::{ModuleStep, ModuleValue, analyse_epilogue_module};
pub use head::{HeadSplit, split_head_forward};
pub use labels_use::LabelsElsewhere;
pub use loss::LossForm;
pub use refusal::{ReasonCode, Refusal};

/// Options for [`rewrite_forward`].
#[derive(Debug, Clone)]
pub struct RewriteOptions {
    /// Drop documentation-only decorators (`@auto_docstring`, ...). Behavioural ones are always kept.
    pub drop_doc_decorators: bool,
}

impl Default for RewriteOptions {
    fn default() -> Self {
        Self {
            drop_doc_decorators: true,
        }
    }
}

/// A rewritten forward and what was recognised in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rewrite {
    /// The new `def forward` source (it parses; it calls `__logitless__`).
    pub source: String,
    /// The head attribute (`lm_head` for `self.lm_head`).
    pub head: String,
    /// The head's input expression, as written.
    pub hidden: String,
    pub logits: String,
    pub loss: String,
    pub labels: String,
    /// The vocabulary size expression, when the loss call gives one.
    pub vocab: Option<String>,
    /// Epilogue steps in application order.
    pub epilogue: Vec<EpilogueStep>,
    /// Explicit keywords of the loss call passed through (name, expression), in source order.
    pub extra_loss_kwargs: Vec<(String, String)>,
    /// The `**kwargs` name passed to the loss, if any.
    pub kwargs: Option<String>,
    pub loss_form: LossForm,
    /// For the cross-entropy forms, the loss class as the source names it (`CrossEntropyLoss`,
    /// `nn.CrossEntropyLoss`, `torch.nn.CrossEntropyLoss`); the caller checks what it resolves to.
    pub ce_class: Option<String>,
    /// Extra run-time conditions of the fused path (`not (<guard>)` of auxiliary terms that read the logits).
    pub fused_guards: Vec<String>,
    /// Given `labels`, this forward's loss is exactly one a wrapper may compute on this model's logits (the
    /// labels read nowhere else): such a wrapper may hand it its labels instead ([`LossForm::Delegated`]).
    pub delegate_target: Option<DelegateTarget>,
    /// What the labels do besides the loss, when that is nothing or only what [`LabelsElsewhere`] lists: a
    /// caller may then add labels to a call made without them (HF Trainer's label smoothing) and get the same
    /// logits. `None` when they are read anywhere else.
    pub labels_elsewhere: Option<LabelsElsewhere>,
    /// 1-based line of the head statement in the input.
    pub line: usize,
}

/// Rewrites one (dedented) `def forward`, decorators included.
pub fn rewrite_forward(source: &str, options: &RewriteOptions) -> Result<Rewrite, Refusal> {
    source::with_first_function(source, |src, func| rewrite_function(src, func, options))
}

/// Rewrites a function already parsed from `source`.
pub(crate) fn rewrite_function(
    src: &source::Source<'_>,
    func: &ruff_python_ast::StmtFunctionDef,
    options: &RewriteOptions,
) -> Result<Rewrite, Refusal> {
    let plan = match analysis::analyse(src, func) {
        Ok(plan) => plan,
        Err(refusal) => {
            return match delegate::recognise(src, func) {
                None => Err(refusal),
                Some(d) => delegated(src, func, &d?, options),
            };
        }
    };
    let new_source = emit::emit(src, func, &plan, options.drop_doc_decorators);
    source::check_reparse(&new_source, "emitted code")?;
    let mut extra = Vec::new();
    let mut kwargs = None;
    for (name, value) in &plan.loss_keywords {
        match name {
            Some(n) => extra.push((n.clone(), value.clone())),
            None => kwargs = Some(value.clone()),
        }
    }
    Ok(Rewrite {
        source: new_source,
        head: plan.head.clone(),
        hidden: src.slice(plan.hidden).to_string(),
        logits: plan.logits.clone(),
        loss: plan.loss.clone(),
        labels: plan.labels.clone(),
        vocab: plan.vocab.clone(),
        epilogue: plan.epilogue.clone(),
        extra_loss_kwargs: extra,
        kwargs,
        loss_form: plan.form,
        ce_class: plan.ce_class.clone(),
        fused_guards: plan.fused_guards.clone(),
        delegate_target: delegate::target(func, &plan),
        labels_elsewhere: labels_use::labels_elsewhere(&func.body, &plan),
        line: src.line(&func.body[plan.head_idx]),
    })
}

fn delegated(
    src: &source::Source<'_>,
    func: &ruff_python_ast::StmtFunctionDef,
    d: &delegate::Delegation<'_>,
    options: &RewriteOptions,
) -> Result<Rewrite, Refusal> {
    let new_source = delegate::emit(src, func, d, options.drop_doc_decorators);
    source::check_reparse(&new_source, "emitted code")?;
    Ok(Rewrite {
        source: new_source,
        head: d.sub.clone(),
        hidden: String::new(),
        logits: d.logits.to_string(),
        loss: d.loss.to_string(),
        labels: d.labels.to_string(),
        vocab: Some(d.vocab.clone()),
        epilogue: Vec::new(),
        extra_loss_kwargs: Vec::new(),
        kwargs: None,
        loss_form: LossForm::Delegated,
        ce_class: d.ce_class().map(str::to_string),
        fused_guards: Vec::new(),
        delegate_target: None,
        labels_elsewhere: None,
        line: d.line,
    })
}
