//! The layering of `src/` (see docs/ARCHITECTURE.md): every `crate::` path in a top-level
//! module points to a module below it, so there is no import cycle between top-level modules,
//! and the core, routing, store and model never reach a server or the app.
//!
//! Read from the source text: every `crate::x` path and every item of a `use crate::{…}` group,
//! comments left out.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
};

/// Top to bottom; a module may use only modules after it in this list.
const LAYERS: &[&str] = &[
    "client", "app", "servers", "ops", "core", "config", "routing", "store", "metrics", "model",
];

fn files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("src/ is readable") {
        let path = entry.expect("a directory entry").path();
        if path.is_dir() {
            files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The top-level module a file belongs to (`None` for the crate root and the binary).
fn module_of(src: &Path, file: &Path) -> Option<String> {
    let rel = file.strip_prefix(src).ok()?;
    let first = rel.components().next()?.as_os_str().to_str()?.to_owned();
    match first.as_str() {
        "lib.rs" | "main.rs" => None,
        f => Some(f.trim_end_matches(".rs").to_owned()),
    }
}

/// The source without comments (line comments, doc comments, block comments).
fn code(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    let mut in_str = false;
    while let Some(c) = rest.chars().next() {
        if !in_str && rest.starts_with("//") {
            let end = rest.find('\n').unwrap_or(rest.len());
            rest = &rest[end..];
            continue;
        }
        if !in_str && rest.starts_with("/*") {
            let end = rest.find("*/").map_or(rest.len(), |i| i + 2);
            rest = &rest[end..];
            continue;
        }
        if c == '"' && !out.ends_with('\\') && !out.ends_with('\'') {
            in_str = !in_str;
        }
        out.push(c);
        rest = &rest[c.len_utf8()..];
    }
    out
}

/// The top-level modules `text` names through `crate::`.
fn uses(text: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("crate::") {
        let before = rest[..i].chars().last();
        rest = &rest[i + "crate::".len()..];
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == '$') {
            continue;
        }
        if let Some(group) = rest.strip_prefix('{') {
            // A group: the first name of each item at its top level.
            let mut depth = 0;
            let mut item_start = true;
            for (j, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => {
                        rest = &group[j..];
                        break;
                    }
                    '}' => depth -= 1,
                    ',' if depth == 0 => item_start = true,
                    c if item_start && depth == 0 && (c.is_alphabetic() || c == '_') => {
                        let name: String = group[j..]
                            .chars()
                            .take_while(|c| c.is_alphanumeric() || *c == '_')
                            .collect();
                        found.insert(name);
                        item_start = false;
                    }
                    _ => {}
                }
            }
        } else {
            let name: String = rest
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            if !name.is_empty() {
                found.insert(name);
            }
        }
    }
    found
}

fn graph() -> BTreeMap<String, BTreeMap<String, BTreeSet<String>>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut all = Vec::new();
    files(&src, &mut all);
    // module → module it uses → files that use it
    let mut edges: BTreeMap<String, BTreeMap<String, BTreeSet<String>>> = BTreeMap::new();
    for file in all {
        let Some(from) = module_of(&src, &file) else {
            continue;
        };
        let text = std::fs::read_to_string(&file).expect("a source file");
        let rel = file
            .strip_prefix(&src)
            .unwrap_or(&file)
            .display()
            .to_string();
        let entry = edges.entry(from.clone()).or_default();
        for to in uses(&code(&text)) {
            if to != from {
                entry.entry(to).or_default().insert(rel.clone());
            }
        }
    }
    edges
}

#[test]
fn every_top_level_module_has_a_layer() {
    for (module, _) in graph() {
        assert!(
            LAYERS.contains(&module.as_str()),
            "src/{module} is in no layer: add it to LAYERS here and to docs/ARCHITECTURE.md"
        );
    }
}

#[test]
fn imports_only_point_down() {
    let rank = |m: &str| LAYERS.iter().position(|l| *l == m);
    let mut upward = Vec::new();
    for (from, tos) in graph() {
        for (to, files) in tos {
            let (Some(f), Some(t)) = (rank(&from), rank(&to)) else {
                continue;
            };
            if t <= f {
                upward.push(format!("{from} -> {to} (in {files:?})"));
            }
        }
    }
    assert!(
        upward.is_empty(),
        "imports that point up or sideways (a cycle in the making):\n{}",
        upward.join("\n")
    );
}

#[test]
fn no_cycle_between_top_level_modules() {
    // Independent of the layer list: a depth-first search for a back edge.
    let g = graph();
    fn visit(
        g: &BTreeMap<String, BTreeMap<String, BTreeSet<String>>>,
        m: &str,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(i) = path.iter().position(|p| p == m) {
            let mut cycle = path[i..].to_vec();
            cycle.push(m.to_owned());
            return Some(cycle);
        }
        if done.contains(m) {
            return None;
        }
        path.push(m.to_owned());
        for to in g.get(m).into_iter().flat_map(|t| t.keys()) {
            if let Some(c) = visit(g, to, path, done) {
                return Some(c);
            }
        }
        path.pop();
        done.insert(m.to_owned());
        None
    }
    let mut done = BTreeSet::new();
    for m in g.keys() {
        if let Some(cycle) = visit(&g, m, &mut Vec::new(), &mut done) {
            panic!(
                "import cycle between top-level modules: {}",
                cycle.join(" -> ")
            );
        }
    }
}

#[test]
fn the_core_and_below_import_no_server() {
    for (from, tos) in graph() {
        if ["core", "routing", "store", "model", "config", "metrics"].contains(&from.as_str()) {
            for bad in ["servers", "app", "client"] {
                assert!(
                    !tos.contains_key(bad),
                    "src/{from} imports crate::{bad} in {:?}",
                    tos[bad]
                );
            }
        }
    }
}

#[test]
fn the_scanner_reads_paths_and_groups() {
    let text = "use crate::{a::b, c, d::{e, f::g}};\nfn x() { crate::h::i(); }\n// crate::j\n";
    let found = uses(&code(text));
    let want: BTreeSet<String> = ["a", "c", "d", "h"].iter().map(|s| s.to_string()).collect();
    assert_eq!(found, want);
}
