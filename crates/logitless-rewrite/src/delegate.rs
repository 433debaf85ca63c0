//! A wrapper whose loss is the cross-entropy of a sub-model's logits: transformers' `EncoderDecoderModel`,
//! `VisionEncoderDecoderModel` and `SpeechEncoderDecoderModel` call `self.decoder(...)` without labels and compute
//!
//! ```python
//!     decoder_outputs = self.decoder(..., return_dict=return_dict, **kwargs_decoder)
//!     loss = None
//!     if labels is not None:
//!         logits = decoder_outputs.logits if return_dict else decoder_outputs[0]
//!         loss_fct = CrossEntropyLoss()
//!         loss = loss_fct(logits.reshape(-1, V), labels.reshape(-1))
//! ```
//!
//! The decoders they hold (TrOCR, mBART for Donut and Nougat, BART, ...) compute exactly that loss themselves when
//! given the labels. On the fused path the wrapper hands them the labels and takes their loss, so the decoder's
//! own fused forward runs and no logits are formed. Whether a given decoder computes exactly that loss is decided
//! at run time (`__logitless__.delegable`) from its class's rewrite (`Rewrite::delegate_target`).
//!
//! Multimodal wrappers (transformers' `Llama4ForConditionalGeneration`) do the same with the causal-LM loss of a
//! `*ForCausalLM` they hold:
//!
//! ```python
//!     outputs = self.language_model(..., return_dict=return_dict, **kwargs)
//!     logits = outputs[0]
//!     loss = None
//!     if labels is not None:
//!         loss = self.loss_function(logits=logits, labels=labels, vocab_size=V, **kwargs)
//! ```
//!
//! The sub-model, given the labels and the same `**kwargs`, computes `self.loss_function` of its logits with them
//! itself ([`DelegateTarget::CausalLm`]); the run-time check also requires both `loss_function`s to be
//! transformers' causal-LM loss and the two vocabulary sizes to agree.

use ruff_python_ast::visitor::{self, Visitor};
use ruff_python_ast::{Expr, ExprCall, Stmt, StmtFunctionDef, StmtIf};
use ruff_text_size::{Ranged, TextRange};

use crate::analysis::Plan;
use crate::loss::{LossForm, ce_constructor, find_loss_call, labels_test, no_else, view_call};
use crate::refusal::{ReasonCode as R, Refusal};
use crate::source::{
    Source, dotted, expr_reads, is_name, refuse, reindent, simple_assign, stmt_binds, stmt_reads,
};

/// The keywords transformers' causal-LM loss reads besides logits, labels and vocab_size: a wrapper that passes one
/// of them to the sub-model explicitly would change the sub-model's loss, not its own.
const CAUSAL_LOSS_KEYWORDS: [&str; 4] = [
    "num_items_in_batch",
    "ignore_index",
    "shift_labels",
    "labels",
];

/// What a forward's loss is, given labels, when a wrapper may hand them to it instead of computing that loss on its
/// logits ([`crate::Rewrite::delegate_target`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DelegateTarget {
    /// `CrossEntropyLoss()` of its unshifted logits against the labels (mean over the tokens not -100).
    CrossEntropy,
    /// `self.loss_function(logits, labels, <vocab>, **<kwargs>)`, its `**kwargs` being the forward's own and used
    /// nowhere but as `**kwargs`: the model's loss function on what the call was given. `vocab` is the
    /// `self.<attr>...` path of the vocabulary size it passes.
    CausalLm { vocab: String },
}

impl DelegateTarget {
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::CrossEntropy => "cross_entropy",
            Self::CausalLm { .. } => "causal_lm",
        }
    }
}

/// Whether the rewrite of `func` (its analysis `plan`) is a loss a wrapper may hand its labels to: nothing but the
/// loss reads the labels or sets the loss, and the loss is one of [`DelegateTarget`]'s.
pub(crate) fn target(func: &StmtFunctionDef, plan: &Plan<'_>) -> Option<DelegateTarget> {
    let body = func.body.as_slice();
    let elsewhere = |i: usize, s: &Stmt| {
        i != plan.labels_idx
            && (stmt_reads(s, &plan.labels)
                || (stmt_binds(s, &plan.loss) && !is_none_init(s, &plan.loss)))
    };
    let plain = plan.pre.is_empty()
        && plan.post.is_empty()
        && plan.fused_guards.is_empty()
        && plan.hoist.is_empty()
        && plan.labels_arg == plan.labels;
    if !plain || body.iter().enumerate().any(|(i, s)| elsewhere(i, s)) {
        return None;
    }
    match plan.form {
        LossForm::CrossEntropy if plan.loss_keywords.is_empty() => {
            Some(DelegateTarget::CrossEntropy)
        }
        LossForm::LossFunction => {
            let kwarg = func.parameters.kwarg.as_ref()?.name.as_str();
            let [(None, passed)] = plan.loss_keywords.as_slice() else {
                return None;
            };
            let vocab = plan.vocab.as_deref()?;
            let self_path = vocab.strip_prefix("self.").is_some_and(|rest| {
                rest.split('.')
                    .all(|p| !p.is_empty() && p.chars().all(|c| c == '_' || c.is_alphanumeric()))
            });
            (passed == kwarg && self_path && only_double_starred(body, kwarg)).then(|| {
                DelegateTarget::CausalLm {
                    vocab: vocab.to_string(),
                }
            })
        }
        _ => None,
    }
}

fn is_none_init(stmt: &Stmt, name: &str) -> bool {
    simple_assign(stmt).is_some_and(|(t, v)| t == name && v.is_none_literal_expr())
}

/// Whether `name` appears in `body` only as `**name` in calls: never bound, changed or read otherwise, so every
/// call it is passed to gets what the forward was given.
fn only_double_starred(body: &[Stmt], name: &str) -> bool {
    struct Scan<'n> {
        name: &'n str,
        other: bool,
    }
    impl<'a> Visitor<'a> for Scan<'_> {
        fn visit_expr(&mut self, expr: &'a Expr) {
            match expr {
                Expr::Call(call) => {
                    self.visit_expr(&call.func);
                    for arg in call.arguments.args.iter() {
                        self.visit_expr(arg);
                    }
                    for kw in call.arguments.keywords.iter() {
                        if !(kw.arg.is_none() && is_name(&kw.value, self.name)) {
                            self.visit_expr(&kw.value);
                        }
                    }
                }
                Expr::Name(n) if n.id.as_str() == self.name => self.other = true,
                _ => visitor::walk_expr(self, expr),
            }
        }
    }
    let mut scan = Scan { name, other: false };
    for s in body {
        scan.visit_stmt(s);
    }
    !scan.other
}

/// A recognised delegation.
pub(crate) struct Delegation<'a> {
    /// Index of `outputs = self.<sub>(...)` and of the labels branch in the function body.
    call_idx: usize,
    labels_idx: usize,
    outputs: &'a str,
    pub(crate) sub: String,
    call: &'a ExprCall,
    pub(crate) labels: &'a str,
    pub(crate) loss: String,
    pub(crate) logits: &'a str,
    pub(crate) vocab: String,
    /// The `return_dict=` value of the call when it is not the literal `True`: the fused path needs a
    /// `ModelOutput` (a tuple would gain the decoder's loss as its first element).
    pub(crate) return_dict: Option<String>,
    form: Form<'a>,
    /// 1-based line of the sub-model call.
    pub(crate) line: usize,
}

/// The wrapper's loss.
enum Form<'a> {
    /// `CrossEntropyLoss()` (the constructor as written) inside the labels branch, with the statements of the
    /// branch kept on the fused path (`warnings.warn(...)`).
    CrossEntropy {
        ce_class: String,
        keep: Vec<&'a Stmt>,
    },
    /// `self.loss_function(...)` of logits taken from the outputs before the branch.
    CausalLm,
}

impl Delegation<'_> {
    /// The cross-entropy class as the wrapper names it (the installer checks that it is torch's).
    pub(crate) fn ce_class(&self) -> Option<&str> {
        match &self.form {
            Form::CrossEntropy { ce_class, .. } => Some(ce_class),
            Form::CausalLm => None,
        }
    }
}

/// `None` when the forward does not read a sub-model's `.logits` in a labels branch (not this shape at all);
/// otherwise the delegation, or why this wrapper's loss cannot be handed over.
pub(crate) fn recognise<'a>(
    src: &Source<'a>,
    func: &'a StmtFunctionDef,
) -> Option<Result<Delegation<'a>, Refusal>> {
    let body = func.body.as_slice();
    let (labels_idx, branch, labels) = body
        .iter()
        .enumerate()
        .find_map(|(i, s)| labels_test(s).map(|(b, n)| (i, b, n)))?;
    // The branch's `logits = outputs.logits [if ... else outputs[0]]`.
    let in_branch = branch.body.iter().enumerate().find_map(|(j, s)| {
        let (target, value) = simple_assign(s)?;
        sub_logits(value).map(|outputs| (j, target, outputs))
    });
    match in_branch {
        Some((logits_at, logits, outputs)) => Some(analyse(
            src, body, labels_idx, branch, labels, logits_at, logits, outputs,
        )),
        None => recognise_causal(src, body, labels_idx, branch, labels),
    }
}

/// The causal-LM shape: `logits = outputs[0]` (or `outputs.logits`) of `outputs = self.<sub>(...)` before the
/// branch, and `self.loss_function` of those logits in it. `None` when the loss is not of a sub-model's logits.
fn recognise_causal<'a>(
    src: &Source<'a>,
    body: &'a [Stmt],
    labels_idx: usize,
    branch: &'a StmtIf,
    labels: &'a str,
) -> Option<Result<Delegation<'a>, Refusal>> {
    let call = find_loss_call(src, branch).ok()?;
    if call.form != LossForm::LossFunction {
        return None;
    }
    let Expr::Name(logits) = call.logits else {
        return None;
    };
    let logits = logits.id.as_str();
    let logits_idx = body[..labels_idx]
        .iter()
        .rposition(|s| stmt_binds(s, logits))?;
    let outputs = simple_assign(&body[logits_idx])
        .filter(|(t, _)| *t == logits)
        .and_then(|(_, v)| first_or_logits(v))?;
    let call_idx = body[..logits_idx]
        .iter()
        .rposition(|s| stmt_binds(s, outputs))?;
    let sub_call = match simple_assign(&body[call_idx]) {
        Some((t, Expr::Call(c))) if t == outputs => c,
        _ => return None,
    };
    let sub = self_attr(&sub_call.func)?;
    Some((|| {
        no_else(src, branch)?;
        if branch.body.len() != 1 {
            return Err(unsupported(
                src,
                branch,
                "the labels branch does more than the loss",
            ));
        }
        if !is_name(call.labels, labels) {
            return Err(unsupported(
                src,
                call.labels,
                "the loss is not of the labels",
            ));
        }
        let kwargs = match call.keywords.as_slice() {
            [(None, Expr::Name(n))] => n.id.as_str(),
            _ => {
                return Err(unsupported(
                    src,
                    branch,
                    "the loss call passes other keywords than the `**kwargs` the sub-model is given",
                ));
            }
        };
        let Some(vocab) = call.vocab else {
            return Err(unsupported(
                src,
                branch,
                "the loss call passes no vocabulary size",
            ));
        };
        if [logits, outputs, labels]
            .iter()
            .any(|n| expr_reads(vocab, n))
        {
            return Err(unsupported(
                src,
                vocab,
                "the vocabulary size reads the logits or the labels",
            ));
        }
        for (i, s) in body.iter().enumerate().take(labels_idx).skip(call_idx + 1) {
            if i != logits_idx && !is_none_init(s, &call.loss) {
                return Err(refuse(
                    R::UnexpectedStatement,
                    src,
                    s,
                    "a statement between the sub-model call and the labels branch",
                ));
            }
        }
        let return_dict = call_shape(src, sub_call)?;
        let doubles: Vec<&Expr> = sub_call
            .arguments
            .keywords
            .iter()
            .filter(|k| k.arg.is_none())
            .map(|k| &k.value)
            .collect();
        let explicit_loss_keyword = sub_call.arguments.keywords.iter().any(|k| {
            k.arg
                .as_ref()
                .is_some_and(|a| CAUSAL_LOSS_KEYWORDS.contains(&a.id.as_str()))
        });
        if !matches!(doubles.as_slice(), [only] if is_name(only, kwargs)) || explicit_loss_keyword {
            return Err(unsupported(
                src,
                sub_call,
                "the sub-model call does not pass the loss's `**kwargs`, or passes it a loss keyword",
            ));
        }
        region_checks(src, body, call_idx, labels_idx, labels)?;
        Ok(Delegation {
            call_idx,
            labels_idx,
            outputs,
            sub,
            call: sub_call,
            labels,
            loss: call.loss.clone(),
            logits,
            vocab: src.slice(vocab).to_string(),
            return_dict,
            form: Form::CausalLm,
            line: src.line(&body[call_idx]),
        })
    })())
}

/// Why the wrapper's loss cannot be handed over, at `node`.
fn unsupported(src: &Source<'_>, node: &dyn Ranged, why: &str) -> Refusal {
    Refusal::new(
        R::UnsupportedLoss,
        src.line_of(node.range().start().to_usize()),
        format!("sub-model loss: {why}"),
    )
}

/// `outputs[0]` or `outputs.logits`: the outputs' name.
fn first_or_logits(value: &Expr) -> Option<&str> {
    let base = match value {
        Expr::Subscript(s) if is_zero(&s.slice) => s.value.as_ref(),
        Expr::Attribute(a) if a.attr.id.as_str() == "logits" => a.value.as_ref(),
        _ => return None,
    };
    match base {
        Expr::Name(n) => Some(n.id.as_str()),
        _ => None,
    }
}

fn is_zero(expr: &Expr) -> bool {
    matches!(expr, Expr::NumberLiteral(n) if n.value.as_int().and_then(|i| i.as_u64()) == Some(0))
}

/// `self.<attr>` (one level): the attribute.
fn self_attr(func: &Expr) -> Option<String> {
    match dotted(func)
        .as_deref()
        .and_then(|d| d.strip_prefix("self."))
    {
        Some(attr) if !attr.contains('.') => Some(attr.to_string()),
        _ => None,
    }
}

#[allow(clippy::too_many_arguments)]
fn analyse<'a>(
    src: &Source<'a>,
    body: &'a [Stmt],
    labels_idx: usize,
    branch: &'a ruff_python_ast::StmtIf,
    labels: &'a str,
    logits_at: usize,
    logits: &'a str,
    outputs: &'a str,
) -> Result<Delegation<'a>, Refusal> {
    no_else(src, branch)?;
    // 1. The branch: kept calls, then the logits, `loss_fct = CrossEntropyLoss()`, `loss = loss_fct(...)`.
    let stmts = branch.body.as_slice();
    let mut keep = Vec::new();
    for s in &stmts[..logits_at] {
        match s {
            Stmt::Expr(e)
                if matches!(e.value.as_ref(), Expr::Call(_))
                    && !reads_any(s, &[outputs, labels]) =>
            {
                keep.push(s);
            }
            _ => {
                return Err(unsupported(
                    src,
                    s,
                    "the labels branch does more than the loss",
                ));
            }
        }
    }
    let [ce_stmt, loss_stmt] = &stmts[logits_at + 1..] else {
        return Err(unsupported(
            src,
            branch,
            "expected `loss_fct = CrossEntropyLoss()` and `loss = loss_fct(...)` after the logits",
        ));
    };
    let Some((ce_name, ce_value)) = simple_assign(ce_stmt) else {
        return Err(unsupported(
            src,
            ce_stmt,
            "expected `loss_fct = CrossEntropyLoss()`",
        ));
    };
    // Only the default constructor: the decoders' own loss is `CrossEntropyLoss()` (mean, ignore_index -100).
    let (Some(None), Expr::Call(ce_call)) = (ce_constructor(ce_value), ce_value) else {
        return Err(unsupported(
            src,
            ce_value,
            "a `CrossEntropyLoss` with options",
        ));
    };
    let ce_class = dotted(&ce_call.func).unwrap_or_default();
    let Some((loss, loss_value)) = simple_assign(loss_stmt) else {
        return Err(unsupported(
            src,
            loss_stmt,
            "expected `loss = loss_fct(...)`",
        ));
    };
    let Expr::Call(loss_call) = loss_value else {
        return Err(unsupported(
            src,
            loss_value,
            "expected `loss = loss_fct(...)`",
        ));
    };
    let args = loss_call.arguments.args.as_ref();
    let ([logits_view, labels_view], true, true) = (
        args,
        loss_call.arguments.keywords.is_empty(),
        is_name(&loss_call.func, ce_name),
    ) else {
        return Err(unsupported(
            src,
            loss_call,
            "expected `loss_fct(logits.view(-1, V), labels.view(-1))`",
        ));
    };
    let (Some((lb, Some(vocab))), Some((bb, None))) =
        (view_call(logits_view), view_call(labels_view))
    else {
        return Err(unsupported(
            src,
            loss_call,
            "expected `loss_fct(logits.view(-1, V), labels.view(-1))`",
        ));
    };
    if !is_name(lb, logits) || !is_name(bb, labels) {
        return Err(unsupported(
            src,
            loss_call,
            "the loss is not of the sub-model's logits and the labels",
        ));
    }
    if reads_any(ce_stmt, &[logits])
        || [logits, outputs, labels]
            .iter()
            .any(|n| expr_reads(vocab, n))
    {
        return Err(unsupported(
            src,
            loss_call,
            "the vocabulary size reads the logits or the labels",
        ));
    }

    // 2. `outputs = self.<sub>(...)` before the branch, with only `loss = None` between them.
    let Some(call_idx) = body[..labels_idx]
        .iter()
        .rposition(|s| simple_assign(s).is_some_and(|(t, _)| t == outputs))
    else {
        return Err(unsupported(
            src,
            branch,
            "the sub-model's outputs are not assigned before the branch",
        ));
    };
    let call_stmt = &body[call_idx];
    let call = match simple_assign(call_stmt).map(|(_, v)| v) {
        Some(Expr::Call(c)) => c,
        _ => {
            return Err(unsupported(
                src,
                call_stmt,
                "the outputs are not a sub-model call",
            ));
        }
    };
    let Some(sub) = self_attr(&call.func) else {
        return Err(unsupported(
            src,
            call_stmt,
            "the outputs are not from `self.<sub-model>(...)`",
        ));
    };
    for s in &body[call_idx + 1..labels_idx] {
        if !is_none_init(s, loss) {
            return Err(refuse(
                R::UnexpectedStatement,
                src,
                s,
                "a statement between the sub-model call and the labels branch",
            ));
        }
    }
    let return_dict = call_shape(src, call)?;

    // 3. Nothing after the branch reads what the fused path does not bind.
    for s in &body[labels_idx + 1..] {
        for name in [logits, ce_name] {
            if stmt_reads(s, name) {
                return Err(refuse(
                    R::DroppedNameUsed,
                    src,
                    s,
                    format!("`{name}` is read after the labels branch"),
                ));
            }
        }
    }
    region_checks(src, body, call_idx, labels_idx, labels)?;
    Ok(Delegation {
        call_idx,
        labels_idx,
        outputs,
        sub,
        call,
        labels,
        loss: loss.to_string(),
        logits,
        vocab: src.slice(vocab).to_string(),
        return_dict,
        form: Form::CrossEntropy { ce_class, keep },
        line: src.line(call_stmt),
    })
}

/// The sub-model call's `return_dict=` (None for the literal `True`), once it is known to pass no labels and no
/// starred positional arguments.
fn call_shape(src: &Source<'_>, call: &ExprCall) -> Result<Option<String>, Refusal> {
    let keyword = |name: &str| {
        call.arguments
            .keywords
            .iter()
            .find(|k| k.arg.as_ref().is_some_and(|a| a.id.as_str() == name))
    };
    if keyword("labels").is_some() || call.arguments.args.iter().any(|a| a.is_starred_expr()) {
        return Err(unsupported(
            src,
            call,
            "the sub-model call already passes labels, or starred arguments",
        ));
    }
    match keyword("return_dict").map(|k| &k.value) {
        Some(Expr::BooleanLiteral(b)) if b.value => Ok(None),
        Some(Expr::Name(n)) => Ok(Some(n.id.to_string())),
        _ => Err(unsupported(
            src,
            call,
            "the sub-model call does not pass `return_dict=True` or `return_dict=<name>`",
        )),
    }
}

/// The labels are not rebound between the call and the loss, and the region re-indents safely.
fn region_checks(
    src: &Source<'_>,
    body: &[Stmt],
    call_idx: usize,
    labels_idx: usize,
    labels: &str,
) -> Result<(), Refusal> {
    if body[call_idx..labels_idx]
        .iter()
        .any(|s| stmt_binds(s, labels))
    {
        return Err(refuse(
            R::LabelsMutated,
            src,
            &body[call_idx],
            "`labels` is rebound before the loss",
        ));
    }
    for s in &body[call_idx..=labels_idx] {
        if src.indent_of(s).chars().any(|c| c != ' ') || crate::source::has_multiline_string(src, s)
        {
            return Err(refuse(
                R::UnsupportedFormatting,
                src,
                s,
                "the rewritten region is not indented with spaces only, or holds a multi-line string",
            ));
        }
    }
    Ok(())
}

/// `outputs.logits`, or `outputs.logits if <cond> else outputs[0]`: the outputs' name.
fn sub_logits(value: &Expr) -> Option<&str> {
    fn attr_of(e: &Expr) -> Option<&str> {
        match e {
            Expr::Attribute(a) if a.attr.id.as_str() == "logits" => match a.value.as_ref() {
                Expr::Name(n) => Some(n.id.as_str()),
                _ => None,
            },
            _ => None,
        }
    }
    match value {
        Expr::If(ifexp) => {
            let name = attr_of(&ifexp.body)?;
            let first = matches!(ifexp.orelse.as_ref(), Expr::Subscript(s)
                if is_name(&s.value, name) && is_zero(&s.slice));
            first.then_some(name)
        }
        e => attr_of(e),
    }
}

fn reads_any(stmt: &Stmt, names: &[&str]) -> bool {
    names.iter().any(|n| stmt_reads(stmt, n))
}

/// The forward with the region from the sub-model call to the labels branch replaced by a fused path and the
/// stock statements.
pub(crate) fn emit(
    src: &Source<'_>,
    func: &StmtFunctionDef,
    d: &Delegation<'_>,
    drop_doc_decorators: bool,
) -> String {
    let body = func.body.as_slice();
    let first: &Stmt = &body[d.call_idx];
    let last: &Stmt = &body[d.labels_idx];
    let ind = src.indent_of(first).to_string();
    let ind4 = format!("{ind}    ");
    // A tuple would carry the decoder's loss as its first element: the run-time check counts that case as stock.
    let as_dict = d
        .return_dict
        .as_deref()
        .map(|rd| format!(", {rd}"))
        .unwrap_or_default();
    let call_with_labels = with_labels(src.slice(d.call), d.labels);

    // The vocabulary the wrapper reshapes to: stock fails when it is not the decoder's, and so must the fused path.
    let kind = match d.form {
        Form::CrossEntropy { .. } => "",
        Form::CausalLm => ", kind=\"causal_lm\"",
    };
    let mut out = format!(
        "if {} is not None and __logitless__.delegable(self, self.{}, {}{as_dict}{kind}):\n",
        d.labels, d.sub, d.vocab
    );
    out.push_str(&reindent(
        &format!("{} = {call_with_labels}", d.outputs),
        &ind4,
        "    ",
    ));
    out.push('\n');
    match &d.form {
        Form::CrossEntropy { keep, .. } => {
            for s in keep {
                out.push_str(&format!("{ind4}{}\n", src.slice(*s)));
            }
        }
        // The wrapper reads its logits after the branch: the sub-model's (its empty stand-in on the fused path).
        Form::CausalLm => out.push_str(&format!("{ind4}{} = {}.logits\n", d.logits, d.outputs)),
    }
    out.push_str(&format!("{ind4}{} = {}.loss\n", d.loss, d.outputs));
    out.push_str(&format!("{ind}else:\n"));
    let region = src.range(TextRange::new(first.start(), last.end()));
    out.push_str(&reindent(region, &ind4, "    "));

    crate::emit::splice(
        src,
        func,
        (first.start().to_usize(), last.end().to_usize()),
        out,
        drop_doc_decorators,
    )
}

/// The call's text with `labels=<labels>` added as its last argument, on a line of its own when the arguments are
/// one a line.
fn with_labels(call: &str, labels: &str) -> String {
    let close = call.rfind(')').unwrap_or(call.len());
    let args = call[..close].trim_end();
    let last_line = args.rsplit('\n').next().unwrap_or_default();
    if args.ends_with(',') && args.contains('\n') {
        let indent: String = last_line.chars().take_while(|c| *c == ' ').collect();
        format!("{args}\n{indent}labels={labels},{}", &call[args.len()..])
    } else if args.ends_with('(') || args.ends_with(',') {
        format!("{args} labels={labels}{}", &call[args.len()..])
    } else {
        format!("{args}, labels={labels}{}", &call[args.len()..])
    }
}
