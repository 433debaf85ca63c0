//! Epilogue-module forwards (tests/module_fixtures/*.py): each file's first line states the expected outcome by
//! hand (`# expect: understood kind=value ...` or `# expect: refused <code>`); the full result is an insta
//! snapshot under tests/snapshots/.

use logitless_rewrite::{ModuleValue, analyse_epilogue_module};

mod common;

fn value_text(value: &ModuleValue) -> String {
    match value {
        ModuleValue::Attribute(path) => format!("self.{}", path.join(".")),
        ModuleValue::Number(n) => format!("{n:?}"),
    }
}

#[test]
fn module_fixtures_match_expectations_and_snapshots() {
    let mut failures = Vec::new();
    for common::Fixture { name, text, expect } in common::fixtures("module_fixtures", 14) {
        let (got, snapshot) = match analyse_epilogue_module(&text) {
            Ok(steps) => {
                let described: Vec<String> = steps
                    .iter()
                    .map(|s| format!("{}={}", s.kind.as_str(), value_text(&s.value)))
                    .collect();
                let got = ["understood".to_string()]
                    .into_iter()
                    .chain(described.iter().cloned())
                    .collect::<Vec<_>>()
                    .join(" ");
                (got, format!("{steps:#?}\n"))
            }
            Err(refusal) => (format!("refused {}", refusal.code), format!("{refusal}\n")),
        };
        // Numbers are written by hand as in the source (`30`), and rendered by Rust (`30.0`).
        let normalise = |s: &str| s.replace(".0 ", " ").trim_end_matches(".0").to_string();
        if normalise(&got) != normalise(&expect) {
            failures.push(format!(
                "{name}: expected `{expect}`, got `{got}`: {snapshot}"
            ));
        }
        insta::assert_snapshot!(name, snapshot);
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
