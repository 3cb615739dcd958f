//! Dependencies point one way: each module of `src/` sits on a layer, and
//! may use (`crate::...`, outside comments and tests) only modules on lower
//! layers. A new module must be given a layer here; an upward import (a
//! child reaching its composition root for shared state, an error type
//! importing the module it describes) fails this test.

use std::collections::BTreeMap;
use std::path::Path;

/// Lower layers first. Within a layer, modules do not use each other.
const LAYERS: &[&[&str]] = &[
    // Foundations: no crate imports at all.
    &["error", "metrics", "sys"],
    // The vocabulary: configuration keys and the PostgreSQL wire.
    &["config", "wire"],
    // Pure decisions, and TLS.
    &["policy", "tls"],
    &["backend", "fleet"],
    // The reloadable state built from config.
    &["runtime"],
    // One connection's pipeline.
    &["conn"],
    // The running proxy.
    &["app"],
    &["cli"],
];

fn layer_of(module: &str) -> Option<usize> {
    LAYERS.iter().position(|l| l.contains(&module))
}

/// `src/backend/login.rs` -> `backend`; `src/runtime.rs` -> `runtime`.
fn module_of(src: &Path, file: &Path) -> String {
    let rel = file.strip_prefix(src).expect("under src");
    let first = rel.components().next().expect("a component");
    first
        .as_os_str()
        .to_string_lossy()
        .trim_end_matches(".rs")
        .to_string()
}

fn rust_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read src") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

#[test]
fn imports_point_down() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let uses = regex::Regex::new(r"crate::([a-z_]+)").expect("regex");
    let mut edges: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for file in &files {
        let module = module_of(&src, file);
        // `tests.rs` files are unit tests (declared `#[cfg(test)] mod tests;`).
        let is_tests = file.file_name().is_some_and(|n| n == "tests.rs");
        if module == "main" || module == "lib" || is_tests {
            continue;
        }
        let text = std::fs::read_to_string(file).expect("read");
        let code = text.split("#[cfg(test)]").next().unwrap_or_default();
        for line in code.lines().filter(|l| !l.trim_start().starts_with("//")) {
            for used in uses.captures_iter(line) {
                let used = used[1].to_string();
                if used != module {
                    edges.entry(module.clone()).or_default().push(used);
                }
            }
        }
        assert!(
            layer_of(&module).is_some(),
            "src module `{module}` has no layer: add it to LAYERS in {}",
            file!()
        );
    }
    let mut upward = Vec::new();
    for (from, tos) in &edges {
        let from_layer = layer_of(from).expect("checked");
        for to in tos {
            match layer_of(to) {
                Some(l) if l < from_layer => {}
                _ => upward.push(format!("{from} -> {to}")),
            }
        }
    }
    upward.sort();
    upward.dedup();
    assert!(
        upward.is_empty(),
        "imports that do not point down: {upward:?}"
    );
}
