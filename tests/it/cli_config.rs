//! `keygate check-config` (DESIGN.md section 1): exit 0 for a valid file; exit 2
//! and one line on stderr naming file:line:column and the field for a bad one.
//! Runs the real binary.

use std::path::Path;
use std::process::{Command, Output};

/// Runs `keygate check-config --config <path>` with no `KEYGATE_*` variables
/// (they would override the file), and returns the command line and output.
fn check_config(path: &Path) -> (String, Output) {
    let bin = env!("CARGO_BIN_EXE_keygate");
    let mut cmd = Command::new(bin);
    cmd.arg("check-config").arg("--config").arg(path);
    cmd.current_dir(env!("CARGO_MANIFEST_DIR"));
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("KEYGATE_") {
            cmd.env_remove(name);
        }
    }
    let shown = format!("{bin} check-config --config {}", path.display());
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {shown}: {e}"));
    (shown, out)
}

fn explain(cmd: &str, out: &Output) -> String {
    format!(
        "command: {cmd}\nexit: {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Writes `yaml` to a temp file, runs check-config on it and checks: exit code
/// 2, and stderr is one line holding `<file>:<line>:<col>: ` and `field`.
fn assert_rejected(yaml: &str, line_col: &str, field: &str) {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("keygate.yaml");
    std::fs::write(&path, yaml).expect("write config");
    let (cmd, out) = check_config(&path);
    let why = explain(&cmd, &out);
    assert_eq!(out.status.code(), Some(2), "expected exit code 2\n{why}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "expected one line on stderr\n{why}");
    let expected = format!("{}:{line_col}: {field}", path.display());
    assert!(
        lines[0].contains(&expected),
        "expected stderr to contain {expected:?}\n{why}"
    );
    assert!(!stderr.contains("panicked"), "{why}");
}

#[test]
fn unknown_field_is_one_line_with_location_and_path() {
    let yaml = "listen: 127.0.0.1:0\nadmin:\n  listen: 127.0.0.1:0\n  tokenz: []\n";
    assert_rejected(yaml, "4:3", "admin.tokenz: unknown field");
}

#[test]
fn bad_url_is_one_line_with_location_and_path() {
    let yaml = "routes:\n  - name: api\n    match: { path_prefix: /api/ }\n    upstream: htp://x\n";
    assert_rejected(yaml, "4:15", "routes[0].upstream: invalid URL \"htp://x\"");
}

#[test]
fn bad_duration_is_one_line_with_location_and_path() {
    let yaml = "cache:\n  ttl: 30 seconds\n";
    assert_rejected(yaml, "2:8", "cache.ttl: invalid duration \"30 seconds\"");
}

#[test]
fn the_example_config_is_valid() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/keygate.yaml");
    let (cmd, out) = check_config(&path);
    assert_eq!(out.status.code(), Some(0), "{}", explain(&cmd, &out));
}
