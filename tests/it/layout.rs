//! The layering of `src/` (the map at the top of `src/lib.rs`): every `crate::` path in a module
//! names a module of its own layer or one below, and modules of one layer form no circle.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Bottom to top. A module is named by its first path segment, or by two where a folder holds a
/// part that sits lower than the rest (`cubes::models` is plain numerics the engine's functions
/// wrap).
const LAYERS: &[&[&str]] = &[
    &["error", "sql", "storage", "cubes::models"],
    &["config"],
    &["plan"],
    &["engine"],
    &["sources", "identity", "warehouse", "cubes"],
    &["run"],
    &["cli", "serve", "extract", "schedule", "generate"],
];

/// The YAML spec modules: what the user wrote stops at `plan`, which turns it into typed,
/// validated values; the layers between `plan` and the faces never see it.
const SPEC_MODULES: &[&str] = &["config::pipeline", "config::project"];

/// An import of one module by another, with the path named and where it is written.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Import {
    from: String,
    to: String,
    path: String,
    at: String,
}

/// The module a path (`cubes::models::bgnbd`) belongs to in [`LAYERS`].
fn module_of(path: &[&str]) -> Option<&'static str> {
    let two = path.get(..2).map(|p| p.join("::"));
    LAYERS
        .iter()
        .flat_map(|l| l.iter())
        .find(|m| Some(m.to_string()) == two)
        .or_else(|| {
            LAYERS
                .iter()
                .flat_map(|l| l.iter())
                .find(|m| **m == path[0])
        })
        .copied()
}

fn layer(module: &str) -> usize {
    LAYERS
        .iter()
        .position(|l| l.contains(&module))
        .expect("a module of LAYERS")
}

/// The module paths `crate::...` reaches in one line of code: `crate::a::b`, and each item of
/// `crate::{a::b, c}` (nested groups included).
fn paths_in(line: &str) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    let mut rest = line;
    while let Some(i) = rest.find("crate::") {
        let before = rest[..i].chars().last();
        rest = &rest[i + "crate::".len()..];
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
            continue; // e.g. `kbcrate::`
        }
        if let Some(group) = rest.strip_prefix('{') {
            let mut depth = 1;
            let end = group
                .char_indices()
                .find(|(_, c)| {
                    match c {
                        '{' => depth += 1,
                        '}' => depth -= 1,
                        _ => {}
                    }
                    depth == 0
                })
                .map_or(group.len(), |(j, _)| j);
            let mut item_depth = 0;
            let mut item = String::new();
            for c in group[..end].chars().chain([',']) {
                match c {
                    '{' => item_depth += 1,
                    '}' => item_depth -= 1,
                    ',' if item_depth == 0 => {
                        let path = segments(&item);
                        if !path.is_empty() && path[0] != "self" {
                            out.push(path);
                        }
                        item.clear();
                        continue;
                    }
                    _ => {}
                }
                item.push(c);
            }
        } else {
            let path = segments(rest);
            if !path.is_empty() {
                out.push(path);
            }
        }
    }
    out
}

/// The leading `a::b::c` of `text`.
fn segments(text: &str) -> Vec<String> {
    let mut path = Vec::new();
    let mut rest = text.trim_start();
    loop {
        let end = rest
            .find(|c: char| !(c.is_alphanumeric() || c == '_'))
            .unwrap_or(rest.len());
        if end == 0 {
            break;
        }
        path.push(rest[..end].to_string());
        match rest[end..].strip_prefix("::") {
            Some(r) => rest = r,
            None => break,
        }
    }
    path
}

/// The Rust files below `src`, sorted.
fn rust_files(src: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let mut dirs = vec![src.to_path_buf()];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                dirs.push(p);
            } else if p.extension().is_some_and(|x| x == "rs") {
                files.push(p);
            }
        }
    }
    files.sort();
    files
}

/// Every import between modules in the Rust files of `src`, with the files no layer holds.
fn imports(src: &Path) -> (Vec<Import>, Vec<String>) {
    let files = rust_files(src);
    let mut out = Vec::new();
    let mut unplaced = Vec::new();
    for file in files {
        let rel: PathBuf = file.strip_prefix(src).unwrap().with_extension("");
        let own: Vec<String> = rel
            .iter()
            .map(|s| s.to_string_lossy().into_owned())
            .filter(|s| s != "mod")
            .collect();
        if own == ["lib"] || own == ["main"] {
            continue;
        }
        let own_refs: Vec<&str> = own.iter().map(String::as_str).collect();
        let Some(from) = module_of(&own_refs) else {
            unplaced.push(rel.display().to_string());
            continue;
        };
        let text = std::fs::read_to_string(&file).unwrap();
        for (n, line) in text.lines().enumerate() {
            if line.trim_start().starts_with("//") {
                continue;
            }
            for path in paths_in(line) {
                let refs: Vec<&str> = path.iter().map(String::as_str).collect();
                if let Some(to) = module_of(&refs)
                    && to != from
                {
                    out.push(Import {
                        from: from.to_string(),
                        to: to.to_string(),
                        path: path.join("::"),
                        at: format!(
                            "src/{}:{}",
                            file.strip_prefix(src).unwrap().display(),
                            n + 1
                        ),
                    });
                }
            }
        }
    }
    (out, unplaced)
}

/// What breaks the layering: imports of a higher layer, and circles within one.
fn violations(imports: &[Import]) -> Vec<String> {
    let mut out: Vec<String> = imports
        .iter()
        .filter(|i| layer(&i.to) > layer(&i.from))
        .map(|i| format!("{}: {} imports {}, a layer above it", i.at, i.from, i.to))
        .collect();
    let (plan, faces) = (layer("plan"), LAYERS.len() - 1);
    out.extend(
        imports
            .iter()
            .filter(|i| (plan + 1..faces).contains(&layer(&i.from)))
            .filter(|i| SPEC_MODULES.iter().any(|m| i.path.starts_with(m)))
            .map(|i| {
                format!(
                    "{}: {} reads the YAML spec ({}); take the typed value from plan",
                    i.at, i.from, i.path
                )
            }),
    );
    let mut edges: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    for i in imports.iter().filter(|i| layer(&i.to) == layer(&i.from)) {
        edges
            .entry(i.from.as_str())
            .or_default()
            .insert(i.to.as_str());
    }
    // A circle: a module that reaches itself.
    for &start in edges.keys() {
        let mut seen = BTreeSet::new();
        let mut todo: Vec<&str> = edges[start].iter().copied().collect();
        while let Some(m) = todo.pop() {
            if m == start {
                let via: Vec<&Import> = imports
                    .iter()
                    .filter(|i| i.from == start && edges[start].contains(i.to.as_str()))
                    .collect();
                out.push(format!(
                    "{start} imports itself through a circle of its layer (it imports {})",
                    via.iter()
                        .map(|i| format!("{} at {}", i.to, i.at))
                        .collect::<Vec<_>>()
                        .join(", ")
                ));
                break;
            }
            if seen.insert(m) {
                todo.extend(edges.get(m).into_iter().flatten().copied());
            }
        }
    }
    out
}

#[test]
fn no_module_imports_one_above_it_or_in_a_circle() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let (imports, unplaced) = imports(&src);
    assert!(
        unplaced.is_empty(),
        "files of modules no layer holds (add them to LAYERS here and to the map in src/lib.rs): {unplaced:?}"
    );
    assert!(
        imports.len() > 100,
        "the scan found only {} imports",
        imports.len()
    );
    let bad = violations(&imports);
    assert!(
        bad.is_empty(),
        "the layering is broken:\n{}",
        bad.join("\n")
    );
}

#[test]
fn the_layering_check_finds_upward_imports_and_circles() {
    let paths = paths_in("use crate::{config::{self, x}, engine::udf::{A, B}, self};");
    assert_eq!(
        paths,
        vec![
            vec!["config".to_string()],
            vec!["engine".into(), "udf".into()]
        ]
    );
    assert_eq!(
        paths_in("let x = crate::cubes::models::bgnbd::fit(y);")[0][1],
        "models"
    );
    let import = |from: &str, to: &str| Import {
        from: from.into(),
        to: to.into(),
        path: to.into(),
        at: format!("src/{from}.rs:1"),
    };
    assert_eq!(
        violations(&[import("plan", "serve")]),
        ["src/plan.rs:1: plan imports serve, a layer above it"]
    );
    let circle = violations(&[
        import("sources", "warehouse"),
        import("warehouse", "sources"),
    ]);
    assert_eq!(circle.len(), 2, "{circle:?}");
    assert!(violations(&[import("warehouse", "engine"), import("run", "warehouse")]).is_empty());
    let spec = |from: &str| Import {
        path: "config::pipeline::WriteMode".into(),
        ..import(from, "config")
    };
    assert_eq!(
        violations(&[spec("warehouse"), spec("plan"), spec("cli")]),
        [
            "src/warehouse.rs:1: warehouse reads the YAML spec (config::pipeline::WriteMode); \
             take the typed value from plan"
        ]
    );
    assert_eq!(
        module_of(&["cubes", "models", "bgnbd"]),
        Some("cubes::models")
    );
    assert_eq!(module_of(&["cubes", "evaluate"]), Some("cubes"));
}

/// Rooms a person can hold in their head: a source file grows past this only by splitting it.
const MAX_FILE_LINES: usize = 820;

#[test]
fn no_source_file_is_longer_than_a_room() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut long = Vec::new();
    for p in rust_files(&src) {
        let lines = std::fs::read_to_string(&p).unwrap().lines().count();
        if lines > MAX_FILE_LINES {
            long.push(format!(
                "{} ({lines} lines)",
                p.strip_prefix(&src).unwrap().display()
            ));
        }
    }
    assert!(
        long.is_empty(),
        "files over {MAX_FILE_LINES} lines; split them into child modules: {long:?}"
    );
}

/// A function grows past this many lines only with its reason written right above it, on a
/// comment line starting `// Long because:`.
const MAX_FN_LINES: usize = 120;
const LONG_BECAUSE: &str = "// Long because:";

/// The functions of one file's text longer than [`MAX_FN_LINES`] with no reason above them:
/// (name, first line, length). A function ends at the first `}` line of its own indentation.
fn long_functions(text: &str) -> Vec<(String, usize, usize)> {
    let lines: Vec<&str> = text.lines().collect();
    let mut out = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let code = line.trim_start();
        let indent = &line[..line.len() - code.len()];
        let code = ["pub ", "pub(crate) ", "pub(super) "]
            .iter()
            .find_map(|v| code.strip_prefix(v))
            .unwrap_or(code);
        let code = code.strip_prefix("async ").unwrap_or(code);
        let Some(name) = code.strip_prefix("fn ") else {
            continue;
        };
        let name: String = name
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect();
        let close = format!("{indent}}}");
        let Some(end) = lines[i + 1..].iter().position(|l| *l == close) else {
            continue; // a declaration without a body
        };
        let length = end + 2;
        // The reason sits above the doc comments and attributes.
        let above = lines[..i]
            .iter()
            .rev()
            .map(|l| l.trim_start())
            .find(|l| !l.starts_with("///") && !l.starts_with("#["));
        if length > MAX_FN_LINES && !above.is_some_and(|l| l.starts_with(LONG_BECAUSE)) {
            out.push((name, i + 1, length));
        }
    }
    out
}

#[test]
fn no_function_is_longer_than_a_page_without_a_reason() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut long = Vec::new();
    for p in rust_files(&src) {
        let text = std::fs::read_to_string(&p).unwrap();
        for (name, line, length) in long_functions(&text) {
            let file = p.strip_prefix(&src).unwrap().display();
            long.push(format!("src/{file}:{line} {name} ({length} lines)"));
        }
    }
    assert!(
        long.is_empty(),
        "functions over {MAX_FN_LINES} lines; split them, or write `{LONG_BECAUSE} ...` right \
         above one that must stay whole:\n{}",
        long.join("\n")
    );
}

#[test]
fn the_function_length_check_counts_lines_and_reads_reasons() {
    let body = "    x();\n".repeat(MAX_FN_LINES);
    let long = format!("/// Doc.\npub async fn f() {{\n{body}}}\n");
    assert_eq!(
        long_functions(&long),
        [("f".to_string(), 2, MAX_FN_LINES + 2)]
    );
    let reasoned = format!("{LONG_BECAUSE} one table.\n#[inline]\n{long}");
    assert!(long_functions(&reasoned).is_empty());
    let short = format!(
        "impl A {{\n    fn g(&self) {{\n{}    }}\n}}\n",
        "x();\n".repeat(10)
    );
    assert!(long_functions(&short).is_empty());
    let body = "        x();\n".repeat(MAX_FN_LINES);
    let method = format!("impl A {{\n    pub(super) fn h() {{\n{body}    }}\n}}\n");
    assert_eq!(long_functions(&method)[0].0, "h");
}
