//! The module graph stays one-way. Reads every `crate::…` path in `src/` (plain, in `use`
//! lists and inline), maps each file to its top-level module, and fails on any cycle between
//! top-level modules, and on any module other than the outermost ones depending on `metrics`
//! (metrics observes everything; nothing waits on it). Pure text: no build of the modules
//! under test is needed to know the answer, so a cycle fails fast and names its members.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Modules allowed to depend on `metrics`: the process entry points that wire it in.
const METRICS_USERS: &[&str] = &["service", "main"];

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let entries = std::fs::read_dir(dir).unwrap_or_else(|e| panic!("read {dir:?}: {e}"));
    for entry in entries {
        let path = entry.expect("directory entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// `src/store/read.rs` → `store`; `src/export.rs` → `export`; `lib.rs` → `lib`.
fn top_module(src: &Path, file: &Path) -> String {
    let rel = file.strip_prefix(src).expect("file under src");
    let first = rel.components().next().expect("non-empty path");
    let name = first.as_os_str().to_string_lossy();
    name.trim_end_matches(".rs").to_string()
}

/// Removes `//` comments (doc comments too: they may mention paths without depending on them)
/// and string literals' contents are kept: a `crate::` inside a string is rare enough.
fn code_only(text: &str) -> String {
    text.lines()
        .map(|l| match l.find("//") {
            Some(i) => &l[..i],
            None => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Every top-level module named by a `crate::` path in `code`, including each member of a
/// `crate::{a::…, b}` group.
fn referenced(code: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let bytes = code.as_bytes();
    let mut at = 0;
    while let Some(found) = code[at..].find("crate::") {
        let start = at + found;
        at = start + "crate::".len();
        // `nbd_s3_crate::` or `mycrate::` are other names, not this crate.
        if start > 0 && (bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_') {
            continue;
        }
        if bytes.get(at) == Some(&b'{') {
            group_members(&code[at + 1..], &mut out);
        } else {
            out.insert(ident(&code[at..]));
        }
    }
    out.remove("");
    out
}

/// The first identifier of `s`.
fn ident(s: &str) -> String {
    s.chars()
        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
        .collect()
}

/// The leading identifier of each comma-separated member at depth 1 of a `{…}` group.
fn group_members(s: &str, out: &mut BTreeSet<String>) {
    let mut depth = 1usize;
    let mut expecting = true;
    let mut i = 0;
    let chars: Vec<char> = s.chars().collect();
    while i < chars.len() && depth > 0 {
        let c = chars[i];
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            ',' if depth == 1 => expecting = true,
            c if expecting && depth == 1 && (c.is_ascii_alphabetic() || c == '_') => {
                let rest: String = chars[i..].iter().collect();
                let name = ident(&rest);
                i += name.chars().count();
                out.insert(name);
                expecting = false;
                continue;
            }
            _ => {}
        }
        i += 1;
    }
}

fn module_graph() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in files {
        let module = top_module(&src, &file);
        let text = std::fs::read_to_string(&file).unwrap_or_else(|e| panic!("{file:?}: {e}"));
        let deps = graph.entry(module.clone()).or_default();
        for dep in referenced(&code_only(&text)) {
            if dep != module && dep != "self" && dep != "super" {
                deps.insert(dep);
            }
        }
    }
    graph
}

/// Strongly connected components with more than one member (Tarjan).
fn cycles(graph: &BTreeMap<String, BTreeSet<String>>) -> Vec<Vec<String>> {
    struct State<'a> {
        graph: &'a BTreeMap<String, BTreeSet<String>>,
        index: BTreeMap<&'a str, usize>,
        low: BTreeMap<&'a str, usize>,
        stack: Vec<&'a str>,
        on_stack: BTreeSet<&'a str>,
        next: usize,
        found: Vec<Vec<String>>,
    }
    fn visit<'a>(s: &mut State<'a>, v: &'a str) {
        s.index.insert(v, s.next);
        s.low.insert(v, s.next);
        s.next += 1;
        s.stack.push(v);
        s.on_stack.insert(v);
        let graph = s.graph;
        for w in graph.get(v).into_iter().flatten() {
            let w = w.as_str();
            if !graph.contains_key(w) {
                continue;
            }
            if !s.index.contains_key(w) {
                visit(s, w);
                let lw = s.low[w];
                let lv = s.low[v];
                s.low.insert(v, lv.min(lw));
            } else if s.on_stack.contains(w) {
                let iw = s.index[w];
                let lv = s.low[v];
                s.low.insert(v, lv.min(iw));
            }
        }
        if s.low[v] == s.index[v] {
            let mut component = Vec::new();
            while let Some(w) = s.stack.pop() {
                s.on_stack.remove(w);
                component.push(w.to_string());
                if w == v {
                    break;
                }
            }
            if component.len() > 1 {
                component.sort();
                s.found.push(component);
            }
        }
    }
    let mut s = State {
        graph,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        next: 0,
        found: Vec::new(),
    };
    for v in graph.keys() {
        if !s.index.contains_key(v.as_str()) {
            visit(&mut s, v);
        }
    }
    s.found
}

fn show(graph: &BTreeMap<String, BTreeSet<String>>) -> String {
    graph
        .iter()
        .map(|(m, deps)| {
            let deps: Vec<&str> = deps.iter().map(String::as_str).collect();
            format!("  {m} -> {}", deps.join(", "))
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn top_level_modules_form_no_cycle() {
    let graph = module_graph();
    assert!(graph.len() > 5, "found too few modules: {graph:?}");
    let found = cycles(&graph);
    assert!(
        found.is_empty(),
        "module cycles: {found:?}\nmodule graph:\n{}",
        show(&graph)
    );
}

/// One unit-test layout: a module's tests are its child module `tests`, inline at the end of
/// the file or in `<module>/tests.rs` (`<module>/tests/` when split), found by the usual module
/// rules. No `foo_tests.rs` siblings, no `#[path]` into `src/` (the one shared fixture, the
/// TLS test certificates, lives in `tests/common` and is the only allowed `#[path]`).
#[test]
fn unit_tests_follow_one_layout() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut odd = Vec::new();
    for file in &files {
        let name = file.file_name().map(|n| n.to_string_lossy().into_owned());
        if name.as_deref().is_some_and(|n| n.ends_with("_tests.rs")) {
            odd.push(format!(
                "{}: tests belong in <module>/tests.rs",
                file.display()
            ));
        }
        let text = std::fs::read_to_string(file).unwrap_or_else(|e| panic!("read {file:?}: {e}"));
        for line in text
            .lines()
            .filter(|l| l.trim_start().starts_with("#[path"))
        {
            if !line.contains("tests/common/") {
                odd.push(format!("{}: {}", file.display(), line.trim()));
            }
        }
    }
    assert!(files.len() > 20, "found too few files under {src:?}");
    assert!(
        odd.is_empty(),
        "unit tests outside the layout:\n{}",
        odd.join("\n")
    );
}

#[test]
fn nothing_but_the_entry_points_depends_on_metrics() {
    let graph = module_graph();
    let users: Vec<&String> = graph
        .iter()
        .filter(|(m, deps)| deps.contains("metrics") && !METRICS_USERS.contains(&m.as_str()))
        .map(|(m, _)| m)
        .collect();
    assert!(
        users.is_empty(),
        "modules depending on metrics: {users:?}\nmodule graph:\n{}",
        show(&graph)
    );
}

#[test]
fn the_reader_sees_grouped_and_inline_paths() {
    let code =
        "use crate::{backend::{A, B}, config};\nlet x = crate::store::f(); use crate::proto;";
    let found = referenced(code);
    let want: BTreeSet<String> = ["backend", "config", "store", "proto"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    assert_eq!(found, want);
    let mut g = BTreeMap::new();
    g.insert("a".to_string(), BTreeSet::from(["b".to_string()]));
    g.insert("b".to_string(), BTreeSet::from(["a".to_string()]));
    assert_eq!(cycles(&g), vec![vec!["a".to_string(), "b".to_string()]]);
}
