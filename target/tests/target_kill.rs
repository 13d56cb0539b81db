//! The binary: a `panic` failpoint aborts the process like kill -9, and a
//! restart serves the committed state.

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};

use common::*;

/// Start the binary; returns it and the address it logged.
fn spawn(dir: &std::path::Path, failpoints: &str) -> (Child, SocketAddr) {
    let token = dir.join("token");
    std::fs::write(&token, "\n s3cret \n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600)).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_tidemark-target"))
        .args(["--listen", "127.0.0.1:0", "--data"])
        .arg(dir.join("data"))
        .arg("--token-file")
        .arg(&token)
        // This test speaks frames itself.
        .arg("--insecure-plaintext")
        .current_dir(dir)
        .env("FAILPOINTS", failpoints)
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let addr = loop {
        let line = lines.next().expect("the target logs where it listens").unwrap();
        if let Some(rest) = line.split("listen=").nth(1) {
            break rest.split_whitespace().next().unwrap().parse().unwrap();
        }
    };
    // Keep draining stderr so the child never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    (child, addr)
}

#[tokio::test]
async fn a_panic_failpoint_kills_the_process_and_a_restart_keeps_the_commit() {
    let dir = tempfile::tempdir().unwrap();
    let (mut child, addr) = spawn(dir.path(), "target-before-ack=panic");
    let mut src = Source::new(1);
    let batch = vec![src.write(0, pattern(1, 8192)), src.write(4096, pattern(2, 100))];
    let (mut c, _, _) = Conn::open(addr, hello("vm", uuid(1), 0)).await;
    c.send_packed(&batch, 0).await;
    while let Some(f) = c.next().await {
        assert!(
            !matches!(f, tidemark_wire::frame::Frame::Ack { .. }),
            "no ack from a process that died before it"
        );
    }
    let status = child.wait().unwrap();
    assert!(!status.success());
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(6),
        "SIGABRT"
    );

    let (mut child, addr) = spawn(dir.path(), "");
    let (mut c, acked, _) = Conn::open(addr, hello("vm", uuid(1), 0)).await;
    assert_eq!(acked, 2, "committed before the ack that never went out");
    c.send_packed(&batch, 0).await;
    c.ack(2).await;
    assert_replica(&dir.path().join("data"), "vm", &src.disk);
    child.kill().unwrap();
    child.wait().unwrap();
}
