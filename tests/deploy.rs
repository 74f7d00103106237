//! The container files, checked without Docker: Dockerfile, .dockerignore,
//! docker-compose.yml and deploy/ (the server's config, Prometheus, Grafana).
//!
//! - every host path docker-compose.yml names exists, and every COPY source of
//!   the Dockerfile exists and is not excluded by .dockerignore;
//! - the builder stage's sources alone pass `cargo metadata --locked` and hold
//!   every target's source (Cargo.lock is in sync, the manifest's targets are there);
//! - the image's command with deploy/rws.toml starts the real binary, the only
//!   rewrites being the container paths and addresses that cannot exist here,
//!   and every container path the config names is provided by the image or the
//!   compose file;
//! - after some traffic, every metric and label the Grafana dashboard queries
//!   is in the scrape, and the ports agree across the config, the Dockerfile,
//!   the compose file and Prometheus's scrape target;
//! - the dashboard uses the datasource the provisioning files define, and
//!   Grafana's mounts put the provisioning files and the dashboard where they
//!   say they are.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::BufRead;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rws::server::{admin_client, pb};
use serde_norway::Value as Yaml;
use tonic::Code;

const COMPOSE: &str = "docker-compose.yml";
const DOCKERFILE: &str = "Dockerfile";

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(rel: impl AsRef<Path>) -> String {
    let path = root().join(rel);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn yaml_file(path: &Path) -> Yaml {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_norway::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn compose() -> Yaml {
    yaml_file(&root().join(COMPOSE))
}

fn str_of<'a>(v: &'a Yaml, what: &str) -> &'a str {
    v.as_str()
        .unwrap_or_else(|| panic!("{what} must be a string, not {v:?}"))
}

/// A relative host path of the compose file, resolved against the repository.
fn host(rel: &str) -> PathBuf {
    let path = Path::new(rel);
    assert!(
        path.is_relative(),
        "{COMPOSE}: host path {rel} must be relative to the repository"
    );
    root().join(path)
}

// ---- docker-compose.yml ----------------------------------------------------

fn services(c: &Yaml) -> Vec<(String, &Yaml)> {
    c["services"]
        .as_mapping()
        .expect("services")
        .iter()
        .map(|(k, v)| (str_of(k, "a service name").to_string(), v))
        .collect()
}

/// The service built from this repository (`build: .`): the rws server.
fn rws_service(c: &Yaml) -> (String, &Yaml) {
    let built: Vec<_> = services(c)
        .into_iter()
        .filter(|(_, s)| !s["build"].is_null())
        .collect();
    assert_eq!(
        built.len(),
        1,
        "{COMPOSE}: one service must build the image"
    );
    built.into_iter().next().unwrap()
}

/// The service running an image whose name starts with `prefix`.
fn service_by_image<'a>(c: &'a Yaml, prefix: &str) -> (String, &'a Yaml) {
    services(c)
        .into_iter()
        .find(|(_, s)| s["image"].as_str().is_some_and(|i| i.starts_with(prefix)))
        .unwrap_or_else(|| panic!("{COMPOSE}: no service runs {prefix}"))
}

struct Mount {
    source: String,
    target: String,
    /// A host path (else a named volume).
    bind: bool,
}

fn mounts(s: &Yaml) -> Vec<Mount> {
    let Some(list) = s["volumes"].as_sequence() else {
        return Vec::new();
    };
    list.iter()
        .map(|v| match v {
            Yaml::String(short) => {
                let mut parts = short.split(':');
                let source = parts.next().unwrap().to_string();
                let target = parts
                    .next()
                    .unwrap_or_else(|| panic!("{COMPOSE}: anonymous volume {short}"))
                    .to_string();
                let bind = source.starts_with(['.', '/', '~']);
                Mount {
                    source,
                    target,
                    bind,
                }
            }
            long => Mount {
                source: str_of(&long["source"], "a volume source").to_string(),
                target: str_of(&long["target"], "a volume target").to_string(),
                bind: long["type"].as_str() == Some("bind"),
            },
        })
        .collect()
}

/// Where a container path of `s` comes from on the host, through its bind mounts.
fn host_path_in(s: &Yaml, container: &str) -> Option<PathBuf> {
    mounts(s)
        .into_iter()
        .filter(|m| m.bind)
        .filter_map(|m| {
            let rest = Path::new(container).strip_prefix(&m.target).ok()?;
            let source = host(&m.source);
            let path = if rest.as_os_str().is_empty() {
                source
            } else {
                source.join(rest)
            };
            Some((m.target.len(), path))
        })
        .max_by_key(|(len, _)| *len)
        .map(|(_, p)| p)
}

/// `published:target` container ports of a service.
fn container_ports(s: &Yaml) -> BTreeSet<u16> {
    let Some(list) = s["ports"].as_sequence() else {
        return BTreeSet::new();
    };
    list.iter()
        .map(|p| match p {
            Yaml::String(short) => {
                let target = short.rsplit(':').next().unwrap();
                let target = target.split('/').next().unwrap();
                target
                    .parse()
                    .unwrap_or_else(|_| panic!("{COMPOSE}: port {short}"))
            }
            Yaml::Number(n) => n.as_u64().unwrap() as u16,
            long => long["target"].as_u64().expect("ports: target") as u16,
        })
        .collect()
}

/// A command or entrypoint override, in list or string form.
fn argv(v: &Yaml) -> Option<Vec<String>> {
    match v {
        Yaml::Null => None,
        Yaml::String(s) => Some(s.split_whitespace().map(String::from).collect()),
        Yaml::Sequence(items) => Some(
            items
                .iter()
                .map(|i| str_of(i, "a command word").to_string())
                .collect(),
        ),
        other => panic!("{COMPOSE}: command {other:?}"),
    }
}

/// The environment of a service, in map or list form.
fn environment(s: &Yaml) -> Vec<(String, String)> {
    match &s["environment"] {
        Yaml::Null => Vec::new(),
        Yaml::Mapping(m) => m
            .iter()
            .map(|(k, v)| {
                let v = match v {
                    Yaml::String(s) => s.clone(),
                    Yaml::Number(n) => n.to_string(),
                    Yaml::Bool(b) => b.to_string(),
                    other => panic!("{COMPOSE}: environment value {other:?}"),
                };
                (str_of(k, "a variable").to_string(), v)
            })
            .collect(),
        Yaml::Sequence(list) => list
            .iter()
            .map(|e| {
                let e = str_of(e, "an environment entry");
                let (k, v) = e.split_once('=').unwrap_or((e, ""));
                (k.to_string(), v.to_string())
            })
            .collect(),
        other => panic!("{COMPOSE}: environment {other:?}"),
    }
}

/// `30s`, `1m30s`, `500ms`.
fn compose_duration(s: &str) -> Duration {
    let (mut total, mut num) = (Duration::ZERO, String::new());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c.is_ascii_digit() || c == '.' {
            num.push(c);
            continue;
        }
        let mut unit = c.to_string();
        while let Some(&c) = chars.peek().filter(|c| c.is_ascii_alphabetic()) {
            unit.push(c);
            chars.next();
        }
        let n: f64 = num.parse().unwrap_or_else(|_| panic!("duration {s}"));
        let secs = match unit.as_str() {
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => panic!("duration {s}: unit {unit}"),
        };
        total += Duration::from_secs_f64(n * secs);
        num.clear();
    }
    assert!(num.is_empty(), "duration {s} lacks a unit");
    total
}

#[test]
fn compose_host_paths_exist() {
    let c = compose();
    let mut paths: Vec<(String, PathBuf)> = Vec::new();
    let named: BTreeSet<String> = c["volumes"]
        .as_mapping()
        .map(|m| {
            m.keys()
                .map(|k| str_of(k, "a volume").to_string())
                .collect()
        })
        .unwrap_or_default();
    for (name, s) in services(&c) {
        match &s["build"] {
            Yaml::Null => {}
            Yaml::String(ctx) => {
                paths.push((format!("{name}: build"), host(ctx)));
                paths.push((format!("{name}: Dockerfile"), host(ctx).join(DOCKERFILE)));
            }
            b => {
                let ctx = host(b["context"].as_str().unwrap_or("."));
                let file = b["dockerfile"].as_str().unwrap_or(DOCKERFILE);
                paths.push((format!("{name}: build.dockerfile"), ctx.join(file)));
                paths.push((format!("{name}: build.context"), ctx));
            }
        }
        for m in mounts(s) {
            if m.bind {
                paths.push((format!("{name}: volume {}", m.target), host(&m.source)));
            } else {
                assert!(
                    named.contains(&m.source),
                    "{COMPOSE}: {name} uses the volume {} that is not declared",
                    m.source
                );
            }
        }
        if let Some(files) = s["env_file"].as_sequence() {
            for f in files {
                paths.push((format!("{name}: env_file"), host(str_of(f, "env_file"))));
            }
        } else if let Some(f) = s["env_file"].as_str() {
            paths.push((format!("{name}: env_file"), host(f)));
        }
        for kind in ["secrets", "configs"] {
            for used in s[kind].as_sequence().into_iter().flatten() {
                let id = used.as_str().or_else(|| used["source"].as_str()).unwrap();
                assert!(
                    !c[kind][id].is_null(),
                    "{COMPOSE}: {name} uses the undeclared {kind} entry {id}"
                );
            }
        }
    }
    for kind in ["secrets", "configs"] {
        for (id, def) in c[kind].as_mapping().into_iter().flatten() {
            let id = str_of(id, kind);
            let file = def["file"]
                .as_str()
                .unwrap_or_else(|| panic!("{COMPOSE}: {kind}.{id} has no file"));
            paths.push((format!("{kind}.{id}"), host(file)));
        }
    }
    assert!(paths.len() >= 6, "too few paths found: {}", paths.len());
    for (what, path) in paths {
        assert!(
            path.exists(),
            "{COMPOSE}: {what}: {} does not exist",
            path.display()
        );
    }
}

// ---- Dockerfile ------------------------------------------------------------

struct Instruction {
    stage: usize,
    keyword: String,
    args: String,
}

/// Logical instructions: comments dropped, `\` continuations joined.
fn dockerfile() -> Vec<Instruction> {
    let mut out = Vec::new();
    let (mut stage, mut line) = (0usize, String::new());
    for raw in read(DOCKERFILE).lines() {
        let t = raw.trim();
        if t.is_empty() || t.starts_with('#') {
            continue;
        }
        match t.strip_suffix('\\') {
            Some(head) => {
                line.push_str(head);
                line.push(' ');
                continue;
            }
            None => line.push_str(t),
        }
        let full = std::mem::take(&mut line);
        let (keyword, args) = full.split_once(char::is_whitespace).unwrap_or((&full, ""));
        let keyword = keyword.to_ascii_uppercase();
        if keyword == "FROM" {
            stage += 1;
        }
        out.push(Instruction {
            stage,
            keyword,
            args: args.trim().to_string(),
        });
    }
    assert!(line.is_empty(), "{DOCKERFILE} ends inside a continuation");
    out
}

/// Exec-form (JSON) or shell-form words.
fn words(args: &str) -> Vec<String> {
    if args.starts_with('[') {
        serde_json::from_str(args).unwrap_or_else(|e| panic!("{DOCKERFILE}: {args}: {e}"))
    } else {
        args.split_whitespace().map(String::from).collect()
    }
}

struct Copy {
    stage: usize,
    /// From another stage or image: the sources are not in the context.
    from: Option<String>,
    sources: Vec<String>,
    dest: String,
}

fn copies(df: &[Instruction]) -> Vec<Copy> {
    df.iter()
        .filter(|i| i.keyword == "COPY" || i.keyword == "ADD")
        .map(|i| {
            let w = words(&i.args);
            let flags: Vec<&String> = w.iter().take_while(|w| w.starts_with("--")).collect();
            let rest = &w[flags.len()..];
            assert!(rest.len() >= 2, "{DOCKERFILE}: COPY {}", i.args);
            Copy {
                stage: i.stage,
                from: flags
                    .iter()
                    .find_map(|f| f.strip_prefix("--from="))
                    .map(String::from),
                sources: rest[..rest.len() - 1].to_vec(),
                dest: rest[rest.len() - 1].clone(),
            }
        })
        .collect()
}

fn last_stage(df: &[Instruction]) -> usize {
    df.iter().map(|i| i.stage).max().expect("no FROM")
}

/// The last `keyword` of the final stage, as words.
fn final_words(df: &[Instruction], keyword: &str) -> Vec<String> {
    let last = last_stage(df);
    df.iter()
        .rfind(|i| i.stage == last && i.keyword == keyword)
        .map(|i| words(&i.args))
        .unwrap_or_default()
}

fn final_all(df: &[Instruction], keyword: &str) -> Vec<String> {
    let last = last_stage(df);
    df.iter()
        .filter(|i| i.stage == last && i.keyword == keyword)
        .flat_map(|i| words(&i.args))
        .collect()
}

/// The host path the final image's `container` path is copied from.
fn image_source(df: &[Instruction], container: &str) -> Option<String> {
    let last = last_stage(df);
    copies(df)
        .into_iter()
        .filter(|c| c.stage == last && c.from.is_none() && c.sources.len() == 1)
        .find(|c| c.dest.trim_end_matches('/') == container.trim_end_matches('/'))
        .map(|c| c.sources[0].clone())
}

/// .dockerignore rules: (negated, pattern segments).
fn dockerignore() -> Vec<(bool, Vec<String>)> {
    read(".dockerignore")
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            let (neg, p) = match l.strip_prefix('!') {
                Some(p) => (true, p),
                None => (false, l),
            };
            let p = p.trim_start_matches('/').trim_end_matches('/');
            (neg, p.split('/').map(String::from).collect())
        })
        .collect()
}

/// Glob on one path segment: `*` and `?` (no character classes).
fn glob(pattern: &[u8], name: &[u8]) -> bool {
    match (pattern.first(), name.first()) {
        (None, None) => true,
        (Some(b'*'), _) => {
            glob(&pattern[1..], name) || (!name.is_empty() && glob(pattern, &name[1..]))
        }
        (Some(b'?'), Some(_)) => glob(&pattern[1..], &name[1..]),
        (Some(p), Some(n)) if p == n => glob(&pattern[1..], &name[1..]),
        _ => false,
    }
}

fn glob_path(pattern: &[String], path: &[&str]) -> bool {
    match (pattern.first(), path.first()) {
        (None, None) => true,
        (Some(p), _) if p == "**" => {
            glob_path(&pattern[1..], path) || (!path.is_empty() && glob_path(pattern, &path[1..]))
        }
        (Some(p), Some(n)) => {
            glob(p.as_bytes(), n.as_bytes()) && glob_path(&pattern[1..], &path[1..])
        }
        _ => false,
    }
}

/// Whether docker leaves `rel` out of the build context: the last rule that
/// matches it or one of its parent directories decides.
fn ignored(rules: &[(bool, Vec<String>)], rel: &str) -> bool {
    let segs: Vec<&str> = rel.split('/').filter(|s| !s.is_empty()).collect();
    let mut out = false;
    for (neg, pattern) in rules {
        if (1..=segs.len()).any(|n| glob_path(pattern, &segs[..n])) {
            out = !neg;
        }
    }
    out
}

/// Files under `rel` (itself if a file), relative to the repository.
fn files_under(rel: &str) -> Vec<String> {
    let path = root().join(rel);
    if path.is_file() {
        return vec![rel.to_string()];
    }
    let mut out = Vec::new();
    for e in std::fs::read_dir(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display())) {
        let name = e.unwrap().file_name().into_string().unwrap();
        // Python's byte-code caches (the tests import benches/onnx_baseline.py):
        // never in a clean checkout, and left out of the context on purpose.
        if name == "__pycache__" {
            continue;
        }
        out.extend(files_under(&format!(
            "{}/{name}",
            rel.trim_end_matches('/')
        )));
    }
    out
}

#[test]
fn dockerfile_copy_sources_exist_and_are_in_the_context() {
    let df = dockerfile();
    let rules = dockerignore();
    let mut checked = 0;
    for c in copies(&df).iter().filter(|c| c.from.is_none()) {
        for src in &c.sources {
            assert!(
                !src.contains(['*', '?', '[']),
                "{DOCKERFILE}: COPY {src}: globs are not checked, name the paths"
            );
            let path = root().join(src);
            assert!(
                path.exists(),
                "{DOCKERFILE}: COPY source {src} does not exist"
            );
            let files = files_under(src);
            assert!(!files.is_empty(), "{DOCKERFILE}: COPY {src} copies nothing");
            for f in files {
                assert!(
                    !ignored(&rules, &f),
                    ".dockerignore leaves {f} out of the context, but {DOCKERFILE} copies it"
                );
            }
            checked += 1;
        }
    }
    assert!(checked >= 6, "only {checked} COPY sources found");
    // The binary goes on PATH, where ENTRYPOINT finds it.
    let last = last_stage(&df);
    assert!(
        copies(&df)
            .iter()
            .any(|c| c.stage == last && c.dest == "/usr/local/bin/rws"),
        "{DOCKERFILE}: the final image must hold /usr/local/bin/rws"
    );
    assert_eq!(final_words(&df, "ENTRYPOINT"), ["rws"]);
    let user = final_words(&df, "USER");
    assert!(
        !user.is_empty() && !user[0].starts_with("root") && !user[0].starts_with("0"),
        "{DOCKERFILE}: the final image must run as a non-root USER, not {user:?}"
    );
}

/// Copies what the builder stage copies from the context, as it would see it.
fn stage_builder_context(df: &[Instruction], to: &Path) {
    let rules = dockerignore();
    let first = df.iter().map(|i| i.stage).min().unwrap();
    for c in copies(df)
        .into_iter()
        .filter(|c| c.stage == first && c.from.is_none())
    {
        let into_dir = c.dest.ends_with('/') || c.sources.len() > 1;
        assert!(
            Path::new(&c.dest).is_relative(),
            "builder COPY destinations are relative to WORKDIR: {}",
            c.dest
        );
        for src in &c.sources {
            let base = if into_dir {
                to.join(&c.dest).join(Path::new(src).file_name().unwrap())
            } else {
                to.join(&c.dest)
            };
            for f in files_under(src) {
                if ignored(&rules, &f) {
                    continue;
                }
                let rest = Path::new(&f).strip_prefix(src).unwrap();
                let dst = if rest.as_os_str().is_empty() {
                    base.clone()
                } else {
                    base.join(rest)
                };
                std::fs::create_dir_all(dst.parent().unwrap()).unwrap();
                std::fs::copy(root().join(&f), &dst).unwrap();
            }
        }
    }
}

/// `cargo build --release --locked` in the builder stage needs the declared
/// targets (benches included) and a Cargo.lock in sync with Cargo.toml; this
/// checks both on exactly what the builder stage copies, offline.
///
/// `cargo metadata --locked --filter-platform HOST` checks the lock against the
/// manifest and needs only the crates a default build on this platform downloads:
/// not cudarc (a `cuda` build's), not the Windows-only ones. `cargo fetch --offline`
/// wanted all of them and failed on every machine that never fetched them; this
/// passes on a fresh `CARGO_HOME` after one build. It does not look at target files,
/// so each target's source is checked here.
#[test]
fn builder_stage_sources_are_locked_and_complete() {
    let df = dockerfile();
    let staged = tempfile::tempdir().unwrap();
    stage_builder_context(&df, staged.path());
    assert!(
        staged.path().join("Cargo.lock").is_file(),
        "the builder needs Cargo.lock"
    );
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let vv = std::process::Command::new(&cargo)
        .arg("-vV")
        .output()
        .unwrap();
    let vv = String::from_utf8(vv.stdout).unwrap();
    let host = vv
        .lines()
        .find_map(|l| l.strip_prefix("host: "))
        .expect("cargo -vV names the host");
    let out = std::process::Command::new(&cargo)
        .args(["metadata", "--locked", "--offline", "--format-version", "1"])
        .args(["--filter-platform", host])
        .current_dir(staged.path())
        .env_remove("CARGO_TARGET_DIR")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "cargo metadata --locked on the builder stage's sources failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let root_id = meta["resolve"]["root"].as_str().expect("a root package");
    let package = meta["packages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["id"] == root_id)
        .expect("the root package");
    let targets = package["targets"].as_array().unwrap();
    assert!(targets.len() >= 3, "lib, bin and benches: {targets:?}");
    for t in targets {
        let src = Path::new(t["src_path"].as_str().unwrap());
        assert!(
            src.is_file(),
            "target {} needs {}, which the builder stage does not copy",
            t["name"],
            src.display()
        );
    }
}

// ---- the server, started as the image starts it ----------------------------

/// `name{labels} value` samples of a Prometheus text exposition.
fn samples(text: &str) -> Vec<(String, BTreeMap<String, String>)> {
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let end = line.find(['{', ' ']).expect("sample line");
        let name = line[..end].to_string();
        let mut labels = BTreeMap::new();
        if line[end..].starts_with('{') {
            let mut chars = line[end + 1..].chars();
            loop {
                let key: String = chars.by_ref().take_while(|&c| c != '=').collect();
                let key = key.trim_start_matches(',').trim().to_string();
                if key.is_empty() || key.starts_with('}') {
                    break;
                }
                assert_eq!(chars.next(), Some('"'), "{line}");
                let mut value = String::new();
                while let Some(c) = chars.next() {
                    match c {
                        '\\' => value.extend(chars.next()),
                        '"' => break,
                        c => value.push(c),
                    }
                }
                labels.insert(key, value);
                match chars.next() {
                    Some(',') => continue,
                    Some('}') => break,
                    other => panic!("{line}: {other:?}"),
                }
            }
        }
        out.push((name, labels));
    }
    out
}

#[derive(Debug, PartialEq)]
enum Tok {
    Ident(String),
    Punct(char),
    Other,
}

/// Metric names and label names a PromQL expression uses. Every identifier
/// that is neither a function, a keyword nor a label must be an rws metric.
fn promql_names(expr: &str) -> (BTreeSet<String>, BTreeSet<String>) {
    let mut toks = Vec::new();
    let mut it = expr.chars().peekable();
    let ident = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
    while let Some(c) = it.next() {
        match c {
            c if c.is_whitespace() => {}
            '"' | '\'' | '`' => {
                while let Some(d) = it.next() {
                    if d == '\\' {
                        it.next();
                    } else if d == c {
                        break;
                    }
                }
                toks.push(Tok::Other);
            }
            // A range or subquery: `[1m]`, `[$__rate_interval]`.
            '[' => {
                for d in it.by_ref() {
                    if d == ']' {
                        break;
                    }
                }
                toks.push(Tok::Other);
            }
            c if c.is_ascii_digit() || c == '$' || c == '.' => {
                while it.peek().is_some_and(|&d| ident(d) || d == '.') {
                    it.next();
                }
                toks.push(Tok::Other);
            }
            c if c.is_ascii_alphabetic() || c == '_' || c == ':' => {
                let mut s = c.to_string();
                while let Some(&d) = it.peek().filter(|&&d| ident(d)) {
                    s.push(d);
                    it.next();
                }
                toks.push(Tok::Ident(s));
            }
            c => toks.push(Tok::Punct(c)),
        }
    }
    const LABEL_LISTS: [&str; 6] = [
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
    ];
    const KEYWORDS: [&str; 5] = ["bool", "offset", "and", "or", "unless"];
    let (mut metrics, mut labels) = (BTreeSet::new(), BTreeSet::new());
    let mut i = 0;
    while i < toks.len() {
        match &toks[i] {
            Tok::Ident(w)
                if LABEL_LISTS.contains(&w.as_str())
                    && toks.get(i + 1) == Some(&Tok::Punct('(')) =>
            {
                i += 2;
                while i < toks.len() && toks[i] != Tok::Punct(')') {
                    if let Tok::Ident(l) = &toks[i] {
                        labels.insert(l.clone());
                    }
                    i += 1;
                }
            }
            Tok::Punct('{') => {
                while i < toks.len() && toks[i] != Tok::Punct('}') {
                    if let Tok::Ident(l) = &toks[i] {
                        labels.insert(l.clone());
                    }
                    i += 1;
                }
            }
            // A function, or an aggregation followed by its `by`/`without` clause.
            Tok::Ident(_)
                if toks.get(i + 1) == Some(&Tok::Punct('('))
                    || matches!(toks.get(i + 1), Some(Tok::Ident(n)) if n == "by" || n == "without") =>
                {}
            // A keyword, or `group_left` without labels.
            Tok::Ident(w)
                if KEYWORDS.contains(&w.as_str()) || LABEL_LISTS.contains(&w.as_str()) => {}
            Tok::Ident(w) => {
                assert!(w.starts_with("rws_"), "`{expr}`: {w} is not an rws metric");
                metrics.insert(w.clone());
            }
            _ => {}
        }
        i += 1;
    }
    labels.remove("__name__");
    (metrics, labels)
}

#[test]
fn promql_names_finds_metrics_and_labels() {
    let (m, l) = promql_names(
        r#"histogram_quantile(0.99, sum by (le, profile) (rate(rws_x_bucket{status!="a,b"}[$__rate_interval]))) / on() group_left sum(rws_y)"#,
    );
    assert_eq!(m, BTreeSet::from(["rws_x_bucket".into(), "rws_y".into()]));
    assert_eq!(
        l,
        BTreeSet::from(["le".into(), "profile".into(), "status".into()])
    );
}

/// Every panel, rows' nested panels included.
fn dashboard_panels(d: &serde_json::Value) -> Vec<&serde_json::Value> {
    let mut out = Vec::new();
    for p in d["panels"].as_array().expect("panels") {
        out.push(p);
        if let Some(nested) = p["panels"].as_array() {
            out.extend(nested);
        }
    }
    out
}

fn dashboard() -> serde_json::Value {
    serde_json::from_str(&read("deploy/grafana/dashboards/rws.json"))
        .expect("deploy/grafana/dashboards/rws.json is not JSON")
}

fn exprs(d: &serde_json::Value) -> Vec<String> {
    dashboard_panels(d)
        .into_iter()
        .flat_map(|p| p["targets"].as_array().into_iter().flatten())
        .filter_map(|t| t["expr"].as_str().map(String::from))
        .collect()
}

fn port(addr: &str) -> u16 {
    addr.parse::<SocketAddr>()
        .unwrap_or_else(|e| panic!("{addr}: {e}"))
        .port()
}

/// The Prometheus config the compose file mounts, and its `host:port` targets.
fn prometheus_targets(c: &Yaml) -> Vec<(String, String)> {
    let (_, prom) = service_by_image(c, "prom/prometheus");
    let file = host_path_in(prom, "/etc/prometheus/prometheus.yml")
        .expect("the prometheus service must mount /etc/prometheus/prometheus.yml");
    let p = yaml_file(&file);
    let mut out = Vec::new();
    for job in p["scrape_configs"].as_sequence().expect("scrape_configs") {
        let path = job["metrics_path"]
            .as_str()
            .unwrap_or("/metrics")
            .to_string();
        for sc in job["static_configs"].as_sequence().into_iter().flatten() {
            for t in sc["targets"].as_sequence().into_iter().flatten() {
                out.push((str_of(t, "a target").to_string(), path.clone()));
            }
        }
    }
    out
}

/// The rws container's command and config, each container path and port
/// checked against what provides it (the image, the compose file, Prometheus),
/// then rewritten to something that exists here.
struct Here {
    /// `rws` arguments: the image's command with the rewritten config.
    args: Vec<String>,
    /// The compose service's environment.
    env: Vec<(String, String)>,
    config: toml::Table,
    token: String,
    state_dir: PathBuf,
    /// The compose service's stop_grace_period (docker's default 10 s without one).
    stop_grace: Duration,
    tmp: tempfile::TempDir,
}

fn image_command_here() -> Here {
    let df = dockerfile();
    let c = compose();
    let (rws_name, svc) = rws_service(&c);

    // The command the container runs: compose overrides, else the image's.
    let entrypoint = argv(&svc["entrypoint"]).unwrap_or_else(|| final_words(&df, "ENTRYPOINT"));
    let cmd = argv(&svc["command"]).unwrap_or_else(|| final_words(&df, "CMD"));
    let mut args: Vec<String> = entrypoint.into_iter().chain(cmd).collect();
    assert_eq!(args.first().map(String::as_str), Some("rws"), "{args:?}");
    args.remove(0);
    let at = args
        .iter()
        .position(|a| a == "--config")
        .expect("the command passes --config");
    let config_in_image = &args[at + 1];
    let config_src = image_source(&df, config_in_image)
        .unwrap_or_else(|| panic!("{DOCKERFILE} does not copy anything to {config_in_image}"));
    let mut config: toml::Table = read(&config_src).parse().expect("the config is TOML");
    let str_key = |k: &str| -> String {
        config
            .get(k)
            .and_then(|v| v.as_str())
            .unwrap_or_else(|| panic!("{config_src}: no {k}"))
            .to_string()
    };
    let tmp = tempfile::tempdir().unwrap();
    let mut rewritten = BTreeMap::<String, String>::new();

    // repo: the models the image copies.
    let repo = str_key("repo");
    let repo_src = image_source(&df, &repo)
        .unwrap_or_else(|| panic!("{DOCKERFILE} does not copy the repository to {repo}"));
    rewritten.insert("repo".into(), root().join(repo_src).display().to_string());

    // state_dir: a VOLUME of the image, a named volume of the compose file.
    let state = str_key("state_dir");
    assert!(
        final_all(&df, "VOLUME").contains(&state),
        "{DOCKERFILE}: state_dir {state} must be a VOLUME"
    );
    let state_mount = mounts(svc)
        .into_iter()
        .find(|m| m.target == state)
        .unwrap_or_else(|| panic!("{COMPOSE}: {rws_name} does not mount a volume at {state}"));
    assert!(!state_mount.bind, "state_dir should be a named volume");
    let state_dir = tmp.path().join("state");
    rewritten.insert("state_dir".into(), state_dir.display().to_string());

    // admin_token_file: a compose secret the service uses; its file, here.
    let token_file = str_key("admin_token_file");
    let secret = token_file
        .strip_prefix("/run/secrets/")
        .unwrap_or_else(|| panic!("admin_token_file {token_file} is not a compose secret"));
    let uses: Vec<&str> = svc["secrets"]
        .as_sequence()
        .into_iter()
        .flatten()
        .filter_map(|s| s.as_str())
        .collect();
    assert!(
        uses.contains(&secret),
        "{COMPOSE}: {rws_name} does not use the secret {secret}"
    );
    let token_src = host(str_of(&c["secrets"][secret]["file"], "the secret's file"));
    let token = std::fs::read_to_string(&token_src)
        .unwrap()
        .trim()
        .to_string();
    assert!(
        !token.is_empty() && !token.contains(char::is_whitespace),
        "{}: the token file holds the token alone",
        token_src.display()
    );
    let token_here = tmp.path().join("token");
    std::fs::copy(&token_src, &token_here).unwrap();
    rewritten.insert("admin_token_file".into(), token_here.display().to_string());

    // addr, metrics_addr: exposed, published, and scraped by Prometheus.
    let grpc_port = port(&str_key("addr"));
    let metrics_port = port(&str_key("metrics_addr"));
    let published = container_ports(svc);
    let exposed: BTreeSet<u16> = final_all(&df, "EXPOSE")
        .iter()
        .map(|p| p.split('/').next().unwrap().parse().unwrap())
        .collect();
    for (what, p) in [("addr", grpc_port), ("metrics_addr", metrics_port)] {
        assert!(
            published.contains(&p),
            "{COMPOSE} does not publish {what} port {p}"
        );
        assert!(
            exposed.contains(&p),
            "{DOCKERFILE} does not EXPOSE {what} port {p}"
        );
        rewritten.insert(what.into(), "127.0.0.1:0".into());
    }
    let targets = prometheus_targets(&c);
    assert!(
        targets.contains(&(format!("{rws_name}:{metrics_port}"), "/metrics".into())),
        "Prometheus must scrape {rws_name}:{metrics_port}/metrics, not {targets:?}"
    );

    for (k, v) in &config {
        assert!(
            rewritten.contains_key(k) || !v.as_str().is_some_and(|s| s.starts_with('/')),
            "{config_src}: {k} = {v} is a container path this test does not map"
        );
    }
    for (k, v) in rewritten {
        config.insert(k, toml::Value::String(v));
    }
    let config_here = tmp.path().join("rws.toml");
    std::fs::write(&config_here, toml::to_string(&config).unwrap()).unwrap();
    args[at + 1] = config_here.display().to_string();

    Here {
        args,
        env: environment(svc),
        config,
        token,
        state_dir,
        stop_grace: svc["stop_grace_period"]
            .as_str()
            .map(compose_duration)
            .unwrap_or(Duration::from_secs(10)),
        tmp,
    }
}

/// The rws process (killed on drop) and where its stderr goes.
struct Server {
    child: std::process::Child,
    addr: String,
    metrics: String,
    stderr: PathBuf,
}

impl Server {
    /// The real binary with `here`'s arguments and environment; returns once
    /// it listens, or fails with its stderr (an unknown flag, a bad value).
    fn start(here: &Here) -> Server {
        let stderr = here.tmp.path().join("stderr");
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_rws"))
            .args(&here.args)
            .env_remove("RUST_LOG")
            .envs(here.env.iter().cloned())
            .stdout(std::process::Stdio::piped())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .unwrap();
        let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
        let (mut addr, mut metrics) = (String::new(), String::new());
        while addr.is_empty() || metrics.is_empty() {
            let mut line = String::new();
            if stdout.read_line(&mut line).unwrap() == 0 {
                let status = child.wait().unwrap();
                panic!(
                    "rws {:?} exited before listening ({status}); stderr:\n{}",
                    here.args,
                    std::fs::read_to_string(&stderr).unwrap_or_default()
                );
            }
            if let Some(a) = line.trim().strip_prefix("rws listening on ") {
                addr = format!("http://{a}");
            } else if let Some(m) = line.trim().strip_prefix("rws metrics on ") {
                metrics = m.to_string();
            }
        }
        Server {
            child,
            addr,
            metrics,
            stderr,
        }
    }

    async fn serving_channel(&self) -> tonic::transport::Channel {
        use tonic_health::pb::{
            HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
        };
        let channel = tonic::transport::Channel::from_shared(self.addr.clone())
            .unwrap()
            .connect()
            .await
            .unwrap();
        let until = Instant::now() + Duration::from_secs(30);
        let mut health = HealthClient::new(channel.clone());
        loop {
            let r = health
                .check(HealthCheckRequest {
                    service: String::new(),
                })
                .await
                .unwrap();
            if r.into_inner().status() == ServingStatus::Serving {
                return channel;
            }
            assert!(Instant::now() < until, "never became SERVING");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// `docker stop`: SIGTERM, then SIGKILL once `grace` has passed.
    async fn stop_like_docker(&mut self, grace: Duration) -> std::process::ExitStatus {
        let stop = Instant::now();
        let ok = std::process::Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -TERM failed");
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            assert!(stop.elapsed() < grace, "not stopped within {grace:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Answers on two profiles, a NOT_FOUND, and an Admin change (refused
/// without the token, accepted with it), so every counter and histogram exists.
async fn traffic(channel: &tonic::transport::Channel, token: &str) {
    let mut inference = common::InferenceClient::new(channel.clone());
    for i in 0..3 {
        for profile in ["", "fog"] {
            inference
                .classify(common::tensor_request(i, profile))
                .await
                .unwrap();
        }
    }
    let err = inference
        .classify(common::tensor_request(0, "no-such-profile"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let put = |token: Option<&str>| {
        let mut admin = admin_client(channel.clone(), token).unwrap();
        async move {
            admin
                .put_profile(pb::PutProfileRequest {
                    name: "storm".into(),
                    signatures: common::refs(&[("fog", 0.5), ("rain", 0.5)]),
                    replace: false,
                    ..Default::default()
                })
                .await
        }
    };
    let refused = put(None).await.unwrap_err();
    assert_eq!(
        refused.code(),
        Code::Unauthenticated,
        "admin_token_file is in force"
    );
    put(Some(token)).await.unwrap();
    inference
        .classify(common::tensor_request(7, "storm"))
        .await
        .unwrap();
}

/// Every metric and label the dashboard queries is in the scrape.
fn check_dashboard_queries(scrape: &str) {
    let scraped = samples(scrape);
    let exprs = exprs(&dashboard());
    assert!(
        exprs.len() >= 9,
        "the dashboard has {} queries",
        exprs.len()
    );
    for expr in &exprs {
        let (metrics, labels) = promql_names(expr);
        assert!(!metrics.is_empty(), "`{expr}` queries no rws metric");
        for m in &metrics {
            assert!(
                scraped.iter().any(|(n, _)| n == m),
                "`{expr}`: {m} is not in the scrape"
            );
        }
        for l in &labels {
            assert!(
                scraped
                    .iter()
                    .any(|(n, ls)| metrics.contains(n) && ls.contains_key(l)),
                "`{expr}`: no sample of {metrics:?} has the label {l}"
            );
        }
    }
}

#[tokio::test]
async fn the_image_command_serves_with_the_shipped_config_and_feeds_the_dashboard() {
    let here = image_command_here();
    let mut server = Server::start(&here);
    let channel = server.serving_channel().await;
    traffic(&channel, &here.token).await;
    assert!(
        std::fs::read_dir(&here.state_dir).unwrap().next().is_some(),
        "state_dir holds nothing after a change"
    );
    check_dashboard_queries(&common::http_get(&server.metrics).await);

    // docker stop leaves room for the drain, and the server exits cleanly.
    let drain = Duration::from_millis(here.config["drain_grace_ms"].as_integer().unwrap() as u64);
    assert!(
        here.stop_grace > drain + Duration::from_secs(5),
        "{COMPOSE}: stop_grace_period {:?} leaves too little room for drain_grace_ms {drain:?}",
        here.stop_grace
    );
    let status = server.stop_like_docker(here.stop_grace).await;
    assert!(status.success(), "exit status {status}");

    // With log_format = "json", what the server logs (at the compose file's
    // RUST_LOG) is one JSON object per line.
    if here.config.get("log_format").and_then(|v| v.as_str()) == Some("json") {
        let logs = std::fs::read_to_string(&server.stderr).unwrap();
        for line in logs.lines().filter(|l| !l.trim().is_empty()) {
            let v: serde_json::Value =
                serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
            assert!(v.is_object(), "{line}");
        }
    }
}

// ---- Grafana ---------------------------------------------------------------

/// The provisioning files of one kind (`datasources`, `dashboards`) as Grafana
/// sees them through the compose mounts.
fn grafana_provisioning(c: &Yaml, kind: &str) -> Vec<Yaml> {
    let (_, grafana) = service_by_image(c, "grafana/grafana");
    let dir = host_path_in(grafana, &format!("/etc/grafana/provisioning/{kind}"))
        .unwrap_or_else(|| panic!("grafana does not mount /etc/grafana/provisioning/{kind}"));
    let mut out = Vec::new();
    for e in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = e.unwrap().path();
        if path.extension().is_some_and(|x| x == "yml" || x == "yaml") {
            out.push(yaml_file(&path));
        }
    }
    assert!(
        !out.is_empty(),
        "no {kind} provisioning files in {}",
        dir.display()
    );
    out
}

#[test]
fn dashboard_uses_the_provisioned_datasource_and_is_provisioned() {
    let c = compose();
    // The datasource: Prometheus, reached by its compose service name.
    let sources: Vec<Yaml> = grafana_provisioning(&c, "datasources")
        .iter()
        .flat_map(|f| f["datasources"].as_sequence().cloned().unwrap_or_default())
        .collect();
    let prom: Vec<&Yaml> = sources
        .iter()
        .filter(|s| s["type"].as_str() == Some("prometheus"))
        .collect();
    assert_eq!(prom.len(), 1, "one Prometheus datasource");
    let uid = str_of(&prom[0]["uid"], "the datasource uid");
    let url = str_of(&prom[0]["url"], "the datasource url");
    let (prom_name, _) = service_by_image(&c, "prom/prometheus");
    assert_eq!(
        url,
        format!("http://{prom_name}:9090"),
        "the datasource url"
    );

    // The dashboard: parses, and every panel and query uses that uid.
    let d = dashboard();
    assert!(d["schemaVersion"].as_u64().unwrap() >= 36, "schemaVersion");
    assert!(!d["uid"].as_str().unwrap().is_empty(), "dashboard uid");
    let panels = dashboard_panels(&d);
    assert!(panels.len() >= 9, "{} panels", panels.len());
    let mut ids = BTreeSet::new();
    for p in panels {
        let title = p["title"].as_str().unwrap_or("?");
        assert!(
            ids.insert(p["id"].as_u64().expect("panel id")),
            "duplicate id: {title}"
        );
        assert!(p["gridPos"].is_object(), "{title}: gridPos");
        if p["type"] == "row" {
            continue;
        }
        assert_eq!(p["datasource"]["uid"], uid, "{title}: panel datasource");
        let targets = p["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "{title}: no queries");
        for t in targets {
            if !t["datasource"].is_null() {
                assert_eq!(t["datasource"]["uid"], uid, "{title}: query datasource");
            }
            assert!(t["expr"].is_string(), "{title}: a query without expr");
        }
    }

    // The dashboard provider's path holds rws.json, through Grafana's mounts.
    let (_, grafana) = service_by_image(&c, "grafana/grafana");
    let providers: Vec<Yaml> = grafana_provisioning(&c, "dashboards")
        .iter()
        .flat_map(|f| f["providers"].as_sequence().cloned().unwrap_or_default())
        .collect();
    assert!(!providers.is_empty(), "no dashboard provider");
    let found = providers.iter().any(|p| {
        let path = str_of(&p["options"]["path"], "a provider path");
        host_path_in(grafana, path).is_some_and(|dir| {
            dir.join("rws.json").is_file()
                && dir.canonicalize().unwrap()
                    == root()
                        .join("deploy/grafana/dashboards")
                        .canonicalize()
                        .unwrap()
        })
    });
    assert!(
        found,
        "no dashboard provider reads deploy/grafana/dashboards/rws.json"
    );
}

#[test]
fn dockerignore_rules_match_like_docker() {
    let rules = vec![
        (false, vec!["target".to_string()]),
        (false, vec!["**".to_string(), "*.pyc".to_string()]),
        (false, vec!["*.md".to_string()]),
        (false, vec!["data".to_string()]),
        (true, vec!["data".to_string(), "keep".to_string()]),
    ];
    assert!(ignored(&rules, "target/release/rws"));
    assert!(ignored(&rules, "a/b/c.pyc"));
    assert!(ignored(&rules, "README.md"));
    assert!(!ignored(&rules, "docs/README.md"));
    assert!(ignored(&rules, "data/x"));
    assert!(!ignored(&rules, "data/keep"));
    assert!(!ignored(&rules, "src/main.rs"));
}

/// `rws ARGS --help` exits 0 only if every flag before `--help` (the config
/// file's entries included) is known and its value parses.
fn assert_flags_parse(args: &[String], what: &str) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_rws"))
        .args(args)
        .arg("--help")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{what}: rws {args:?} does not parse: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn fleet_replicas_and_kubernetes_config_parse() {
    let c = compose();
    let df = dockerfile();
    let mut checked = 0;
    for (name, s) in services(&c) {
        let is_rws = s["image"].as_str().is_some_and(|i| i.starts_with("rws"));
        let Some(mut args) = argv(&s["command"]).filter(|_| is_rws) else {
            continue;
        };
        // The image's config paths, read from where the Dockerfile copies them.
        for a in &mut args {
            if let Some(src) = image_source(&df, a) {
                *a = root().join(src).display().to_string();
            }
        }
        assert_flags_parse(&args, &format!("{COMPOSE} service {name}"));
        checked += 1;
    }
    assert!(checked >= 2, "{COMPOSE}: the fleet replicas");

    let k8s = read("deploy/k8s/rws.yaml");
    let config = k8s
        .split("\n---")
        .map(|doc| serde_norway::from_str::<Yaml>(doc).unwrap())
        .find(|d| d["kind"].as_str() == Some("ConfigMap"))
        .expect("deploy/k8s/rws.yaml: a ConfigMap");
    let toml = str_of(&config["data"]["rws.toml"], "rws.toml").to_string();
    assert!(
        toml.contains("etcd://"),
        "the etcd address lives in the ConfigMap"
    );
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("rws.toml");
    std::fs::write(&file, toml).unwrap();
    let args = ["serve", "--config", file.to_str().unwrap()].map(String::from);
    assert_flags_parse(&args, "deploy/k8s/rws.yaml");
}
