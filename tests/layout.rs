//! The house keeps its shape: imports point one way.
//!
//! Every file under `src/` is a module; a `crate::a::b` or `super::` path in its code
//! (comments and its `#[cfg(test)] mod tests` left out) is an import of the deepest
//! module that path names. Two rules:
//!
//! 1. **Areas are layered.** `error` first; then the helpers `fsutil`, `rng` and
//!    `tensorfile`; then `patch`, `model`, `serve`, then `lab` and `server` side by
//!    side, then `bench`, then the binary. A module imports only from its own area
//!    or a lower one, so the serving core never reaches the research pipeline, the
//!    patching code knows no model, and only `server` knows the wire.
//! 2. **No circles between modules**, inside an area too. A submodule naming its own
//!    parent (`super::Model` in `model/cuda.rs`) is not counted: the parent owns it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Each area's layer; an import must point to the same layer's area or a lower one.
const LAYERS: &[(&str, u32)] = &[
    ("error", 0),
    ("fsutil", 1),
    ("rng", 1),
    ("tensorfile", 1),
    ("patch", 2),
    ("model", 3),
    ("serve", 4),
    ("lab", 5),
    ("server", 5),
    ("bench", 6),
    ("bin", 7),
];

fn layer(area: &str) -> u32 {
    LAYERS
        .iter()
        .find(|(a, _)| *a == area)
        .unwrap_or_else(|| panic!("src/{area} is in no layer: add it to LAYERS in tests/layout.rs"))
        .1
}

/// `src/serve/batch.rs` -> `serve::batch`; `src/model/mod.rs` -> `model`; the binary's
/// files are all `bin` (it imports the library as `rws::`, which is checked the same way).
fn module_of(src: &Path, file: &Path) -> String {
    let rel = file.strip_prefix(src).unwrap();
    if rel.starts_with("bin") {
        return "bin".into();
    }
    let mut parts: Vec<String> = rel
        .iter()
        .map(|c| c.to_string_lossy().trim_end_matches(".rs").to_string())
        .collect();
    if parts.last().is_some_and(|p| p == "mod" || p == "lib") {
        parts.pop();
    }
    parts.join("::")
}

/// The code of a file without comments and without its unit tests.
fn code(text: &str) -> String {
    let text = match text.find("#[cfg(test)]\nmod tests") {
        Some(at) => &text[..at],
        None => text,
    };
    text.lines()
        .map(|l| match l.find("//") {
            Some(at) => &l[..at],
            None => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The paths after `crate::` / `rws::`, and after each run of `super::` (resolved).
fn imports(module: &str, code: &str) -> Vec<String> {
    let word = |s: &str| -> String {
        s.chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == ':')
            .collect::<String>()
            .trim_end_matches(':')
            .to_string()
    };
    let mut out = Vec::new();
    for prefix in ["crate::", "rws::"] {
        for (at, _) in code.match_indices(prefix) {
            let before = code[..at].chars().next_back();
            if before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':') {
                continue;
            }
            out.push(word(&code[at + prefix.len()..]));
        }
    }
    // `super` is the parent of the module a file defines (`module_of` already names
    // a mod.rs by its folder).
    let here: Vec<&str> = module.split("::").filter(|s| !s.is_empty()).collect();
    for (at, _) in code.match_indices("super::") {
        if code[..at].ends_with("super::") {
            continue; // counted with the first of the run
        }
        let mut rest = &code[at..];
        let mut base = here.clone();
        while let Some(r) = rest.strip_prefix("super::") {
            base.pop();
            rest = r;
        }
        let tail = word(rest);
        let mut path = base.join("::");
        if !tail.is_empty() {
            if !path.is_empty() {
                path.push_str("::");
            }
            path.push_str(&tail);
        }
        out.push(path);
    }
    out
}

struct House {
    /// module -> the modules it imports
    edges: BTreeMap<String, BTreeSet<String>>,
}

fn house() -> House {
    let src = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    let mut stack = vec![src.clone()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "rs") {
                files.push(p);
            }
        }
    }
    let modules: BTreeSet<String> = files.iter().map(|f| module_of(&src, f)).collect();
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for f in &files {
        let from = module_of(&src, f);
        let text = std::fs::read_to_string(f).unwrap();
        for path in imports(&from, &code(&text)) {
            // The deepest module the path names: `serve::engine::Engine` -> serve::engine.
            let mut target = path.as_str();
            let to = loop {
                if modules.contains(target) {
                    break Some(target.to_string());
                }
                match target.rfind("::") {
                    Some(at) => target = &target[..at],
                    None => break None,
                }
            };
            // Re-exports at the root (`crate::Error`) are the error helper.
            let to = to.unwrap_or_else(|| {
                if path.starts_with("Error") || path.starts_with("Result") || path == "bail" {
                    "error".into()
                } else {
                    String::new()
                }
            });
            let is_ancestor = from == to || from.starts_with(&format!("{to}::"));
            if !to.is_empty() && !is_ancestor {
                edges.entry(from.clone()).or_default().insert(to);
            }
        }
        edges.entry(from).or_default();
    }
    House { edges }
}

fn area(module: &str) -> &str {
    module.split("::").next().unwrap()
}

#[test]
fn areas_import_only_their_own_layer_or_lower() {
    let h = house();
    let mut wrong = Vec::new();
    for (from, tos) in &h.edges {
        for to in tos {
            let (a, b) = (area(from), area(to));
            if a != b && layer(b) >= layer(a) {
                wrong.push(format!("{from} -> {to}"));
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "imports against the layers (see tests/layout.rs):\n  {}",
        wrong.join("\n  ")
    );
    // The checker itself sees imports: the engine uses the profile table.
    assert!(h.edges["serve::engine"].contains("serve::profile"));
    assert!(h.edges["bin"].iter().any(|m| m.starts_with("serve")));
}

#[test]
fn no_import_circles() {
    let h = house();
    // Depth-first search; a grey node met again closes a circle.
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        White,
        Grey,
        Black,
    }
    let mut mark: BTreeMap<&str, Mark> =
        h.edges.keys().map(|k| (k.as_str(), Mark::White)).collect();
    let mut circles = Vec::new();
    fn visit<'a>(
        n: &'a str,
        h: &'a House,
        mark: &mut BTreeMap<&'a str, Mark>,
        path: &mut Vec<&'a str>,
        circles: &mut Vec<String>,
    ) {
        mark.insert(n, Mark::Grey);
        path.push(n);
        for m in h.edges.get(n).into_iter().flatten() {
            match mark.get(m.as_str()).copied().unwrap_or(Mark::Black) {
                Mark::White => visit(m, h, mark, path, circles),
                Mark::Grey => {
                    let start = path.iter().position(|p| *p == m).unwrap();
                    circles.push(format!("{} -> {m}", path[start..].join(" -> ")));
                }
                Mark::Black => {}
            }
        }
        path.pop();
        mark.insert(n, Mark::Black);
    }
    let nodes: Vec<&str> = h.edges.keys().map(String::as_str).collect();
    for n in nodes {
        if mark[n] == Mark::White {
            visit(n, &h, &mut mark, &mut Vec::new(), &mut circles);
        }
    }
    assert!(
        circles.is_empty(),
        "import circles:\n  {}",
        circles.join("\n  ")
    );
}

#[test]
fn the_checker_resolves_paths() {
    let code = code(
        "use crate::serve::profile::{Registry, Table};\n// crate::lab::eval in a comment\nuse super::super::kernel::cpu;\nlet x = crate::Error::Internal(s);\n#[cfg(test)]\nmod tests {\n use crate::lab::synth;\n}",
    );
    let got = imports("patch::kernel::cuda", &code);
    assert_eq!(
        got,
        vec!["serve::profile", "Error::Internal", "patch::kernel::cpu"],
        "{code}"
    );
}
