//! Composite-head forwards (tests/head_fixtures/*.py, in the shape of transformers' MLM heads): each file's first
//! line states the expected outcome by hand (`# expect: split <final attribute>` or `# expect: refused <code>`);
//! the full result, including the emitted prefix function, is an insta snapshot under tests/snapshots/.

use logitless_rewrite::split_head_forward;

mod common;

#[test]
fn head_fixtures_match_expectations_and_snapshots() {
    let mut failures = Vec::new();
    for common::Fixture { name, text, expect } in common::fixtures("head_fixtures", 10) {
        let (got, snapshot) = match split_head_forward(&text) {
            Ok(split) => {
                // The prefix must be valid Python that ends by returning the final call's argument.
                if ruff_python_parser::parse_module(&split.prefix_source).is_err() {
                    failures.push(format!("{name}: prefix does not parse"));
                }
                (
                    format!("split {}", split.final_attr),
                    format!(
                        "final: {} (line {})\n---\n{}",
                        split.final_attr, split.line, split.prefix_source
                    ),
                )
            }
            Err(refusal) => (format!("refused {}", refusal.code), format!("{refusal}\n")),
        };
        if got != expect {
            failures.push(format!(
                "{name}: expected `{expect}`, got `{got}`: {snapshot}"
            ));
        }
        insta::assert_snapshot!(name, snapshot);
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn prefix_keeps_the_parameters_and_drops_only_the_final_call() {
    let source = "def forward(self, features, **kwargs):\n    x = self.dense(features)\n    x = gelu(x)\n    x = self.decoder(x)\n    return x\n";
    let split = split_head_forward(source).expect("splits");
    assert_eq!(split.final_attr, "decoder");
    assert_eq!(
        split.prefix_source,
        "def forward(self, features, **kwargs):\n    x = self.dense(features)\n    x = gelu(x)\n    return x\n"
    );
}
