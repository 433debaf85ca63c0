//! Recognising the loss of a labels branch: `self.loss_function(...)`, or `CrossEntropyLoss()` on aligned or
//! causally shifted logits and labels (the 4.x manual shift), traced back through the branch's statements.

use ruff_python_ast::{CmpOp, Expr, Stmt, StmtIf, UnaryOp};

use crate::epilogue::{is_minus_one, strip_wrap};
use crate::refusal::{ReasonCode as R, Refusal};
use crate::source::{Source, bound_names, dotted, expr_reads, refuse, simple_assign};

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
    /// `CrossEntropyLoss()` of a sub-model's logits (encoder-decoder wrappers): fused by handing the labels to the
    /// sub-model, whose own loss is that (`crate::delegate`).
    Delegated,
}

impl LossForm {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::LossFunction => "loss_function",
            Self::CrossEntropy => "cross_entropy",
            Self::ShiftedCrossEntropy => "shifted_cross_entropy",
            Self::Delegated => "delegated",
        }
    }
}

/// The loss call of a labels branch and what it consumes.
pub(crate) struct LossCall<'a> {
    pub(crate) stmt_idx: usize,
    pub(crate) loss: String,
    pub(crate) logits: &'a Expr,
    pub(crate) labels: &'a Expr,
    pub(crate) vocab: Option<&'a Expr>,
    pub(crate) keywords: Vec<(Option<String>, &'a Expr)>,
    pub(crate) form: LossForm,
    /// The cross-entropy forms' constructor as written (`CrossEntropyLoss`, `nn.CrossEntropyLoss`, ...): the
    /// installer checks that it names torch's class in the module it runs in.
    pub(crate) ce_class: Option<String>,
    /// Statements of the branch that only prepare the loss's arguments (shift, view, device move, the
    /// `CrossEntropyLoss()` object): replaced by the fused call.
    pub(crate) consumed: Vec<usize>,
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
        } else if let Some(inner) = strip_wrap(e) {
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

/// `CrossEntropyLoss()` and the constructor keywords whose effect the fused loss reproduces exactly:
/// `ignore_index=<int literal>` (returned, to be passed on) and `reduction="mean"` (the default). `None` when
/// `expr` is not such a constructor: other keywords (`weight`, `label_smoothing`, another reduction) and positional
/// arguments are not understood.
pub(crate) fn ce_constructor(expr: &Expr) -> Option<Option<&Expr>> {
    let Expr::Call(call) = expr else { return None };
    if !names_ce(expr) || !call.arguments.args.is_empty() {
        return None;
    }
    let mut ignore_index = None;
    for kw in &call.arguments.keywords {
        match kw.arg.as_ref().map(|a| a.id.as_str()) {
            Some("ignore_index") if int_literal(&kw.value) => ignore_index = Some(&kw.value),
            Some("reduction") if is_string(&kw.value, "mean") => {}
            _ => return None,
        }
    }
    Some(ignore_index)
}

/// A call of `CrossEntropyLoss`, whatever its arguments.
fn names_ce(expr: &Expr) -> bool {
    let Expr::Call(call) = expr else { return false };
    dotted(&call.func).is_some_and(|d| {
        matches!(
            d.as_str(),
            "CrossEntropyLoss" | "nn.CrossEntropyLoss" | "torch.nn.CrossEntropyLoss"
        )
    })
}

fn is_ce_constructor(expr: &Expr) -> bool {
    ce_constructor(expr).is_some()
}

/// `7`, `-100`: an integer literal, possibly negated.
fn int_literal(expr: &Expr) -> bool {
    let e = match expr {
        Expr::UnaryOp(u) if u.op == UnaryOp::USub => u.operand.as_ref(),
        e => e,
    };
    matches!(e, Expr::NumberLiteral(n) if n.value.as_int().is_some())
}

fn is_string(expr: &Expr, value: &str) -> bool {
    matches!(expr, Expr::StringLiteral(s) if s.value.to_str() == value)
}

/// `x.view(-1, V)` → (x, V); `x.view(-1)` → (x, None); the same with `reshape` (same values, a copy at most).
pub(crate) fn view_call(expr: &Expr) -> Option<(&Expr, Option<&Expr>)> {
    let Expr::Call(call) = expr else { return None };
    let Expr::Attribute(attr) = call.func.as_ref() else {
        return None;
    };
    if !matches!(attr.attr.id.as_str(), "view" | "reshape") || !call.arguments.keywords.is_empty() {
        return None;
    }
    match call.arguments.args.as_ref() {
        [m] if is_minus_one(m) => Some((&attr.value, None)),
        [m, v] if is_minus_one(m) && !v.is_starred_expr() => Some((&attr.value, Some(v))),
        _ => None,
    }
}

/// Finds the loss call in a labels branch.
pub(crate) fn find_loss_call<'a>(
    src: &Source<'a>,
    branch: &'a StmtIf,
) -> Result<LossCall<'a>, Refusal> {
    let mut ce_names: Vec<&str> = Vec::new();
    for (i, stmt) in branch.body.iter().enumerate() {
        let Some((target, value)) = simple_assign(stmt) else {
            continue;
        };
        if is_ce_constructor(value) {
            ce_names.push(target);
            continue;
        }
        if names_ce(value) {
            return Err(refuse(
                R::UnsupportedLoss,
                src,
                value,
                "`CrossEntropyLoss` with options other than a literal `ignore_index` and `reduction=\"mean\"`",
            ));
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
                ce_class: None,
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
            let constructor = ce_def.and_then(|j| simple_assign(&body[j])).map(|(_, v)| v);
            let ignore_index = constructor.and_then(ce_constructor).flatten();
            let ce_class = constructor.and_then(|v| match v {
                Expr::Call(c) => dotted(&c.func),
                _ => None,
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
                keywords: ignore_index
                    .map(|v| (Some("ignore_index".to_string()), v))
                    .into_iter()
                    .collect(),
                form,
                ce_class,
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

pub(crate) fn logits_name(expr: &Expr) -> &str {
    match expr {
        Expr::Name(n) => n.id.as_str(),
        _ => "",
    }
}

/// `if <name> is not None:` → `<name>`.
pub(crate) fn labels_test(stmt: &Stmt) -> Option<(&StmtIf, &str)> {
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
