//! The `wsplice` binary as a user runs it: exit codes and what it prints.

use std::process::Command;

fn wsplice() -> Command {
    Command::new(env!("CARGO_BIN_EXE_wsplice"))
}

fn write_config(name: &str, text: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("wsplice-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

const GOOD: &str = r#"[[listener]]
address = "127.0.0.1:8080"

[[route]]
path = "/ws"
cluster = "websocketcluster"

[[cluster]]
name = "websocketcluster"
[[cluster.member]]
url = "ws://127.0.0.1:3001"
"#;

#[test]
fn check_accepts_a_good_config() {
    let path = write_config("good.toml", GOOD);
    let out = wsplice().args(["check", "-c"]).arg(&path).output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(": ok (1 listeners, 1 routes, 1 clusters)")
    );
}

#[test]
fn check_names_file_and_line_and_exits_64() {
    let path = write_config(
        "bad.toml",
        &GOOD.replace("path = \"/ws\"", "path = \"/ws\"\nweight = 3"),
    );
    let out = wsplice().args(["check", "-c"]).arg(&path).output().unwrap();
    assert_eq!(out.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.starts_with(&format!("{}:6: ", path.display())),
        "{stderr}"
    );
    assert!(stderr.contains("weight"), "{stderr}");
}

#[test]
fn run_rejects_bad_flags_with_64_before_serving() {
    let out = wsplice()
        .args([
            "run",
            "--listen",
            "127.0.0.1:0",
            "--member",
            "http://x:1",
            "--lbmethod",
            "random",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("command line: member \"http://x:1\""),
        "{stderr}"
    );
    assert!(stderr.contains("unknown lbmethod \"random\""), "{stderr}");
}

#[test]
fn a_missing_config_file_is_a_config_error() {
    let out = wsplice()
        .args(["check", "-c", "/nonexistent/wsplice.toml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("/nonexistent/wsplice.toml: cannot read")
    );
}

#[test]
fn the_example_config_in_the_readme_is_valid() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/wsplice.toml");
    let out = wsplice().args(["check", "-c", path]).output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `wsplice run` in the quick form with a TLS certificate and key.
fn quick_wss(cert: &std::path::Path, key: &std::path::Path) -> Command {
    let mut command = wsplice();
    command
        .args(["run", "--listen", "127.0.0.1:0"])
        .args(["--member", "ws://127.0.0.1:1"])
        .arg("--tls-cert")
        .arg(cert)
        .arg("--tls-key")
        .arg(key);
    command
}

#[test]
fn the_quick_form_serves_wss_with_the_given_certificate() {
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let cert = write_config("quick.pem", &certified.cert.pem());
    let key = write_config("quick.key", &certified.key_pair.serialize_pem());
    let mut child = quick_wss(&cert, &key)
        .env("RUST_LOG", "info")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(child.stderr.take().unwrap()));
    let listening = lines
        .by_ref()
        .map_while(Result::ok)
        .find(|line| line.contains("listening on"))
        .unwrap_or_default();
    child.kill().unwrap();
    let _ = child.wait();
    assert!(listening.contains("wss://"), "{listening}");

    // A key that does not belong to the certificate: 64, before serving.
    let other = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let wrong_key = write_config("other.key", &other.key_pair.serialize_pem());
    let out = quick_wss(&cert, &wrong_key).output().unwrap();
    assert_eq!(out.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("command line: --tls-cert/--tls-key: key")
            && stderr.contains("does not belong"),
        "{stderr}"
    );
}
