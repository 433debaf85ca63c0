//! What the labels do in a forward besides its loss.
//!
//! HF Trainer's label smoothing calls the model *without* labels and smooths the loss of the logits it returns. A
//! caller that wants that loss fused has to hand the labels to the forward after all, which is only the same call
//! if the labels feed the loss and nothing else, or only things with no effect on what the loss is computed from:
//!
//! ```python
//! if labels is not None:
//!     if labels.shape[1] > self.max_target_positions:
//!         raise ValueError(...)               # a check: may raise where the call without labels did not check
//!     if use_cache:
//!         logger.warning("...")
//!     use_cache = False                       # only the returned cache differs
//!     if decoder_input_ids is None and decoder_inputs_embeds is None:
//!         decoder_input_ids = shift_tokens_right(labels, ...)   # not run when the call passes decoder_input_ids
//!
//! if output_router_logits:
//!     aux_loss = load_balancing_loss_func(...)
//!     if labels is not None:
//!         loss += self.router_aux_loss_coef * aux_loss  # only the returned loss differs
//! ```

use ruff_python_ast::{BoolOp, CmpOp, Expr, Operator, Stmt, StmtIf};

use crate::analysis::Plan;
use crate::source::{dotted, expr_reads, is_name, simple_assign, stmt_reads};

const DECODER_INPUTS: &str = "decoder_input_ids";
const DECODER_EMBEDS: &str = "decoder_inputs_embeds";

/// The uses of the labels outside the loss, when every one of them is one of these.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LabelsElsewhere {
    /// `decoder_input_ids = f(labels)` under a `decoder_input_ids is None` test (encoder-decoder models): the same
    /// call as without labels when the caller passes `decoder_input_ids`.
    pub decoder_inputs: bool,
    /// `use_cache = False` (after a warning when it was on): only the returned cache differs.
    pub disables_cache: bool,
    /// `if <test>: raise ...` (Whisper's labels longer than its decoder positions): the call may raise where the
    /// same call without labels would not have checked.
    pub validates: bool,
}

/// `None` when the labels are read anywhere else (another statement, a statement of the labels branch kept
/// beside the loss) in a way not listed in [`LabelsElsewhere`].
pub(crate) fn labels_elsewhere(body: &[Stmt], plan: &Plan<'_>) -> Option<LabelsElsewhere> {
    let (labels, loss) = (plan.labels.as_str(), plan.loss.as_str());
    if plan
        .pre
        .iter()
        .chain(&plan.post)
        .any(|s| stmt_reads(s, labels) && !adds_to_loss(s, labels, loss))
    {
        return None;
    }
    let mut uses = LabelsElsewhere::default();
    for (i, stmt) in body.iter().enumerate() {
        if i != plan.labels_idx && stmt_reads(stmt, labels) && !adds_to_loss(stmt, labels, loss) {
            labels_block(stmt, labels, &mut uses)?;
        }
    }
    Some(uses)
}

/// A statement whose only effect that depends on the labels is a term added to `loss`: `loss += e`,
/// `loss = loss + e`, or an `if` around such statements (the others in it read neither name, so they run the
/// same with or without labels; under a test that reads the labels there are no others).
fn adds_to_loss(stmt: &Stmt, labels: &str, loss: &str) -> bool {
    match stmt {
        Stmt::AugAssign(a) => is_name(&a.target, loss) && a.op == Operator::Add,
        Stmt::If(block) => {
            let guarded = expr_reads(&block.test, labels);
            block.elif_else_clauses.is_empty()
                && block.body.iter().all(|s| {
                    adds_to_loss(s, labels, loss)
                        || (!guarded && !stmt_reads(s, labels) && !stmt_reads(s, loss))
                })
        }
        _ => match simple_assign(stmt) {
            Some((target, Expr::BinOp(b))) => {
                target == loss && b.op == Operator::Add && is_name(&b.left, loss)
            }
            _ => false,
        },
    }
}

/// `if labels is not None [and decoder_input_ids is None ...]:` with only the recognised statements inside.
fn labels_block(stmt: &Stmt, labels: &str, uses: &mut LabelsElsewhere) -> Option<()> {
    let Stmt::If(block) = stmt else { return None };
    if !block.elif_else_clauses.is_empty() {
        return None;
    }
    let mut tests = Vec::new();
    conjuncts(&block.test, &mut tests);
    let (labels_tests, rest): (Vec<&Expr>, Vec<&Expr>) = tests
        .into_iter()
        .partition(|t| compares_none(t, labels, CmpOp::IsNot));
    if labels_tests.is_empty() {
        return None;
    }
    let outer_none = none_tested(&rest)?;
    // The warning the cache switch logs changes nothing: it is skipped.
    for inner in block.body.iter().filter(|s| !is_cache_warning(s)) {
        if is_cache_off(inner) {
            uses.disables_cache = true;
        } else if is_check(inner) {
            uses.validates = true;
        } else if let Stmt::If(nested) = inner {
            let mut tests = Vec::new();
            conjuncts(&nested.test, &mut tests);
            let names = none_tested(&tests)?;
            if !nested.elif_else_clauses.is_empty()
                || !(outer_none || names)
                || !matches!(nested.body.as_slice(), [s] if assigns_decoder_inputs(s))
            {
                return None;
            }
            uses.decoder_inputs = true;
        } else if outer_none && assigns_decoder_inputs(inner) {
            uses.decoder_inputs = true;
        } else {
            return None;
        }
    }
    Some(())
}

/// `if <test>: raise <...>`, nothing else.
fn is_check(stmt: &Stmt) -> bool {
    matches!(stmt, Stmt::If(c) if c.elif_else_clauses.is_empty()
        && c.body.iter().all(|s| matches!(s, Stmt::Raise(_))))
}

/// The operands of a chain of `and`s.
fn conjuncts<'a>(expr: &'a Expr, out: &mut Vec<&'a Expr>) {
    match expr {
        Expr::BoolOp(b) if b.op == BoolOp::And => b.values.iter().for_each(|v| conjuncts(v, out)),
        _ => out.push(expr),
    }
}

/// `<name> is None` (`op` = `Is`) or `<name> is not None` (`IsNot`).
fn compares_none(expr: &Expr, name: &str, op: CmpOp) -> bool {
    let Expr::Compare(cmp) = expr else {
        return false;
    };
    is_name(&cmp.left, name)
        && cmp.ops.as_ref() == [op]
        && matches!(cmp.comparators.as_ref(), [Expr::NoneLiteral(_)])
}

/// Every test is `decoder_input_ids is None` or `decoder_inputs_embeds is None`: whether the first is among them.
/// `None` when some test is anything else.
fn none_tested(tests: &[&Expr]) -> Option<bool> {
    let mut inputs = false;
    for t in tests {
        if compares_none(t, DECODER_INPUTS, CmpOp::Is) {
            inputs = true;
        } else if !compares_none(t, DECODER_EMBEDS, CmpOp::Is) {
            return None;
        }
    }
    Some(inputs)
}

fn assigns_decoder_inputs(stmt: &Stmt) -> bool {
    matches!(simple_assign(stmt), Some((DECODER_INPUTS, _)))
}

fn is_cache_off(stmt: &Stmt) -> bool {
    matches!(simple_assign(stmt), Some(("use_cache", Expr::BooleanLiteral(b))) if !b.value)
}

/// `if use_cache: logger.warning(...)` (any `logger.warning*` or `warnings.warn` calls, nothing else).
fn is_cache_warning(stmt: &Stmt) -> bool {
    let Stmt::If(StmtIf {
        test,
        body,
        elif_else_clauses,
        ..
    }) = stmt
    else {
        return false;
    };
    is_name(test, "use_cache")
        && elif_else_clauses.is_empty()
        && body.iter().all(|s| {
            let Stmt::Expr(e) = s else { return false };
            let Expr::Call(call) = e.value.as_ref() else {
                return false;
            };
            matches!(dotted(&call.func).as_deref(),
                Some(f) if f == "warnings.warn" || f.starts_with("logger.warning"))
        })
}
