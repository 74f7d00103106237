//! The Python that tests drive: third-party clients against the server, and
//! the independent references (onnxruntime, NumPy) that rws's outputs are
//! checked against.

use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// What the scripts import; a Python without them cannot run the tests.
const IMPORTS: &str = "import tritonclient.grpc, grpc_tools.protoc, grpc_reflection.v1alpha, \
                       onnx, onnxruntime, PIL, safetensors";
/// Longest a script may run.
const TIMEOUT: Duration = Duration::from_secs(120);

/// The interpreter with the test clients: `RWS_PYTHON`, else `.venv/bin/python`.
pub fn python() -> Option<PathBuf> {
    let candidate = std::env::var_os("RWS_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python"));
    let usable = Command::new(&candidate)
        .args(["-c", IMPORTS])
        .output()
        .is_ok_and(|o| o.status.success());
    if usable {
        return Some(candidate);
    }
    let why = format!(
        "{} cannot `{IMPORTS}`; run scripts/test.sh, which installs tests/python/requirements.txt into .venv",
        candidate.display()
    );
    assert!(
        std::env::var("RWS_REQUIRE_PYTHON").as_deref() != Ok("1"),
        "{why}"
    );
    // Straight to stderr: the test harness captures eprintln! of passing tests.
    let _ = writeln!(std::io::stderr(), "skipped: {why}");
    None
}

/// Runs `cmd` to completion (killed after [`TIMEOUT`]): success, stdout, stderr.
pub fn run(cmd: &mut Command) -> (bool, String, String) {
    let (mut out, mut err) = (tempfile::tempfile().unwrap(), tempfile::tempfile().unwrap());
    let mut child = cmd
        .stdout(out.try_clone().unwrap())
        .stderr(err.try_clone().unwrap())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
    let start = Instant::now();
    let ok = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status.success();
        }
        if start.elapsed() > TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            break false;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let read = |f: &mut std::fs::File| {
        let mut s = String::new();
        f.rewind().unwrap();
        f.read_to_string(&mut s).unwrap();
        s
    };
    (ok, read(&mut out), read(&mut err))
}

/// Runs `cmd`, failing the test with its output unless it succeeds; its stdout.
pub fn ok(cmd: &mut Command) -> String {
    let (ok, out, err) = run(cmd);
    assert!(ok, "{cmd:?} failed:\n{out}\n{err}");
    out
}
