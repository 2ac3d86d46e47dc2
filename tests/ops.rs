//! Operations: the systemd units pass `systemd-analyze`, the install script stages and removes
//! cleanly and idempotently, and the process speaks the systemd notify protocol.

#![allow(clippy::unwrap_used)] // a test that unwraps an error it expects is the test

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

mod common;
use common::*;

const UNITS: &[&str] = &[
    "shopverse.service",
    "shopverse-gateway.service",
    "shopverse@.service",
];

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn units_verify_and_score_2_or_less() {
    let dir = tempfile::tempdir().unwrap();
    for unit in UNITS {
        // `verify` checks that ExecStart exists: point it at the binary under test.
        let text = std::fs::read_to_string(repo().join("systemd").join(unit))
            .unwrap()
            .replace("/usr/local/bin/shopverse", BIN);
        let path = dir.path().join(unit);
        std::fs::write(&path, text).unwrap();
        let out = Command::new("systemd-analyze")
            .args(["verify", "--man=no"])
            .arg(&path)
            .output()
            .expect("systemd-analyze (scripts/test installs it)");
        let said = String::from_utf8_lossy(&out.stderr).into_owned()
            + &String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && said.trim().is_empty(),
            "{unit}: {said}"
        );
        let out = Command::new("systemd-analyze")
            .args(["security", "--offline=yes"])
            .arg(&path)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        let line = text
            .lines()
            .find(|l| l.contains("Overall exposure level"))
            .unwrap_or_else(|| panic!("{unit}: {text}"));
        let score: f64 = line
            .split(':')
            .nth(1)
            .unwrap()
            .split_whitespace()
            .next()
            .unwrap()
            .parse()
            .unwrap();
        assert!(score <= 2.0, "{unit}: exposure {score}");
    }
}

fn install(root: &Path, extra: &[&str]) -> String {
    let out = Command::new("bash")
        .arg(repo().join("systemd/install.sh"))
        .args(["--root"])
        .arg(root)
        .args(["--binary", BIN])
        .args(extra)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn files(root: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut dirs = vec![root.to_path_buf()];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).unwrap().filter_map(Result::ok) {
            if e.path().is_dir() {
                dirs.push(e.path());
            } else {
                out.push(e.path().strip_prefix(root).unwrap().display().to_string());
            }
        }
    }
    out.sort();
    out
}

#[test]
fn install_is_idempotent_keeps_edits_and_uninstalls() {
    let root = tempfile::tempdir().unwrap();
    install(root.path(), &[]);
    let first = files(root.path());
    for must in [
        "usr/local/bin/shopverse",
        "etc/systemd/system/shopverse.service",
        "etc/systemd/system/shopverse@.service",
        "etc/shopverse/shopverse.toml",
        "etc/shopverse/distributed/orders.toml",
    ] {
        assert!(
            first.contains(&must.to_owned()),
            "{must} missing: {first:?}"
        );
    }
    install(root.path(), &[]);
    assert_eq!(files(root.path()), first, "a second run changes nothing");

    // An operator's edit survives a reinstall; the shipped file lands next to it.
    let conf = root.path().join("etc/shopverse/shopverse.toml");
    std::fs::write(&conf, "[data]\ndir = \"/srv/shop\"\n").unwrap();
    let said = install(root.path(), &[]);
    assert!(said.contains("kept your"), "{said}");
    assert_eq!(
        std::fs::read_to_string(&conf).unwrap(),
        "[data]\ndir = \"/srv/shop\"\n"
    );
    assert!(
        root.path()
            .join("etc/shopverse/shopverse.toml.dist")
            .exists()
    );

    install(root.path(), &["--uninstall"]);
    let left = files(root.path());
    assert!(
        !left
            .iter()
            .any(|f| f.starts_with("usr/local/bin") || f.starts_with("etc/systemd")),
        "{left:?}"
    );
    assert!(
        left.contains(&"etc/shopverse/shopverse.toml".to_owned()),
        "configuration stays"
    );
    install(root.path(), &["--uninstall", "--purge"]);
    assert!(files(root.path()).is_empty());
}

#[test]
fn speaks_the_systemd_notify_protocol() {
    let dir = tempfile::tempdir().unwrap();
    let sock_path = dir.path().join("notify.sock");
    let sock = std::os::unix::net::UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let sock_str = sock_path.display().to_string();
    let app = Appliance::start_with_env(
        dir.path(),
        &[],
        &[("NOTIFY_SOCKET", &sock_str), ("WATCHDOG_USEC", "200000")],
    );
    let mut got = String::new();
    let mut buf = [0u8; 4096];
    let t0 = Instant::now();
    while !(got.contains("READY=1") && got.contains("WATCHDOG=1")) {
        assert!(t0.elapsed() < Duration::from_secs(60), "{got}");
        let n = sock.recv(&mut buf).unwrap();
        got.push_str(&String::from_utf8_lossy(&buf[..n]));
        got.push('\n');
    }
    assert!(got.contains("STATUS=gateway="), "{got}");
    app.stop();
    let t0 = Instant::now();
    while !got.contains("STOPPING=1") {
        assert!(t0.elapsed() < Duration::from_secs(30), "{got}");
        let n = sock.recv(&mut buf).unwrap();
        got.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
}
