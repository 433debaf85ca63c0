//! Shared by the fixture tests: reading `*.py` fixtures whose first line states the expected outcome.

use std::path::Path;

/// A fixture: its file stem, its text, and the outcome its first line (`# expect: ...`) states by hand.
pub struct Fixture {
    pub name: String,
    pub text: String,
    pub expect: String,
}

/// Every `*.py` under `tests/<dir>`, sorted by name; panics if there are fewer than `at_least`.
pub fn fixtures(dir: &str, at_least: usize) -> Vec<Fixture> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join(dir);
    let mut paths: Vec<_> = std::fs::read_dir(&dir)
        .expect("fixtures dir")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "py"))
        .collect();
    paths.sort();
    assert!(paths.len() >= at_least, "fixtures missing: {}", paths.len());
    paths
        .into_iter()
        .map(|path| {
            let name = path
                .file_stem()
                .and_then(|s| s.to_str())
                .expect("name")
                .to_string();
            let text = std::fs::read_to_string(&path).expect("read fixture");
            let expect = text
                .lines()
                .next()
                .and_then(|l| l.strip_prefix("# expect: "))
                .expect("expect line")
                .trim()
                .to_string();
            Fixture { name, text, expect }
        })
        .collect()
}
