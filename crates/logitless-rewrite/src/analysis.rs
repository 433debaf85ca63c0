//! Recognising the canonical end of a causal-LM forward (spec §2) and everything around it.
//!
//! The forward's top-level statements are read backwards from the labels branch: optional `loss = None`,
//! epilogue statements on the logits (possibly under a guard), statements that do not touch the logits
//! ("setup", kept verbatim), and finally the head call `logits = self.<head>(hidden)`. Everything else refuses.

use ruff_python_ast::{CmpOp, Expr, Stmt, StmtFunctionDef, StmtIf};
use ruff_text_size::Ranged;

use crate::epilogue::{
    EpilogueKind, EpilogueStep, HeadProblem, Op, is_minus_one, parse_epilogue, parse_head,
};
use crate::refusal::{ReasonCode as R, Refusal};
use crate::source::{
    Source, atom_text, bound_names, dotted, expr_reads, has_call, is_name, stmt_binds, stmt_reads,
};

/// How the loss is computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LossForm {
    /// `self.loss_function(logits, labels, vocab_size, ...)`.
    LossFunction,
    /// `CrossEntropyLoss()(logits.view(-1, V), labels.view(-1))`: token-level CE on already-aligned labels,
    /// fused as `shift_labels=labels` (no shift, mean over non-ignored tokens).
    CrossEntropy,
    /// `CrossEntropyLoss()` on `logits[..., :-1, :]` and `labels[..., 1:]` (the 4.x manual shift): the causal
    /// loss with its mean, fused as `hf_loss(..., labels)` without `**kwargs`.
    ShiftedCrossEntropy,
}

impl LossForm {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::LossFunction => "loss_function",
            Self::CrossEntropy => "cross_entropy",
            Self::ShiftedCrossEntropy => "shifted_cross_entropy",
        }
    }
}

/// Everything the emitter needs, borrowed from the parsed forward.
pub(crate) struct Plan<'a> {
    pub head: String,
    pub hidden: &'a Expr,
    pub logits: String,
    pub loss: String,
    pub labels: String,
    pub labels_arg: String,
    pub vocab: Option<String>,
    pub epilogue: Vec<EpilogueStep>,
    /// Explicit keywords of the loss call other than logits/labels/vocab_size, in source order, as
    /// (name, expression); `None` name is the `**kwargs` entry.
    pub loss_keywords: Vec<(Option<String>, String)>,
    pub form: LossForm,
    /// Index of the head statement and of the labels branch in the function body.
    pub head_idx: usize,
    pub labels_idx: usize,
    /// Region statements that do not touch the logits, run on the fused path before the loss.
    pub setup: Vec<&'a Stmt>,
    /// The head and epilogue statements, replayed when real logits are asked for.
    pub replay: Vec<&'a Stmt>,
    /// Statements of the labels branch kept on the fused path, before and after the loss call.
    pub pre: Vec<&'a Stmt>,
    pub post: Vec<&'a Stmt>,
    /// Extra conditions for the fused path: `not (<guard>)` of labels-branch blocks that read the logits.
    pub fused_guards: Vec<String>,
}

/// One statement of the region between the head call and the labels branch.
enum Item<'a> {
    Head(&'a Stmt),
    Epilogue(&'a Stmt, Vec<Op<'a>>, Option<&'a Expr>),
    LossInit,
    Setup(&'a Stmt),
}

fn refuse(code: R, src: &Source<'_>, node: &impl Ranged, message: impl Into<String>) -> Refusal {
    Refusal::new(code, src.line(node), message)
}

/// `<name> = <value>` or `<name>: T = <value>` with a single plain-name target.
fn simple_assign(stmt: &Stmt) -> Option<(&str, &Expr)> {
    match stmt {
        Stmt::Assign(a) => match a.targets.as_slice() {
            [Expr::Name(n)] => Some((n.id.as_str(), &a.value)),
            _ => None,
        },
        Stmt::AnnAssign(a) => match (a.target.as_ref(), a.value.as_deref()) {
            (Expr::Name(n), Some(v)) => Some((n.id.as_str(), v)),
            _ => None,
        },
        _ => None,
    }
}

/// `if <name> is not None:` → `<name>`.
fn labels_test(stmt: &Stmt) -> Option<(&StmtIf, &str)> {
    let Stmt::If(s) = stmt else { return None };
    let Expr::Compare(cmp) = s.test.as_ref() else {
        return None;
    };
    match (
        cmp.left.as_ref(),
        cmp.ops.as_ref(),
        cmp.comparators.as_ref(),
    ) {
        (Expr::Name(n), [CmpOp::IsNot], [Expr::NoneLiteral(_)]) if n.id.as_str() == "labels" => {
            Some((s, n.id.as_str()))
        }
        _ => None,
    }
}

/// The first argument of the loss call: the name of the logits it consumes.
struct LossCall<'a> {
    stmt_idx: usize,
    loss: String,
    logits: &'a Expr,
    labels: &'a Expr,
    vocab: Option<&'a Expr>,
    keywords: Vec<(Option<String>, &'a Expr)>,
    form: LossForm,
    /// Statements of the branch that only prepare the loss's arguments (shift, view, device move, the
    /// `CrossEntropyLoss()` object): replaced by the fused call.
    consumed: Vec<usize>,
}

/// Where a cross-entropy argument comes from, followed back through the branch.
struct Traced<'a> {
    origin: &'a Expr,
    shifted: bool,
    vocab: Option<&'a Expr>,
    consumed: Vec<usize>,
}

/// Follows a cross-entropy argument back through `body[..upto]`: `.view(-1[, V])`, `.contiguous()`, `.to(...)`,
/// at most one causal shift slice (`[..., :-1, :]` for logits, `[..., 1:]` for labels), and renames.
fn trace<'a>(
    src: &Source<'a>,
    body: &'a [Stmt],
    mut upto: usize,
    arg: &'a Expr,
    logits_side: bool,
) -> Option<Traced<'a>> {
    let mut t = Traced {
        origin: arg,
        shifted: false,
        vocab: None,
        consumed: Vec::new(),
    };
    let mut e = arg;
    loop {
        if let Some((base, v)) = view_call(e) {
            match (logits_side, v) {
                (true, Some(v)) if t.vocab.is_none() => t.vocab = Some(v),
                (false, None) => {}
                _ => return None,
            }
            e = base;
        } else if let Some(inner) = crate::epilogue::strip_wrap(e) {
            e = inner;
        } else if let Expr::Subscript(sub) = e {
            let slice: String = src
                .slice(&*sub.slice)
                .chars()
                .filter(|c| !c.is_whitespace())
                .collect();
            let allowed: &[&str] = if logits_side {
                &["...,:-1,:", ":,:-1,:"]
            } else {
                &["...,1:", ":,1:"]
            };
            if t.shifted || !allowed.contains(&slice.as_str()) {
                return None;
            }
            t.shifted = true;
            e = &sub.value;
        } else if let Expr::Name(n) = e {
            let def = body[..upto]
                .iter()
                .rposition(|s| simple_assign(s).is_some_and(|(target, _)| target == n.id.as_str()));
            match def {
                Some(j) => {
                    t.consumed.push(j);
                    upto = j;
                    e = simple_assign(&body[j]).map(|(_, v)| v)?;
                }
                None => {
                    t.origin = e;
                    return Some(t);
                }
            }
        } else {
            return None;
        }
    }
}

fn is_ce_constructor(expr: &Expr) -> bool {
    let Expr::Call(call) = expr else { return false };
    let named = dotted(&call.func).is_some_and(|d| {
        matches!(
            d.as_str(),
            "CrossEntropyLoss" | "nn.CrossEntropyLoss" | "torch.nn.CrossEntropyLoss"
        )
    });
    named && call.arguments.args.is_empty() && call.arguments.keywords.is_empty()
}

/// `x.view(-1, V)` → (x, V); `x.view(-1)` → (x, None).
fn view_call(expr: &Expr) -> Option<(&Expr, Option<&Expr>)> {
    let Expr::Call(call) = expr else { return None };
    let Expr::Attribute(attr) = call.func.as_ref() else {
        return None;
    };
    if attr.attr.id.as_str() != "view" || !call.arguments.keywords.is_empty() {
        return None;
    }
    match call.arguments.args.as_ref() {
        [m] if is_minus_one(m) => Some((&attr.value, None)),
        [m, v] if is_minus_one(m) && !v.is_starred_expr() => Some((&attr.value, Some(v))),
        _ => None,
    }
}

/// Finds the loss call in a labels branch.
fn find_loss_call<'a>(src: &Source<'a>, branch: &'a StmtIf) -> Result<LossCall<'a>, Refusal> {
    let mut ce_names: Vec<&str> = Vec::new();
    for (i, stmt) in branch.body.iter().enumerate() {
        let Some((target, value)) = simple_assign(stmt) else {
            continue;
        };
        if is_ce_constructor(value) {
            ce_names.push(target);
            continue;
        }
        let Expr::Call(call) = value else { continue };
        let func = dotted(&call.func);
        if func.as_deref() == Some("self.loss_function") {
            let mut logits = None;
            let mut labels = None;
            let mut vocab = None;
            let mut keywords = Vec::new();
            for (pos, arg) in call.arguments.args.iter().enumerate() {
                let slot = match pos {
                    0 => &mut logits,
                    1 => &mut labels,
                    2 => &mut vocab,
                    _ => {
                        return Err(refuse(
                            R::UnsupportedLoss,
                            src,
                            arg,
                            "loss_function called with more than three positional arguments",
                        ));
                    }
                };
                if arg.is_starred_expr() {
                    return Err(refuse(
                        R::UnsupportedLoss,
                        src,
                        arg,
                        "starred argument in the loss call",
                    ));
                }
                *slot = Some(arg);
            }
            for kw in &call.arguments.keywords {
                match kw.arg.as_ref().map(|a| a.id.as_str()) {
                    Some("logits") => logits = Some(&kw.value),
                    Some("labels") => labels = Some(&kw.value),
                    Some("vocab_size") => vocab = Some(&kw.value),
                    Some(name) => keywords.push((Some(name.to_string()), &kw.value)),
                    None if matches!(kw.value, Expr::Name(_)) => keywords.push((None, &kw.value)),
                    None => {
                        return Err(refuse(
                            R::UnsupportedLoss,
                            src,
                            kw,
                            "`**` of something other than a name in the loss call",
                        ));
                    }
                }
            }
            let (Some(logits), Some(labels)) = (logits, labels) else {
                return Err(refuse(
                    R::UnsupportedLoss,
                    src,
                    stmt,
                    "loss_function call without logits and labels",
                ));
            };
            return Ok(LossCall {
                stmt_idx: i,
                loss: target.to_string(),
                logits,
                labels,
                vocab,
                keywords,
                form: LossForm::LossFunction,
                consumed: Vec::new(),
            });
        }
        if func.as_deref().is_some_and(|f| ce_names.contains(&f)) {
            let args = call.arguments.args.as_ref();
            let ([logits_view, labels_view], true) = (args, call.arguments.keywords.is_empty())
            else {
                return Err(refuse(
                    R::UnsupportedLoss,
                    src,
                    stmt,
                    "cross-entropy call with unexpected arguments",
                ));
            };
            let body = branch.body.as_slice();
            let traced =
                trace(src, body, i, logits_view, true).zip(trace(src, body, i, labels_view, false));
            let Some((lt, bt)) =
                traced.filter(|(lt, bt)| lt.shifted == bt.shifted && lt.vocab.is_some())
            else {
                return Err(refuse(
                    R::UnsupportedLoss,
                    src,
                    stmt,
                    "cross-entropy not of the form `loss_fct(logits.view(-1, V), labels.view(-1))`, shifted or not",
                ));
            };
            let ce_def = body[..i].iter().rposition(|s| {
                simple_assign(s)
                    .is_some_and(|(t, v)| Some(t) == func.as_deref() && is_ce_constructor(v))
            });
            let mut consumed: Vec<usize> = lt
                .consumed
                .iter()
                .chain(bt.consumed.iter())
                .copied()
                .chain(ce_def)
                .collect();
            consumed.sort_unstable();
            consumed.dedup();
            // V is kept only when it is computed from neither the logits nor a name the fused path drops.
            let dropped_names: Vec<String> = consumed
                .iter()
                .flat_map(|&j| bound_names(&body[j]))
                .collect();
            let vocab = lt.vocab.filter(|v| {
                !expr_reads(v, logits_name(lt.origin))
                    && !dropped_names.iter().any(|n| expr_reads(v, n))
            });
            let form = if lt.shifted {
                LossForm::ShiftedCrossEntropy
            } else {
                LossForm::CrossEntropy
            };
            return Ok(LossCall {
                stmt_idx: i,
                loss: target.to_string(),
                logits: lt.origin,
                labels: bt.origin,
                vocab,
                keywords: Vec::new(),
                form,
                consumed,
            });
        }
    }
    Err(refuse(
        R::UnsupportedLoss,
        src,
        branch,
        "the labels branch computes no `self.loss_function(...)` or `CrossEntropyLoss()` loss",
    ))
}

fn logits_name(expr: &Expr) -> &str {
    match expr {
        Expr::Name(n) => n.id.as_str(),
        _ => "",
    }
}

/// Whether `stmt` changes `name`'s tensor in place: `name[...] = `, `name += `, `name.op_(...)`.
fn mutates_in_place(stmt: &Stmt, name: &str) -> bool {
    let root_is = |e: &Expr| match e {
        Expr::Subscript(s) => is_name(&s.value, name),
        Expr::Attribute(a) => is_name(&a.value, name),
        _ => false,
    };
    match stmt {
        Stmt::Assign(a) => a.targets.iter().any(root_is),
        Stmt::AugAssign(a) => is_name(&a.target, name) || root_is(&a.target),
        Stmt::Expr(e) => match e.value.as_ref() {
            Expr::Call(c) => match c.func.as_ref() {
                Expr::Attribute(a) => is_name(&a.value, name) && a.attr.id.as_str().ends_with('_'),
                _ => false,
            },
            _ => false,
        },
        _ => false,
    }
}

/// `labels = labels.to(...)`: a device move, dropped on the fused path.
fn is_labels_move(stmt: &Stmt, labels: &str) -> bool {
    let Some((target, value)) = simple_assign(stmt) else {
        return false;
    };
    let Expr::Call(call) = value else {
        return false;
    };
    let Expr::Attribute(attr) = call.func.as_ref() else {
        return false;
    };
    target == labels
        && attr.attr.id.as_str() == "to"
        && is_name(&attr.value, labels)
        && call.arguments.args.len() == 1
}

pub(crate) fn analyse<'a>(
    src: &Source<'a>,
    func: &'a StmtFunctionDef,
) -> Result<Plan<'a>, Refusal> {
    let body = func.body.as_slice();

    // 1. The labels branch: the first top-level `if labels is not None:` that computes a loss.
    let candidates: Vec<(usize, &StmtIf, &str)> = body
        .iter()
        .enumerate()
        .filter_map(|(i, s)| labels_test(s).map(|(b, n)| (i, b, n)))
        .collect();
    let Some(&(last_idx, last_branch, _)) = candidates.last() else {
        return Err(Refusal::new(
            R::NoLabelsBranch,
            src.line(func),
            "no top-level `if labels is not None:` branch",
        ));
    };
    let mut found = None;
    for &(i, branch, name) in &candidates {
        if let Ok(call) = find_loss_call(src, branch) {
            found = Some((i, branch, name, call));
            break;
        }
    }
    let (labels_idx, branch, labels, call) = match found {
        Some(f) => f,
        None => {
            // A head problem explains the odd loss better than the loss does (e.g. one head per codebook).
            for s in &body[..last_idx] {
                if let Some((_, value)) = simple_assign(s) {
                    if let Err(HeadProblem::Stacked) = parse_head(value, "") {
                        return Err(refuse(R::StackedHeads, src, s, "several heads are stacked"));
                    }
                }
            }
            return Err(find_loss_call(src, last_branch).err().unwrap_or_else(|| {
                refuse(R::UnsupportedLoss, src, &body[last_idx], "no loss call")
            }));
        }
    };
    if !branch.elif_else_clauses.is_empty() {
        return Err(refuse(
            R::NonEmptyElse,
            src,
            branch,
            "the labels branch has an `elif`/`else`",
        ));
    }
    let Expr::Name(logits_expr) = call.logits else {
        return Err(refuse(
            R::LossInputNotLogits,
            src,
            call.logits,
            format!(
                "the loss consumes `{}`, not a logits variable",
                src.slice(call.logits)
            ),
        ));
    };
    let logits = logits_expr.id.as_str();
    let is_wrap_rebind = |s: &Stmt| {
        simple_assign(s).is_some_and(|(t, v)| {
            t == logits
                && parse_epilogue(v, logits, &|e: &Expr| src.slice(e))
                    .is_some_and(|ops| ops.iter().all(|o| matches!(o, Op::Wrap)))
        })
    };
    let unconsumed = |j: &usize| !call.consumed.contains(j);
    if let Some(s) = branch.body[..call.stmt_idx]
        .iter()
        .enumerate()
        .filter(|(j, _)| unconsumed(j))
        .map(|(_, s)| s)
        .find(|s| stmt_binds(s, logits) && !is_wrap_rebind(s))
    {
        return Err(refuse(
            R::LossInputNotLogits,
            src,
            s,
            format!(
                "the loss consumes `{logits}`, computed inside the labels branch (shifted or sliced logits)"
            ),
        ));
    }
    let labels_arg_ok = is_name(call.labels, labels) || call.labels.is_none_literal_expr();
    if !labels_arg_ok {
        return Err(refuse(
            R::LabelsMutated,
            src,
            call.labels,
            format!(
                "the loss is given `{}` instead of `{labels}`",
                src.slice(call.labels)
            ),
        ));
    }

    // 2. The labels branch around the loss call.
    let mut dropped: Vec<String> = Vec::new();
    let mut pre = Vec::new();
    let mut post = Vec::new();
    let mut fused_guards = Vec::new();
    // `logits = logits.float()` / `.to(...)` inside the branch: only the returned logits see them, so they are
    // replayed with the head when real logits are asked for.
    let mut branch_wraps: Vec<&Stmt> = Vec::new();
    for (i, stmt) in branch.body.iter().enumerate() {
        if i == call.stmt_idx {
            continue;
        }
        if call.consumed.contains(&i) {
            dropped.extend(bound_names(stmt));
            continue;
        }
        if is_wrap_rebind(stmt) {
            branch_wraps.push(stmt);
            continue;
        }
        if i < call.stmt_idx {
            if is_labels_move(stmt, labels) {
                dropped.push(labels.to_string());
            } else if stmt_binds(stmt, labels) || mutates_in_place(stmt, labels) {
                return Err(refuse(
                    R::LabelsMutated,
                    src,
                    stmt,
                    format!("`{labels}` is rebound or mutated before the loss"),
                ));
            } else if stmt_binds(stmt, logits) || mutates_in_place(stmt, logits) {
                return Err(refuse(
                    R::LossInputNotLogits,
                    src,
                    stmt,
                    format!("`{logits}` is changed inside the labels branch"),
                ));
            } else if stmt_reads(stmt, logits) {
                return Err(refuse(
                    R::LabelsBranchReadsLogits,
                    src,
                    stmt,
                    "the labels branch reads the logits before the loss",
                ));
            } else {
                pre.push(stmt);
            }
        } else if stmt_reads(stmt, logits) || stmt_binds(stmt, logits) {
            // An auxiliary term from the logits: fusable only when its guard is off at run time.
            match stmt {
                Stmt::If(s)
                    if s.elif_else_clauses.is_empty()
                        && !expr_reads(&s.test, logits)
                        && !has_call(&s.test) =>
                {
                    fused_guards.push(format!("not ({})", src.slice(&*s.test)));
                    // The loss itself is bound by hf_loss on the fused path.
                    dropped.extend(bound_names(stmt).into_iter().filter(|n| *n != call.loss));
                }
                _ => {
                    return Err(refuse(
                        R::LabelsBranchReadsLogits,
                        src,
                        stmt,
                        "the labels branch computes more from the logits than the loss",
                    ));
                }
            }
        } else {
            post.push(stmt);
        }
    }

    // 3. Backwards from the labels branch to the head call.
    let mut items: Vec<Item<'a>> = Vec::new();
    let mut head_idx = None;
    let text = |e: &Expr| -> &'a str { src.slice(e) };
    for idx in (0..labels_idx).rev() {
        let stmt = &body[idx];
        if let Some((target, value)) = simple_assign(stmt) {
            if target == logits {
                if let Some(ops) = parse_epilogue(value, logits, &text) {
                    items.push(Item::Epilogue(stmt, ops, None));
                    continue;
                }
                match parse_head(value, logits) {
                    Ok(h) if expr_reads(h.hidden, logits) => {
                        // `logits = self.<module>(logits)`: a module epilogue if a head call came earlier.
                        let earlier_head = body[..idx].iter().rev().find_map(|s| {
                            let (t, v) = simple_assign(s)?;
                            let e = parse_head(v, logits)
                                .ok()
                                .filter(|e| t == logits && !expr_reads(e.hidden, logits))?;
                            Some(e.attr)
                        });
                        let (code, msg) = if let Some(first) = earlier_head {
                            (
                                R::LogitsRebound,
                                format!(
                                    "`{logits}` goes through `self.{first}` then `self.{}`",
                                    h.attr
                                ),
                            )
                        } else {
                            (
                                R::HiddenReadsLogits,
                                format!("the head's input reads `{logits}`"),
                            )
                        };
                        return Err(refuse(code, src, stmt, msg));
                    }
                    Ok(_) => {
                        items.push(Item::Head(stmt));
                        head_idx = Some(idx);
                        break;
                    }
                    Err(HeadProblem::NotAHead) if !expr_reads(value, logits) => {
                        return Err(refuse(
                            R::NoHeadCall,
                            src,
                            stmt,
                            format!(
                                "`{logits}` comes from `{}`, not a head call",
                                src.slice(value)
                            ),
                        ));
                    }
                    Err(HeadProblem::NotAHead) => {
                        return Err(refuse(
                            R::LogitsRebound,
                            src,
                            stmt,
                            format!(
                                "`{logits}` is rebound by something that is not a supported epilogue"
                            ),
                        ));
                    }
                    Err(HeadProblem::Stacked) => {
                        return Err(refuse(
                            R::StackedHeads,
                            src,
                            stmt,
                            "several heads are stacked",
                        ));
                    }
                    Err(HeadProblem::Shape(m)) => {
                        return Err(refuse(R::HeadCallShape, src, stmt, m));
                    }
                    Err(HeadProblem::NotLinear(h)) => {
                        return Err(refuse(
                            R::HeadNotLinear,
                            src,
                            stmt,
                            format!("`self.{h}` is a composite head, not an nn.Linear"),
                        ));
                    }
                }
            }
            if target == call.loss && value.is_none_literal_expr() {
                items.push(Item::LossInit);
                continue;
            }
        }
        if let Stmt::If(guarded) = stmt {
            if stmt_binds(stmt, logits) || stmt_reads(stmt, logits) {
                if !guarded.elif_else_clauses.is_empty() || expr_reads(&guarded.test, logits) {
                    return Err(refuse(
                        R::EpilogueGuard,
                        src,
                        stmt,
                        "a guard around the logits reads them or has an `else`",
                    ));
                }
                let mut ops = Vec::new();
                for inner in &guarded.body {
                    let parsed = simple_assign(inner)
                        .filter(|(t, _)| *t == logits)
                        .and_then(|(_, v)| parse_epilogue(v, logits, &text));
                    match parsed {
                        Some(o) => ops.extend(o),
                        None => {
                            let code = if mutates_in_place(inner, logits) {
                                R::LogitsMutated
                            } else {
                                R::LogitsRebound
                            };
                            return Err(refuse(
                                code,
                                src,
                                inner,
                                format!(
                                    "`{logits}` is changed by something that is not a supported epilogue"
                                ),
                            ));
                        }
                    }
                }
                items.push(Item::Epilogue(stmt, ops, Some(&guarded.test)));
                continue;
            }
        }
        if mutates_in_place(stmt, logits) {
            return Err(refuse(
                R::LogitsMutated,
                src,
                stmt,
                format!("`{logits}` is mutated in place"),
            ));
        }
        if stmt_binds(stmt, logits) {
            return Err(refuse(
                R::LogitsRebound,
                src,
                stmt,
                format!("`{logits}` is rebound"),
            ));
        }
        if stmt_reads(stmt, logits) {
            return Err(refuse(
                R::UnexpectedStatement,
                src,
                stmt,
                format!("a statement reads `{logits}` before the loss"),
            ));
        }
        if stmt_binds(stmt, labels) {
            return Err(refuse(
                R::LabelsMutated,
                src,
                stmt,
                format!("`{labels}` is rebound before the loss"),
            ));
        }
        items.push(Item::Setup(stmt));
    }
    let Some(head_idx) = head_idx else {
        return Err(refuse(
            R::NoHeadCall,
            src,
            &body[labels_idx],
            format!("no `{logits} = self.<head>(...)` before the labels branch"),
        ));
    };
    items.reverse();

    // The head statement again, now for its parts.
    let Item::Head(head_stmt) = items[0] else {
        return Err(refuse(
            R::NoHeadCall,
            src,
            &body[head_idx],
            "internal: head statement not first",
        ));
    };
    let Some((_, head_value)) = simple_assign(head_stmt) else {
        return Err(refuse(
            R::NoHeadCall,
            src,
            head_stmt,
            "internal: head statement is not an assignment",
        ));
    };
    let Ok(head) = parse_head(head_value, logits) else {
        return Err(refuse(
            R::NoHeadCall,
            src,
            head_stmt,
            "internal: head statement did not re-parse",
        ));
    };
    if expr_reads(head.hidden, logits) {
        return Err(refuse(
            R::HiddenReadsLogits,
            src,
            head.hidden,
            format!("the head's input reads `{logits}`"),
        ));
    }

    // 4. Order-sensitive checks: names rebound on the fused path before they are read by the head/epilogue.
    let mut replay: Vec<&Stmt> = Vec::new();
    let mut setup: Vec<&Stmt> = Vec::new();
    let mut ops: Vec<(Op<'a>, Option<&'a Expr>, &'a Stmt)> =
        head.ops.iter().map(|o| (*o, None, head_stmt)).collect();
    for item in &items {
        match item {
            Item::Head(s) => replay.push(s),
            Item::Epilogue(s, o, guard) => {
                replay.push(s);
                ops.extend(o.iter().map(|op| (*op, *guard, *s)));
            }
            Item::LossInit => {}
            Item::Setup(s) => {
                for name in bound_names(s) {
                    if replay.iter().any(|r| stmt_reads(r, &name)) {
                        return Err(refuse(
                            R::UnexpectedStatement,
                            src,
                            *s,
                            format!("`{name}` is rebound after the head reads it"),
                        ));
                    }
                }
                setup.push(s);
            }
        }
    }
    replay.extend(branch_wraps.iter().copied());
    for s in pre.iter().chain(post.iter()) {
        for name in bound_names(s) {
            if replay.iter().any(|r| stmt_reads(r, &name)) {
                return Err(refuse(
                    R::UnexpectedStatement,
                    src,
                    *s,
                    format!("the labels branch rebinds `{name}`, which the head reads"),
                ));
            }
        }
    }

    // 5. Softcap triples, order, and the expressions passed to hf_loss.
    let epilogue = merge_epilogue(src, &ops)?;

    let check_free = |e: &Expr, what: &str| {
        if expr_reads(e, logits) {
            Err(refuse(
                R::LossArgsReadLogits,
                src,
                e,
                format!("the {what} reads `{logits}`"),
            ))
        } else {
            Ok(())
        }
    };
    if let Some(v) = call.vocab {
        check_free(v, "vocab size")?;
    }
    for (_, v) in &call.keywords {
        check_free(v, "loss keyword")?;
    }
    for (name, _) in &call.keywords {
        if let Some(n) = name {
            if [
                "logits_bias",
                "logit_scale_multiply",
                "logit_scale_divide",
                "logit_softcapping",
            ]
            .contains(&n.as_str())
            {
                return Err(refuse(
                    R::UnsupportedLoss,
                    src,
                    branch,
                    format!("the loss call already passes `{n}`"),
                ));
            }
        }
    }

    // 6. What runs after the labels branch: names the fused path leaves unbound, and uses of the logits.
    let replay_bound: Vec<String> = replay
        .iter()
        .flat_map(|s| bound_names(s))
        .filter(|n| n != logits && !epilogue_walrus_names(&ops).contains(n))
        .collect();
    let later: Vec<&Stmt> = post
        .iter()
        .copied()
        .chain(body[labels_idx + 1..].iter())
        .collect();
    for s in &later {
        for name in dropped.iter().chain(replay_bound.iter()) {
            if stmt_reads(s, name) {
                return Err(refuse(
                    R::DroppedNameUsed,
                    src,
                    *s,
                    format!("`{name}` is read after the loss but not bound on the fused path"),
                ));
            }
        }
    }
    for s in &body[labels_idx + 1..] {
        if let Some(bad) = logits_use_after(s, logits) {
            return Err(refuse(
                R::LogitsUsedAfterLoss,
                src,
                bad,
                format!("`{logits}` is used after the loss (it is empty on the fused path)"),
            ));
        }
        if stmt_binds(s, logits) {
            break;
        }
    }

    // 7. Formatting the emitter relies on.
    let region = &body[head_idx..=labels_idx];
    for s in region {
        if crate::source::has_multiline_string(src, s) {
            return Err(refuse(
                R::UnsupportedFormatting,
                src,
                s,
                "a multi-line string in the rewritten region",
            ));
        }
        if !src.indent_of(s).chars().all(|c| c == ' ') {
            return Err(refuse(
                R::UnsupportedFormatting,
                src,
                s,
                "the region is not indented with spaces only, one statement a line",
            ));
        }
    }
    let region_text = src.range(ruff_text_size::TextRange::new(
        region[0].start(),
        region[region.len() - 1].end(),
    ));
    if region_text
        .lines()
        .any(|l| l.starts_with(|c: char| c == '\t') || l.contains("\n\t"))
    {
        return Err(refuse(
            R::UnsupportedFormatting,
            src,
            &region[0],
            "tab indentation in the rewritten region",
        ));
    }
    let body_indent = format!("{}    ", src.indent_of(&region[0]));
    for s in pre.iter().chain(post.iter()) {
        if src.indent_of(*s) != body_indent {
            return Err(refuse(
                R::UnsupportedFormatting,
                src,
                *s,
                "the labels branch is not indented by four spaces",
            ));
        }
    }

    Ok(Plan {
        head: head.attr,
        hidden: head.hidden,
        logits: logits.to_string(),
        loss: call.loss,
        labels: labels.to_string(),
        labels_arg: src.slice(call.labels).to_string(),
        vocab: call.vocab.map(|v| src.slice(v).to_string()),
        epilogue,
        loss_keywords: call
            .keywords
            .iter()
            .map(|(n, v)| (n.clone(), src.slice(*v).to_string()))
            .collect(),
        form: call.form,
        head_idx,
        labels_idx,
        setup,
        replay,
        pre,
        post,
        fused_guards,
    })
}

/// Walrus targets in epilogue guards: the emitted keyword re-binds them, so they stay bound on the fused path.
fn epilogue_walrus_names(ops: &[(Op<'_>, Option<&Expr>, &Stmt)]) -> Vec<String> {
    ops.iter()
        .filter_map(|(_, g, _)| *g)
        .filter_map(|g| walrus_in_guard(g).map(|(n, _)| n.to_string()))
        .collect()
}

/// `(name := value) is not None` → (name, whole walrus expression).
fn walrus_in_guard(guard: &Expr) -> Option<(&str, &Expr)> {
    let Expr::Compare(cmp) = guard else {
        return None;
    };
    match (
        cmp.left.as_ref(),
        cmp.ops.as_ref(),
        cmp.comparators.as_ref(),
    ) {
        (Expr::Named(named), [CmpOp::IsNot], [Expr::NoneLiteral(_)]) => match named.target.as_ref()
        {
            Expr::Name(n) => Some((n.id.as_str(), cmp.left.as_ref())),
            _ => None,
        },
        _ => None,
    }
}

/// The expression passed to hf_loss for a step valued `value` under `guard`, so that `None` means "not applied"
/// exactly when the original skips the step.
fn guarded_value(
    src: &Source<'_>,
    value: &Expr,
    guard: Option<&Expr>,
    walrus_emitted: &mut Vec<String>,
) -> String {
    let v = src.slice(value);
    let Some(guard) = guard else {
        return atom_text(src, value);
    };
    if let Some((name, walrus)) = walrus_in_guard(guard) {
        if v == name {
            if walrus_emitted.iter().any(|n| n == name) {
                return name.to_string();
            }
            walrus_emitted.push(name.to_string());
            return format!("({})", src.slice(walrus));
        }
    }
    if let Expr::Compare(cmp) = guard {
        if let ([CmpOp::IsNot], [Expr::NoneLiteral(_)]) =
            (cmp.ops.as_ref(), cmp.comparators.as_ref())
        {
            if src.slice(&*cmp.left) == v {
                // `None` skips in both; 0 would divide by zero in the original (degenerate), hf_loss skips it.
                return atom_text(src, value);
            }
        }
    }
    if src.slice(guard) == v {
        // Truthiness: None and 0 skip in both.
        return atom_text(src, value);
    }
    format!("({} if {} else None)", v, src.slice(guard))
}

fn merge_epilogue(
    src: &Source<'_>,
    ops: &[(Op<'_>, Option<&Expr>, &Stmt)],
) -> Result<Vec<EpilogueStep>, Refusal> {
    let real: Vec<&(Op<'_>, Option<&Expr>, &Stmt)> = ops
        .iter()
        .filter(|(o, _, _)| !matches!(o, Op::Wrap))
        .collect();
    let same_guard = |a: Option<&Expr>, b: Option<&Expr>| match (a, b) {
        (None, None) => true,
        (Some(x), Some(y)) => std::ptr::eq(x, y),
        _ => false,
    };
    let mut steps: Vec<(EpilogueKind, &Expr, Option<&Expr>, &Stmt)> = Vec::new();
    let mut i = 0;
    while i < real.len() {
        let (op, guard, stmt) = *real[i];
        match op {
            Op::Div(c) => {
                let triple =
                    real.get(i + 1)
                        .zip(real.get(i + 2))
                        .and_then(|(t, m)| match (t.0, m.0) {
                            (Op::Tanh, Op::Mul(c2))
                                if src.slice(c) == src.slice(c2)
                                    && same_guard(guard, t.1)
                                    && same_guard(guard, m.1) =>
                            {
                                Some(())
                            }
                            _ => None,
                        });
                if triple.is_some() {
                    steps.push((EpilogueKind::Softcap, c, guard, stmt));
                    i += 3;
                    continue;
                }
                steps.push((EpilogueKind::Divide, c, guard, stmt));
            }
            Op::Mul(c) => steps.push((EpilogueKind::Multiply, c, guard, stmt)),
            Op::Add(c) => steps.push((EpilogueKind::LogitsBias, c, guard, stmt)),
            Op::Softcap(c) => steps.push((EpilogueKind::Softcap, c, guard, stmt)),
            Op::Tanh => {
                return Err(refuse(
                    R::LogitsRebound,
                    src,
                    stmt,
                    "`tanh` of the logits that is not part of a softcap",
                ));
            }
            Op::Wrap => {}
        }
        i += 1;
    }
    for pair in steps.windows(2) {
        if pair[1].0 <= pair[0].0 {
            return Err(refuse(
                R::EpilogueOrder,
                src,
                pair[1].3,
                format!(
                    "epilogue `{}` after `{}`: the fused op applies bias, multiply, divide, softcap once each in that order",
                    pair[1].0.as_str(),
                    pair[0].0.as_str()
                ),
            ));
        }
    }
    let mut walrus = Vec::new();
    Ok(steps
        .into_iter()
        .map(|(kind, value, guard, _)| EpilogueStep {
            kind,
            expr: guarded_value(src, value, guard, &mut walrus),
        })
        .collect())
}

/// The first read of `logits` after the loss that is not just handing it back (keyword, tuple/list element,
/// dict value, return value).
fn logits_use_after<'a>(stmt: &'a Stmt, logits: &str) -> Option<&'a Expr> {
    use ruff_python_ast::visitor::{self, Visitor};
    struct Find<'n, 'a> {
        logits: &'n str,
        bad: Option<&'a Expr>,
    }
    impl<'a> Find<'_, 'a> {
        fn handed_back(&self, e: &Expr) -> bool {
            is_name(e, self.logits)
        }
    }
    impl<'a> Visitor<'a> for Find<'_, 'a> {
        fn visit_stmt(&mut self, stmt: &'a Stmt) {
            if let Stmt::Return(r) = stmt {
                if r.value.as_deref().is_some_and(|v| self.handed_back(v)) {
                    return;
                }
            }
            visitor::walk_stmt(self, stmt);
        }
        fn visit_expr(&mut self, expr: &'a Expr) {
            if self.bad.is_some() {
                return;
            }
            match expr {
                Expr::Name(n) if n.id.as_str() == self.logits && n.ctx.is_load() => {
                    self.bad = Some(expr)
                }
                Expr::Call(call) => {
                    self.visit_expr(&call.func);
                    for a in &call.arguments.args {
                        self.visit_expr(a);
                    }
                    for kw in &call.arguments.keywords {
                        if !self.handed_back(&kw.value) {
                            self.visit_expr(&kw.value);
                        }
                    }
                }
                Expr::Tuple(ruff_python_ast::ExprTuple { elts, .. })
                | Expr::List(ruff_python_ast::ExprList { elts, .. }) => {
                    for e in elts {
                        if !self.handed_back(e) {
                            self.visit_expr(e);
                        }
                    }
                }
                Expr::Dict(d) => {
                    for item in &d.items {
                        if let Some(k) = &item.key {
                            self.visit_expr(k);
                        }
                        if !self.handed_back(&item.value) {
                            self.visit_expr(&item.value);
                        }
                    }
                }
                _ => visitor::walk_expr(self, expr),
            }
        }
    }
    let mut f = Find { logits, bad: None };
    f.visit_stmt(stmt);
    f.bad
}
