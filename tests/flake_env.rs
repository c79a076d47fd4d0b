//! The environment contract between flake.nix and the code: the nix shells export the variables that build.rs
//! and the code under src/ read, under the same names, and export no TensorRT / ONNX Runtime / CUDA variable
//! that nothing reads. Both sides are found by scanning the sources, so a rename on either side fails here.
//!
//! Code side: string literals passed to `var` / `var_os` (std::env), `from_env` / `try_from_env`
//! (tracing-subscriber), `option_env!`, clap's `env = "..."`, and build.rs's `cargo:rerun-if-env-changed=`
//! list. Flake side: attribute names in UPPER_CASE (`NAME = ...;`, as given to mkShell and buildRustPackage),
//! `export NAME=` in shell code and makeWrapper's `--set`, `--set-default`, `--prefix`, `--suffix`. Variables
//! the flake deliberately leaves alone are listed in flake.nix as `not-exported: NAME (reason)` comments.
use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<_> = fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|e| e == "rs") {
            out.push(p);
        }
    }
}

fn is_env_name(s: &str) -> bool {
    s.chars().next().is_some_and(|c| c.is_ascii_uppercase())
        && s.chars()
            .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
}

/// Variables cargo sets for build scripts and crates: never the flake's business.
fn set_by_cargo(name: &str) -> bool {
    name.starts_with("CARGO_")
        || name.starts_with("DEP_")
        || [
            "OUT_DIR",
            "TARGET",
            "HOST",
            "PROFILE",
            "OPT_LEVEL",
            "DEBUG",
            "NUM_JOBS",
            "RUSTC",
            "RUSTDOC",
        ]
        .contains(&name)
}

/// TensorRT, ONNX Runtime and CUDA variables (and trt-diff's own): the flake must not export one of these
/// that the code does not read.
fn is_ours(name: &str) -> bool {
    name.contains("TRT")
        || name.contains("TENSORRT")
        || name.contains("CUDA")
        || name.contains("ONNX")
        || name.starts_with("ORT_")
}

// ---------------------------------------------------------------------------------------------------------
// Rust sources

/// The source with comments blanked out (newlines kept, so byte offsets still give line numbers); string
/// and character literals are kept as they are, and marked in the second vector (one flag per byte).
fn strip_rust_comments(src: &str) -> (String, Vec<bool>) {
    let b = src.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut in_literal = vec![false; b.len()];
    let mut i = 0;
    let blank = |out: &mut Vec<u8>, c: u8| out.push(if c == b'\n' { b'\n' } else { b' ' });
    while i < b.len() {
        let c = b[i];
        let next = b.get(i + 1).copied();
        if c == b'/' && next == Some(b'/') {
            while i < b.len() && b[i] != b'\n' {
                blank(&mut out, b[i]);
                i += 1;
            }
        } else if c == b'/' && next == Some(b'*') {
            let mut depth = 0;
            while i < b.len() {
                if b[i] == b'/' && b.get(i + 1) == Some(&b'*') {
                    depth += 1;
                    out.extend_from_slice(b"  ");
                    i += 2;
                } else if b[i] == b'*' && b.get(i + 1) == Some(&b'/') {
                    depth -= 1;
                    out.extend_from_slice(b"  ");
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    blank(&mut out, b[i]);
                    i += 1;
                }
            }
        } else if c == b'r'
            && (next == Some(b'"') || next == Some(b'#'))
            && (i == 0 || !(b[i - 1].is_ascii_alphanumeric() || b[i - 1] == b'_'))
        {
            // Raw string r"..." / r#"..."#.
            let mut j = i + 1;
            while j < b.len() && b[j] == b'#' {
                j += 1;
            }
            if b.get(j) != Some(&b'"') {
                out.push(c);
                i += 1;
                continue;
            }
            let hashes = j - i - 1;
            let mut close = b"\"".to_vec();
            close.extend(std::iter::repeat_n(b'#', hashes));
            let body_end = src[j + 1..]
                .find(std::str::from_utf8(&close).unwrap())
                .map_or(b.len(), |k| j + 1 + k + close.len());
            out.extend_from_slice(&b[i..body_end]);
            in_literal[i..body_end].fill(true);
            i = body_end;
        } else if c == b'"' {
            let start = i;
            out.push(c);
            i += 1;
            while i < b.len() && b[i] != b'"' {
                if b[i] == b'\\' && i + 1 < b.len() {
                    out.push(b[i]);
                    i += 1;
                }
                out.push(b[i]);
                i += 1;
            }
            if i < b.len() {
                out.push(b'"');
                i += 1;
            }
            in_literal[start..i].fill(true);
        } else if c == b'\'' {
            // A char literal ('x', '\n', '"') is copied whole; otherwise this is a lifetime.
            let len = if next == Some(b'\\') {
                src[i + 2..].find('\'').map(|k| k + 3)
            } else {
                src[i + 1..]
                    .chars()
                    .next()
                    .filter(|ch| src[i + 1 + ch.len_utf8()..].starts_with('\''))
                    .map(|ch| ch.len_utf8() + 2)
            };
            let len = len.unwrap_or(1);
            out.extend_from_slice(&b[i..i + len]);
            if len > 1 {
                in_literal[i..i + len].fill(true);
            }
            i += len;
        } else {
            out.push(c);
            i += 1;
        }
    }
    let code = String::from_utf8(out).expect("comments are blanked byte for byte");
    (code, in_literal)
}

/// The plain string literal at the start of `s` (after whitespace), if any.
fn leading_literal(s: &str) -> Option<&str> {
    let s = s.trim_start().strip_prefix('"')?;
    s.find('"').map(|end| &s[..end])
}

/// Whether the identifier ending at byte `end` of `code` is exactly `word` (not a longer identifier).
fn word_before(code: &str, end: usize, word: &str) -> bool {
    code[..end].ends_with(word)
        && code[..end - word.len()]
            .chars()
            .next_back()
            .is_none_or(|c| !(c.is_alphanumeric() || c == '_'))
}

/// The names of an array literal of strings starting at `s` (`["A", "B"]`), if it is one.
fn parse_array(s: &str) -> Option<Vec<String>> {
    let body = &s.strip_prefix('[')?[..s.find(']')? - 1];
    let mut names = Vec::new();
    for part in body.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let lit = leading_literal(part).filter(|l| is_env_name(l))?;
        names.push(lit.to_string());
    }
    (!names.is_empty()).then_some(names)
}

/// The names behind a variable `ident` used at byte `pos`: bound by `for ident in ["A", "B"]` or by a
/// closure `|ident|` over `["A", "B"].iter()...` in the same statement, shortly before.
fn bound_array(code: &str, pos: usize, ident: &str) -> Option<Vec<String>> {
    let from = code[..pos]
        .char_indices()
        .rev()
        .nth(600)
        .map_or(0, |(i, _)| i);
    let window = &code[from..pos];
    let by_for = window
        .rfind(&format!("for {ident} in ["))
        .map(|k| (k, k + format!("for {ident} in ").len()));
    let by_closure = window.rfind(&format!("|{ident}|")).and_then(|k| {
        let close = window[..k].rfind(']')?;
        let open = window[..close].rfind('[')?;
        (!window[close..k].contains(';')).then_some((k, open))
    });
    let (_, array) = [by_for, by_closure].into_iter().flatten().max()?;
    parse_array(&window[array..])
}

#[derive(Default)]
struct Reads {
    names: BTreeMap<String, Vec<String>>,
    /// Reads whose variable could not be told from the source (`file:line`).
    unresolved: Vec<String>,
}

impl Reads {
    fn add(&mut self, name: &str, at: String) {
        self.names.entry(name.to_string()).or_default().push(at);
    }
}

fn line_of(code: &str, pos: usize) -> usize {
    code[..pos].matches('\n').count() + 1
}

fn leading_ident(s: &str) -> Option<&str> {
    let end = s
        .find(|c: char| !(c.is_alphanumeric() || c == '_'))
        .unwrap_or(s.len());
    (end > 0).then(|| &s[..end])
}

/// Every environment variable `code` reads (`code` and `in_literal` from [`strip_rust_comments`]).
fn env_reads(code: &str, in_literal: &[bool], file: &str, reads: &mut Reads) {
    let imports_env_var = code.match_indices("use std::env::").any(|(k, _)| {
        let rest = &code[k..];
        rest[..rest.find(';').unwrap_or(rest.len())].contains("var")
    });
    for call in [
        "var_os(",
        "var(",
        "try_from_env(",
        "from_env(",
        "option_env!(",
    ] {
        let word = call.trim_end_matches('(');
        for (pos, _) in code.match_indices(call) {
            if in_literal[pos] || !word_before(code, pos + word.len(), word) {
                continue;
            }
            // `var` / `var_os` are std::env's when qualified (`env::var`) or imported from std::env; other
            // functions of that name (a variance, say) are not reads.
            if word.starts_with("var") && !code[..pos].ends_with("env::") && !imports_env_var {
                continue;
            }
            let at = format!("{file}:{}", line_of(code, pos));
            let arg = &code[pos + call.len()..];
            if let Some(name) = leading_literal(arg) {
                reads.add(name, at);
            } else if !arg.trim_start().starts_with(')') {
                let ident = leading_ident(arg.trim_start());
                match ident.and_then(|i| bound_array(code, pos, i)) {
                    Some(names) => names.iter().for_each(|n| reads.add(n, at.clone())),
                    None => reads.unresolved.push(at),
                }
            }
        }
    }
    // clap: #[arg(long, env = "NAME")]
    for (pos, _) in code.match_indices("env") {
        if in_literal[pos] || !word_before(code, pos + 3, "env") {
            continue;
        }
        let rest = code[pos + 3..].trim_start();
        if let Some(rest) = rest.strip_prefix('=').filter(|r| !r.starts_with('='))
            && let Some(name) = leading_literal(rest).filter(|n| is_env_name(n))
        {
            reads.add(name, format!("{file}:{}", line_of(code, pos)));
        }
    }
}

/// build.rs's `cargo:rerun-if-env-changed=` names: literal ones and `{var}` ones fed by a `for var in [..]`.
fn rerun_if_env_changed(code: &str, file: &str, reads: &mut Reads) {
    for key in [
        "cargo:rerun-if-env-changed=",
        "cargo::rerun-if-env-changed=",
    ] {
        for (pos, _) in code.match_indices(key) {
            let at = format!("{file}:{}", line_of(code, pos));
            let rest = &code[pos + key.len()..];
            let end = rest.find('"').unwrap_or(rest.len());
            let value = &rest[..end];
            if is_env_name(value) {
                reads.add(value, at);
            } else if let Some(ident) = value.strip_prefix('{').and_then(|v| v.strip_suffix('}')) {
                match bound_array(code, pos, ident) {
                    Some(names) => names.iter().for_each(|n| reads.add(n, at.clone())),
                    None => reads.unresolved.push(at),
                }
            } else {
                reads.unresolved.push(at);
            }
        }
    }
}

fn code_reads() -> Reads {
    let root = root();
    let mut reads = Reads::default();
    let build_rs = read(&root.join("build.rs"));
    let (build_code, mask) = strip_rust_comments(&build_rs);
    rerun_if_env_changed(&build_code, "build.rs", &mut reads);
    env_reads(&build_code, &mask, "build.rs", &mut reads);
    let mut files = Vec::new();
    rust_files(&root.join("src"), &mut files);
    assert!(!files.is_empty(), "no Rust files under src/");
    for f in files {
        let rel = f.strip_prefix(&root).unwrap().display().to_string();
        let (code, mask) = strip_rust_comments(&read(&f));
        env_reads(&code, &mask, &rel, &mut reads);
    }
    reads.names.retain(|name, _| !set_by_cargo(name));
    reads
}

// ---------------------------------------------------------------------------------------------------------
// flake.nix

/// flake.nix split into its code (comments removed, string literals blanked) and the text of its string
/// literals (antiquotations removed, shell comments removed).
struct NixText {
    code: String,
    strings: Vec<String>,
}

#[derive(Clone, Copy)]
enum Mode {
    /// Nix code; the number of `{` opened inside it (an antiquotation ends at the `}` that closes none).
    Code(usize),
    Str,
    IndentedStr,
}

fn split_nix(src: &str) -> NixText {
    let b: Vec<char> = src.chars().collect();
    let at = |i: usize| b.get(i).copied();
    let mut stack = vec![Mode::Code(0)];
    let mut open: Vec<String> = Vec::new();
    let mut strings = Vec::new();
    let mut code = String::new();
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        match *stack.last().unwrap() {
            Mode::Code(depth) => {
                if c == '#' {
                    while i < b.len() && b[i] != '\n' {
                        i += 1;
                    }
                    continue;
                } else if c == '/' && at(i + 1) == Some('*') {
                    i += 2;
                    while i < b.len() && !(b[i] == '*' && at(i + 1) == Some('/')) {
                        i += 1;
                    }
                    i += 2;
                    code.push(' ');
                    continue;
                } else if c == '"' {
                    stack.push(Mode::Str);
                    open.push(String::new());
                    code.push(' ');
                } else if c == '\'' && at(i + 1) == Some('\'') {
                    stack.push(Mode::IndentedStr);
                    open.push(String::new());
                    code.push(' ');
                    i += 1;
                } else if c == '{' {
                    *stack.last_mut().unwrap() = Mode::Code(depth + 1);
                    code.push(c);
                } else if c == '}' && depth == 0 && stack.len() > 1 {
                    stack.pop(); // end of an antiquotation: back in the string
                    open.last_mut().unwrap().push(' ');
                    code.push(' ');
                } else if c == '}' {
                    *stack.last_mut().unwrap() = Mode::Code(depth.saturating_sub(1));
                    code.push(c);
                } else {
                    code.push(c);
                }
                i += 1;
            }
            Mode::Str | Mode::IndentedStr => {
                let indented = matches!(stack.last(), Some(Mode::IndentedStr));
                let s = open.last_mut().unwrap();
                if indented && c == '\'' && at(i + 1) == Some('\'') {
                    match at(i + 2) {
                        Some('$') => {
                            s.push('$');
                            i += 3;
                        }
                        Some('\'') => {
                            s.push_str("''");
                            i += 3;
                        }
                        Some('\\') => {
                            s.extend(at(i + 3));
                            i += 4;
                        }
                        _ => {
                            stack.pop();
                            strings.push(open.pop().unwrap());
                            i += 2;
                        }
                    }
                } else if !indented && c == '\\' {
                    s.extend(at(i + 1));
                    i += 2;
                } else if !indented && c == '"' {
                    stack.pop();
                    strings.push(open.pop().unwrap());
                    i += 1;
                } else if c == '$' && at(i + 1) == Some('$') {
                    s.push_str("$$");
                    i += 2;
                } else if c == '$' && at(i + 1) == Some('{') {
                    stack.push(Mode::Code(0));
                    i += 2;
                } else {
                    s.push(c);
                    i += 1;
                }
            }
        }
    }
    let strings = strings.iter().map(|s| strip_shell_comments(s)).collect();
    NixText { code, strings }
}

/// Drops shell comments: from a `#` at the start of a word to the end of the line.
fn strip_shell_comments(s: &str) -> String {
    s.lines()
        .map(|line| {
            let mut prev = ' ';
            for (k, ch) in line.char_indices() {
                if ch == '#' && prev.is_whitespace() {
                    return &line[..k];
                }
                prev = ch;
            }
            line
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn leading_name(s: &str) -> Option<&str> {
    let end = s
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .unwrap_or(s.len());
    Some(&s[..end]).filter(|n| is_env_name(n))
}

/// Every variable flake.nix sets, by any of the means in the module documentation.
fn nix_exports(flake: &str) -> BTreeSet<String> {
    let text = split_nix(flake);
    let mut names = BTreeSet::new();
    // UPPER_CASE attribute names: `NAME = value;` (not `==`).
    let code = &text.code;
    for (pos, c) in code.char_indices() {
        if !c.is_ascii_uppercase()
            || code[..pos]
                .chars()
                .next_back()
                .is_some_and(|p| p.is_alphanumeric() || p == '_' || p == '-' || p == '\'')
        {
            continue;
        }
        let Some(name) = leading_name(&code[pos..]) else {
            continue;
        };
        let rest = code[pos + name.len()..].trim_start();
        if rest.starts_with('=') && !rest.starts_with("==") {
            names.insert(name.to_string());
        }
    }
    for s in &text.strings {
        let words: Vec<&str> = s.split_whitespace().collect();
        for (k, w) in words.iter().enumerate() {
            if *w == "export" {
                for arg in &words[k + 1..] {
                    match arg.split_once('=') {
                        Some((name, _)) if is_env_name(name) => {
                            names.insert(name.to_string());
                        }
                        None if is_env_name(arg) => {
                            names.insert(arg.to_string());
                        }
                        _ => break,
                    }
                }
            }
            if ["--set", "--set-default", "--prefix", "--suffix"].contains(w)
                && let Some(name) = words.get(k + 1).and_then(|n| leading_name(n))
            {
                names.insert(name.to_string());
            }
        }
    }
    names
}

/// `not-exported: NAME (reason)` comments: variables the code reads that the flake deliberately leaves alone.
fn nix_not_exported(flake: &str) -> BTreeSet<String> {
    flake
        .lines()
        .filter_map(|l| l.trim_start().strip_prefix('#'))
        .filter_map(|l| l.split_once("not-exported:"))
        .filter_map(|(_, rest)| leading_name(rest.trim_start()).map(str::to_string))
        .collect()
}

// ---------------------------------------------------------------------------------------------------------

#[test]
fn flake_exports_exactly_what_the_code_reads() {
    let flake = read(&root().join("flake.nix"));
    let reads = code_reads();
    let exports = nix_exports(&flake);
    let opted_out = nix_not_exported(&flake);
    for at in &reads.unresolved {
        eprintln!(
            "note: {at} reads an environment variable whose name is not a literal; not checked"
        );
    }
    let read_names: BTreeSet<String> = reads.names.keys().cloned().collect();
    eprintln!("code reads {read_names:?}\nflake exports {exports:?}\nnot exported {opted_out:?}");
    // The scanners must have found something on both sides, or this test would pass vacuously.
    assert!(
        read_names.len() >= 3
            && reads
                .names
                .values()
                .flatten()
                .any(|a| a.starts_with("src/")),
        "the source scan found too little: {read_names:?}"
    );
    assert!(
        exports.iter().filter(|n| is_ours(n)).count() >= 3,
        "the flake scan found too little: {exports:?}"
    );

    let mut problems = Vec::new();
    for (name, at) in &reads.names {
        if !exports.contains(name) && !opted_out.contains(name) {
            problems.push(format!(
                "{name} is read ({}) but flake.nix neither exports it nor lists it as `not-exported: {name}`",
                at.join(", ")
            ));
        }
    }
    for name in exports.iter().filter(|n| is_ours(n)) {
        if !read_names.contains(name) {
            problems.push(format!(
                "flake.nix exports {name}, which neither build.rs nor src/ reads (renamed?)"
            ));
        }
    }
    for name in &opted_out {
        if !read_names.contains(name) {
            problems.push(format!(
                "flake.nix lists `not-exported: {name}`, but nothing reads {name}"
            ));
        }
        if exports.contains(name) {
            problems.push(format!(
                "flake.nix both exports {name} and lists it as not exported"
            ));
        }
    }
    assert!(
        problems.is_empty(),
        "flake.nix and the code disagree on environment variables:\n  {}\n(code reads: {read_names:?}; \
         flake exports: {exports:?})",
        problems.join("\n  ")
    );
}

#[test]
fn rust_scanner_finds_reads_and_ignores_comments() {
    let src = r##"
        // std::env::var("IN_A_COMMENT")
        /* env::var_os("IN_A /* nested */ BLOCK") */
        fn f() {
            let q = '"'; let s = "not var(\"X\")"; let r = r#"var_os("RAW")"#;
            let a = std::env::var_os("ALPHA");
            let b = env::var( "BETA_2" );
            let c = EnvFilter::try_from_env("GAMMA");
            let d = option_env!("DELTA");
            let e = my_var("NOT_A_READ");
            for v in ["EPS", "ZETA"] { println!("cargo:rerun-if-env-changed={v}"); }
            let g = ["ETA", "THETA"].iter().filter_map(|v| std::env::var_os(v));
            let h = std::env::var(name);
            let variance = var(&xs, &ys);
        }
        #[arg(long, env = "IOTA")] x: u8,
    "##;
    let (code, mask) = strip_rust_comments(src);
    let mut reads = Reads::default();
    env_reads(&code, &mask, "t.rs", &mut reads);
    rerun_if_env_changed(&code, "t.rs", &mut reads);
    let names: Vec<&str> = reads.names.keys().map(String::as_str).collect();
    assert_eq!(
        names,
        [
            "ALPHA", "BETA_2", "DELTA", "EPS", "ETA", "GAMMA", "IOTA", "THETA", "ZETA"
        ]
    );
    assert_eq!(reads.unresolved, ["t.rs:13"]);
    assert!(!set_by_cargo("TRT_LIB_DIR") && set_by_cargo("CARGO_MANIFEST_DIR"));
}

#[test]
fn nix_scanner_finds_exports_and_ignores_comments() {
    let flake = r#"{
      # FROM_COMMENT = "x";
      #   not-exported: SKIPPED  (reason)
      /* BLOCK_COMMENT = 1; */
      env = { ALPHA = "${pkg}/lib"; lower = 1; };
      x = a: a.BETA == "IN_STRING = 1";
      shellHook = ''
        # export SHELL_COMMENT=1
        export GAMMA="$PWD/x''${HOME:+:$HOME}" DELTA
        echo hi # export ALSO_COMMENT=2
        wrapProgram $out/bin/x --set-default EPS ${a} --prefix ZETA : /run
      '';
      y = "${ { ETA = 1; }.ETA }";
    }"#;
    let exports: Vec<String> = nix_exports(flake).into_iter().collect();
    assert_eq!(exports, ["ALPHA", "DELTA", "EPS", "ETA", "GAMMA", "ZETA"]);
    assert_eq!(
        nix_not_exported(flake).into_iter().collect::<Vec<_>>(),
        ["SKIPPED"]
    );
    assert!(
        is_ours("TRTX_HEADERS_DIR") && is_ours("ORT_DYLIB_PATH") && !is_ours("LD_LIBRARY_PATH")
    );
}
