//! The reference in docs/operations.md keeps up with the code: every configuration key of
//! config/default.toml is in its table with its default, and every metric the sidecar defines
//! is in the metrics table.

/// A file of the repository, as text.
fn read(path: &str) -> String {
    std::fs::read_to_string(format!("{}/{path}", env!("CARGO_MANIFEST_DIR")))
        .unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// The table row of `docs/operations.md` that starts with `` | `name` ``, if any.
fn row<'a>(doc: &'a str, name: &str) -> Option<&'a str> {
    let start = format!("| `{name}` ");
    doc.lines().find(|l| l.starts_with(&start))
}

#[test]
fn every_configuration_key_is_documented_with_its_default() {
    let doc = read("docs/operations.md");
    let mut section = String::new();
    let mut missing = Vec::new();
    for line in pgsidecar::config::DEFAULT_TOML.lines() {
        let line = line.trim();
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = name.to_string();
            continue;
        }
        let Some((key, value)) = line.split_once(" = ") else {
            continue;
        };
        if line.starts_with('#') {
            continue;
        }
        let name = format!("{section}.{key}");
        match row(&doc, &name) {
            None => missing.push(format!("{name} (no row)")),
            // Numbers and booleans exactly as in the file; strings and lists are described.
            Some(r)
                if (value.parse::<f64>().is_ok() || value == "true" || value == "false")
                    && !r.contains(&format!("`{value}`")) =>
            {
                missing.push(format!("{name} (default {value} not in {r:?})"))
            }
            Some(_) => {}
        }
    }
    assert!(
        missing.is_empty(),
        "docs/operations.md is behind config/default.toml: {missing:#?}"
    );
}

#[test]
fn every_metric_is_documented() {
    let doc = read("docs/operations.md");
    let names: Vec<String> = read("src/metrics.rs")
        .lines()
        .filter_map(|l| l.trim().strip_prefix("pub const "))
        .filter_map(|l| l.split_once(": &str = \"").map(|(_, rest)| rest))
        .filter_map(|rest| rest.split('"').next().map(str::to_string))
        .collect();
    assert!(names.len() > 20, "found only {names:?}");
    let missing: Vec<_> = names
        .iter()
        .filter(|n| !doc.contains(&format!("`{n}`")))
        .collect();
    assert!(
        missing.is_empty(),
        "metrics missing from docs/operations.md: {missing:?}"
    );
}
