//! The module structure (docs/ARCHITECTURE.md): imports point down the layers, and no files import each other
//! in a loop. Read from the sources' `crate::` and `super::` paths (comments and `#[cfg(test)]` modules aside).
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Top-level modules by layer, lowest first. A module may import its own layer and the ones below.
const LAYERS: &[&[&str]] = &[
    &["fsutil", "out", "manifest"],
    &["quant", "weights", "onnx", "samplers", "cuda"],
    &["models", "backend", "trt", "tokenizer"],
    &["pipelines", "server"],
    &["cli"],
    &["commands"],
];

fn layer(top: &str) -> Option<usize> {
    LAYERS.iter().position(|l| l.contains(&top))
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// `src/models/flux/mod.rs` -> ["models", "flux"]; `src/lib.rs` -> [].
fn module_of(src: &Path, file: &Path) -> Vec<String> {
    let rel = file.strip_prefix(src).unwrap().with_extension("");
    let mut parts: Vec<String> = rel
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    if matches!(
        parts.last().map(String::as_str),
        Some("mod" | "lib" | "main")
    ) {
        parts.pop();
    }
    parts
}

/// The code of a file without comments and without its `#[cfg(test)]` items.
fn code(text: &str) -> String {
    let body = text.split("#[cfg(test)]").next().unwrap_or("");
    body.lines()
        .map(|l| l.split("//").next().unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Every module path a file names with `crate::` or `super::` (as written, longest identifier chain).
fn referenced_paths(module: &[String], is_mod_file: bool, code: &str) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    let bytes = code.as_bytes();
    for (start, prefix) in [("crate::", 0usize), ("super::", 1)] {
        let mut from = 0;
        while let Some(i) = code[from..].find(start) {
            let at = from + i;
            from = at + start.len();
            if at > 0 && (bytes[at - 1].is_ascii_alphanumeric() || bytes[at - 1] == b'_') {
                continue;
            }
            let mut base: Vec<String> = if prefix == 0 {
                Vec::new()
            } else {
                // `super` of a mod.rs is its parent folder's parent.
                let mut m = module.to_vec();
                if !is_mod_file || !m.is_empty() {
                    m.pop();
                }
                m
            };
            let chain: String = code[from..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == ':')
                .collect();
            for seg in chain.split("::").filter(|s| !s.is_empty()) {
                if seg == "super" {
                    base.pop();
                } else {
                    base.push(seg.to_string());
                }
            }
            out.push(base);
        }
    }
    out
}

#[test]
fn imports_follow_the_layers_without_cycles() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let modules: BTreeMap<Vec<String>, PathBuf> = files
        .iter()
        .map(|f| (module_of(&src, f), f.clone()))
        .collect();
    let mut edges: BTreeMap<Vec<String>, BTreeSet<Vec<String>>> = BTreeMap::new();
    let mut violations = Vec::new();
    for (module, file) in &modules {
        let Some(top) = module.first() else { continue };
        if top == "main" {
            continue;
        }
        let Some(from_layer) = layer(top) else {
            violations.push(format!(
                "src/{top}: a top-level module missing from LAYERS in tests/architecture.rs (add it to its layer \
                 and to docs/ARCHITECTURE.md)"
            ));
            continue;
        };
        let is_mod = file.file_name().is_some_and(|n| n == "mod.rs");
        let text = std::fs::read_to_string(file).unwrap();
        for path in referenced_paths(module, is_mod, &code(&text)) {
            // The longest prefix that is a module file.
            let Some(target) = (1..=path.len())
                .rev()
                .map(|n| path[..n].to_vec())
                .find(|p| modules.contains_key(p))
            else {
                continue;
            };
            if target == *module || module.starts_with(&target) {
                continue;
            }
            let to_top = &target[0];
            let Some(to_layer) = layer(to_top) else {
                continue;
            };
            if to_layer > from_layer {
                violations.push(format!(
                    "{} imports crate::{} from a higher layer ({top} is in layer {from_layer}, {to_top} in layer \
                     {to_layer}): move the shared code down, or the caller up",
                    file.strip_prefix(&src).unwrap().display(),
                    target.join("::")
                ));
            }
            edges.entry(module.clone()).or_default().insert(target);
        }
    }
    assert!(violations.is_empty(), "{}", violations.join("\n"));

    // No loops between files, nor between top-level modules.
    let tops: BTreeMap<String, BTreeSet<String>> =
        edges.iter().fold(BTreeMap::new(), |mut m, (from, to)| {
            for t in to {
                if t[0] != from[0] {
                    m.entry(from[0].clone())
                        .or_insert_with(BTreeSet::new)
                        .insert(t[0].clone());
                }
            }
            m
        });
    let cycles = find_cycle(&edges)
        .map(|c| {
            c.iter()
                .map(|m| m.join("::"))
                .collect::<Vec<_>>()
                .join(" -> ")
        })
        .into_iter()
        .chain(find_cycle(&tops).map(|c| c.join(" -> ")));
    let cycles: Vec<String> = cycles.collect();
    assert!(cycles.is_empty(), "import cycles:\n{}", cycles.join("\n"));
}

/// One cycle of a directed graph, if there is one (depth-first search with colours).
fn find_cycle<N: Ord + Clone>(g: &BTreeMap<N, BTreeSet<N>>) -> Option<Vec<N>> {
    fn visit<N: Ord + Clone>(
        n: &N,
        g: &BTreeMap<N, BTreeSet<N>>,
        state: &mut BTreeMap<N, u8>,
        stack: &mut Vec<N>,
    ) -> Option<Vec<N>> {
        state.insert(n.clone(), 1);
        stack.push(n.clone());
        for m in g.get(n).into_iter().flatten() {
            match state.get(m).copied().unwrap_or(0) {
                1 => {
                    let i = stack.iter().position(|x| x == m).unwrap();
                    let mut c = stack[i..].to_vec();
                    c.push(m.clone());
                    return Some(c);
                }
                0 => {
                    if let Some(c) = visit(m, g, state, stack) {
                        return Some(c);
                    }
                }
                _ => {}
            }
        }
        stack.pop();
        state.insert(n.clone(), 2);
        None
    }
    let mut state = BTreeMap::new();
    for n in g.keys() {
        if state.get(n).copied().unwrap_or(0) == 0 {
            let mut stack = Vec::new();
            if let Some(c) = visit(n, g, &mut state, &mut stack) {
                return Some(c);
            }
        }
    }
    None
}

#[test]
fn cli_holds_definitions_only() {
    let cli = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/src/cli.rs")).unwrap();
    let lines = cli.lines().count();
    assert!(
        lines < 400,
        "src/cli.rs has {lines} lines; keep it to clap definitions"
    );
    assert!(
        !cli.contains("fn "),
        "src/cli.rs defines functions; command code belongs in src/commands/"
    );
}
