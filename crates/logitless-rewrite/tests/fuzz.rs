//! Property test over mutated real-looking forwards (the fixtures): the rewriter never panics, whatever it
//! emits re-parses and still holds the original function, and input that does not parse is refused.

use std::path::Path;

use logitless_rewrite::{LossForm, ReasonCode, RewriteOptions, rewrite_forward};
use proptest::prelude::*;

fn fixtures() -> Vec<String> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let mut paths: Vec<_> = std::fs::read_dir(dir)
        .expect("fixtures")
        .map(|e| e.expect("entry").path())
        .collect();
    paths.sort();
    paths
        .iter()
        .map(|p| std::fs::read_to_string(p).expect("read"))
        .collect()
}

/// Mutations that keep sources "real-looking": line edits and token swaps drawn from the forwards' vocabulary.
#[derive(Debug, Clone)]
enum Mutation {
    DeleteLine(usize),
    DuplicateLine(usize),
    SwapLines(usize, usize),
    ReplaceWord(usize, &'static str),
    InsertText(usize, &'static str),
}

const WORDS: &[&str] = &[
    "logits",
    "labels",
    "loss",
    "hidden_states",
    "self.lm_head",
    "None",
    "kwargs",
    "torch.tanh",
    "*",
    "/",
    "+",
    "if",
    "else:",
    "(",
    ")",
    "lm_logits",
    "self.cls",
    "is not None",
    "**kwargs",
    ":=",
    "\"\"\"",
    "\t",
    "\\",
];

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        any::<usize>().prop_map(Mutation::DeleteLine),
        any::<usize>().prop_map(Mutation::DuplicateLine),
        (any::<usize>(), any::<usize>()).prop_map(|(a, b)| Mutation::SwapLines(a, b)),
        (any::<usize>(), prop::sample::select(WORDS))
            .prop_map(|(i, w)| Mutation::ReplaceWord(i, w)),
        (any::<usize>(), prop::sample::select(WORDS)).prop_map(|(i, w)| Mutation::InsertText(i, w)),
    ]
}

fn apply(text: &str, m: &Mutation) -> String {
    let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
    let n = lines.len().max(1);
    match *m {
        Mutation::DeleteLine(i) => {
            lines.remove(i % n);
        }
        Mutation::DuplicateLine(i) => {
            let l = lines[i % n].clone();
            lines.insert(i % n, l);
        }
        Mutation::SwapLines(a, b) => lines.swap(a % n, b % n),
        Mutation::ReplaceWord(i, w) => {
            let words: Vec<(usize, &str)> = text
                .match_indices(|c: char| c.is_alphanumeric() || c == '_')
                .collect();
            if let Some(&(at, _)) = words.get(i % words.len().max(1)) {
                let end = text[at..]
                    .find(|c: char| !(c.is_alphanumeric() || c == '_'))
                    .map_or(text.len(), |e| at + e);
                return format!("{}{}{}", &text[..at], w, &text[end..]);
            }
        }
        Mutation::InsertText(i, w) => {
            let mut at = i % text.len().max(1);
            while !text.is_char_boundary(at) {
                at -= 1;
            }
            return format!("{}{}{}", &text[..at], w, &text[at..]);
        }
    }
    lines.join("\n") + "\n"
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn mutated_forwards_never_panic_and_emit_only_valid_code(
        which in any::<usize>(),
        mutations in prop::collection::vec(mutation(), 1..4),
    ) {
        let all = fixtures();
        let mut text = all[which % all.len()].clone();
        for m in &mutations {
            text = apply(&text, m);
        }
        let input_parses = ruff_python_parser::parse_module(&text).is_ok();
        match rewrite_forward(&text, &RewriteOptions::default()) {
            Ok(rewrite) => {
                prop_assert!(input_parses);
                let emitted = ruff_python_parser::parse_module(&rewrite.source);
                prop_assert!(emitted.is_ok(), "emitted code does not parse:\n{}", rewrite.source);
                let is_one_function = emitted.is_ok_and(|m| {
                    matches!(m.syntax().body.as_slice(), [ruff_python_ast::Stmt::FunctionDef(_)])
                });
                prop_assert!(is_one_function, "emitted code is not one function:\n{}", rewrite.source);
                // The fused path computes the loss itself, or (an encoder-decoder wrapper) hands it to a sub-model.
                let fused_call = if rewrite.loss_form == LossForm::Delegated {
                    "__logitless__.delegable("
                } else {
                    "__logitless__.hf_loss("
                };
                prop_assert!(rewrite.source.contains(fused_call), "no `{}` in:\n{}", fused_call, rewrite.source);
            }
            Err(refusal) => {
                prop_assert_ne!(refusal.code, ReasonCode::ReparseFailed, "emitter produced unparsable code for:\n{}", text);
                if !input_parses {
                    prop_assert_eq!(refusal.code, ReasonCode::ParseError);
                }
            }
        }
    }
}
