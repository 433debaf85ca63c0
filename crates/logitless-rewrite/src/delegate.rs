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

use ruff_python_ast::{Expr, ExprCall, Stmt, StmtFunctionDef};
use ruff_text_size::{Ranged, TextRange};

use crate::loss::{ce_constructor, labels_test, view_call};
use crate::refusal::{ReasonCode as R, Refusal};
use crate::source::{
    Source, dotted, expr_reads, is_name, refuse, reindent, simple_assign, stmt_binds, stmt_reads,
};

/// A recognised delegation.
pub(crate) struct Delegation<'a> {
    /// Index of `outputs = self.<sub>(...)` and of the labels branch in the function body.
    call_idx: usize,
    labels_idx: usize,
    outputs: &'a str,
    pub(crate) sub: String,
    call: &'a ExprCall,
    pub(crate) labels: &'a str,
    pub(crate) loss: &'a str,
    pub(crate) logits: &'a str,
    pub(crate) vocab: String,
    pub(crate) ce_class: String,
    /// The `return_dict=` value of the call when it is not the literal `True`: the fused path needs a
    /// `ModelOutput` (a tuple would gain the decoder's loss as its first element).
    pub(crate) return_dict: Option<String>,
    /// Statements of the labels branch kept on the fused path (`warnings.warn(...)`).
    keep: Vec<&'a Stmt>,
    /// 1-based line of the sub-model call.
    pub(crate) line: usize,
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
    let (logits_at, logits, outputs) = branch.body.iter().enumerate().find_map(|(j, s)| {
        let (target, value) = simple_assign(s)?;
        sub_logits(value).map(|outputs| (j, target, outputs))
    })?;
    Some(analyse(
        src, body, labels_idx, branch, labels, logits_at, logits, outputs,
    ))
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
    let unsupported = |node: &dyn Ranged, why: &str| {
        Refusal::new(
            R::UnsupportedLoss,
            src.line_of(node.range().start().to_usize()),
            format!("sub-model loss: {why}"),
        )
    };
    if !branch.elif_else_clauses.is_empty() {
        return Err(refuse(
            R::NonEmptyElse,
            src,
            branch,
            "the labels branch has an `elif`/`else`",
        ));
    }
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
            _ => return Err(unsupported(s, "the labels branch does more than the loss")),
        }
    }
    let [ce_stmt, loss_stmt] = &stmts[logits_at + 1..] else {
        return Err(unsupported(
            branch,
            "expected `loss_fct = CrossEntropyLoss()` and `loss = loss_fct(...)` after the logits",
        ));
    };
    let Some((ce_name, ce_value)) = simple_assign(ce_stmt) else {
        return Err(unsupported(
            ce_stmt,
            "expected `loss_fct = CrossEntropyLoss()`",
        ));
    };
    // Only the default constructor: the decoders' own loss is `CrossEntropyLoss()` (mean, ignore_index -100).
    let (Some(None), Expr::Call(ce_call)) = (ce_constructor(ce_value), ce_value) else {
        return Err(unsupported(ce_value, "a `CrossEntropyLoss` with options"));
    };
    let ce_class = dotted(&ce_call.func).unwrap_or_default();
    let Some((loss, loss_value)) = simple_assign(loss_stmt) else {
        return Err(unsupported(loss_stmt, "expected `loss = loss_fct(...)`"));
    };
    let Expr::Call(loss_call) = loss_value else {
        return Err(unsupported(loss_value, "expected `loss = loss_fct(...)`"));
    };
    let args = loss_call.arguments.args.as_ref();
    let ([logits_view, labels_view], true, true) = (
        args,
        loss_call.arguments.keywords.is_empty(),
        is_name(&loss_call.func, ce_name),
    ) else {
        return Err(unsupported(
            loss_call,
            "expected `loss_fct(logits.view(-1, V), labels.view(-1))`",
        ));
    };
    let (Some((lb, Some(vocab))), Some((bb, None))) =
        (view_call(logits_view), view_call(labels_view))
    else {
        return Err(unsupported(
            loss_call,
            "expected `loss_fct(logits.view(-1, V), labels.view(-1))`",
        ));
    };
    if !is_name(lb, logits) || !is_name(bb, labels) {
        return Err(unsupported(
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
            branch,
            "the sub-model's outputs are not assigned before the branch",
        ));
    };
    let call_stmt = &body[call_idx];
    let call = match simple_assign(call_stmt).map(|(_, v)| v) {
        Some(Expr::Call(c)) => c,
        _ => {
            return Err(unsupported(
                call_stmt,
                "the outputs are not a sub-model call",
            ));
        }
    };
    let sub = match dotted(&call.func)
        .as_deref()
        .and_then(|d| d.strip_prefix("self."))
    {
        Some(attr) if !attr.contains('.') => attr.to_string(),
        _ => {
            return Err(unsupported(
                call_stmt,
                "the outputs are not from `self.<sub-model>(...)`",
            ));
        }
    };
    for s in &body[call_idx + 1..labels_idx] {
        let loss_init =
            simple_assign(s).is_some_and(|(t, v)| t == loss && v.is_none_literal_expr());
        if !loss_init {
            return Err(refuse(
                R::UnexpectedStatement,
                src,
                s,
                "a statement between the sub-model call and the labels branch",
            ));
        }
    }
    let keyword = |name: &str| {
        call.arguments
            .keywords
            .iter()
            .find(|k| k.arg.as_ref().is_some_and(|a| a.id.as_str() == name))
    };
    if keyword("labels").is_some() || call.arguments.args.iter().any(|a| a.is_starred_expr()) {
        return Err(unsupported(
            call,
            "the sub-model call already passes labels, or starred arguments",
        ));
    }
    let return_dict = match keyword("return_dict").map(|k| &k.value) {
        Some(Expr::BooleanLiteral(b)) if b.value => None,
        Some(Expr::Name(n)) => Some(n.id.to_string()),
        _ => {
            return Err(unsupported(
                call,
                "the sub-model call does not pass `return_dict=True` or `return_dict=<name>`",
            ));
        }
    };

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
    if body[call_idx..labels_idx]
        .iter()
        .any(|s| stmt_binds(s, labels))
    {
        return Err(refuse(
            R::LabelsMutated,
            src,
            call_stmt,
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
    Ok(Delegation {
        call_idx,
        labels_idx,
        outputs,
        sub,
        call,
        labels,
        loss,
        logits,
        vocab: src.slice(vocab).to_string(),
        ce_class,
        return_dict,
        keep,
        line: src.line(call_stmt),
    })
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
                if is_name(&s.value, name)
                    && matches!(s.slice.as_ref(), Expr::NumberLiteral(n) if n.value.as_int().and_then(|i| i.as_u64()) == Some(0)));
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
    let mut out = format!(
        "if {} is not None and __logitless__.delegable(self, self.{}, {}{as_dict}):\n",
        d.labels, d.sub, d.vocab
    );
    out.push_str(&reindent(
        &format!("{} = {call_with_labels}", d.outputs),
        &ind4,
        "    ",
    ));
    out.push('\n');
    for s in &d.keep {
        out.push_str(&format!("{ind4}{}\n", src.slice(*s)));
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
