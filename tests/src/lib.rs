//! Harness for end-to-end tests: finds the built binaries, starts agents,
//! waits for their sockets, runs real clients and compares images.
//!
//! The binaries must be built first (`cargo build --bins`, which the test
//! script does); a missing binary or client tool fails with a message that
//! names it.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Directory holding the workspace's built binaries (next to `deps/`).
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let mut d = exe.parent().expect("exe dir").to_path_buf();
    if d.ends_with("deps") {
        d.pop();
    }
    d
}

/// Path of a workspace binary, failing clearly if it was not built.
pub fn bin(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    assert!(
        p.exists(),
        "{} not built: run `cargo build --bins` before the tests",
        p.display()
    );
    p
}

/// Fail clearly if an external tool is missing.
pub fn need_tool(tool: &str) {
    let ok = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(ok, "{tool} is not installed (CI installs it: see .ci/run)");
}

/// Run a command to completion with a timeout; panic with its output on failure.
pub fn run_ok(cmd: &mut Command, timeout: Duration) -> Output {
    let out = run(cmd, timeout);
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Run a command with a timeout (killed past it) and return its output.
/// Output is drained while the command runs, so a chatty command cannot
/// block on a full pipe.
pub fn run(cmd: &mut Command, timeout: Duration) -> Output {
    use std::io::Read;
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    let drain = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut v = Vec::new();
            let _ = r.read_to_end(&mut v);
            v
        })
    };
    let out_t = drain(Box::new(child.stdout.take().expect("stdout")));
    let err_t = drain(Box::new(child.stderr.take().expect("stderr")));
    let start = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().expect("try_wait") {
            break st;
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            let (o, e) = (out_t.join().unwrap_or_default(), err_t.join().unwrap_or_default());
            panic!(
                "{cmd:?} timed out after {timeout:?}\nstdout: {}\nstderr: {}",
                String::from_utf8_lossy(&o),
                String::from_utf8_lossy(&e)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Output {
        status,
        stdout: out_t.join().unwrap_or_default(),
        stderr: err_t.join().unwrap_or_default(),
    }
}

/// Wait until `path` exists (a socket being bound), or panic.
pub fn wait_for_path(path: &Path, timeout: Duration) {
    let start = Instant::now();
    while !path.exists() {
        assert!(
            start.elapsed() < timeout,
            "{} did not appear within {timeout:?}",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A running `tidemark-agent protect`, killed on drop.
pub struct Agent {
    pub child: Child,
    pub disk: PathBuf,
    pub state: PathBuf,
    pub sock: PathBuf,
    pub log: PathBuf,
}

impl Agent {
    /// Start an agent on `disk` with state in `state`, serving `sock`.
    /// `extra` are additional flags (e.g. `--create-size 64M`).
    pub fn start(disk: &Path, state: &Path, sock: &Path, extra: &[&str]) -> Agent {
        let log = state.with_extension("log");
        let logf = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .expect("agent log");
        let _ = std::fs::remove_file(state.join("control.sock"));
        let child = Command::new(bin("tidemark-agent"))
            .arg("protect")
            .arg("--disk")
            .arg(disk)
            .arg("--state")
            .arg(state)
            .arg("--listen")
            .arg(format!("unix:{}", sock.display()))
            .args(extra)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(logf)
            .spawn()
            .expect("spawn tidemark-agent");
        let a = Agent {
            child,
            disk: disk.into(),
            state: state.into(),
            sock: sock.into(),
            log,
        };
        a.wait_ready();
        a
    }

    fn wait_ready(&self) {
        let start = Instant::now();
        while !(self.sock.exists() && self.state.join("control.sock").exists()) {
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "agent did not start; log:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The NBD URI of this agent's export.
    pub fn uri(&self) -> String {
        format!("nbd+unix:///?socket={}", self.sock.display())
    }

    /// The agent's log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Status JSON from `tidemark agent-status --json`.
    pub fn status(&self) -> serde_json::Value {
        let out = run_ok(
            Command::new(bin("tidemark"))
                .arg("agent-status")
                .arg("--agent")
                .arg(&self.state)
                .arg("--json"),
            Duration::from_secs(20),
        );
        serde_json::from_slice(&out.stdout).expect("status JSON")
    }

    /// SIGTERM and wait for a clean exit (status 0).
    pub fn stop(mut self) {
        run_ok(
            Command::new("kill").arg("-TERM").arg(self.child.id().to_string()),
            Duration::from_secs(5),
        );
        let start = Instant::now();
        loop {
            if let Some(st) = self.child.try_wait().expect("try_wait") {
                assert!(st.success(), "agent exited with {st}; log:\n{}", self.log_text());
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "agent did not stop on SIGTERM; log:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        std::mem::forget(self);
    }

    /// kill -9, as a crash.
    pub fn kill9(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        std::mem::forget(self);
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Create a sparse file of `size` bytes.
pub fn sparse_file(path: &Path, size: u64) {
    let f = std::fs::File::create(path).expect("create");
    f.set_len(size).expect("set_len");
}

/// `qemu-img compare` two raw images; panics with its output if they differ.
pub fn assert_identical(a: &Path, b: &Path) {
    let out = run(
        Command::new("qemu-img")
            .args(["compare", "-f", "raw", "-F", "raw"])
            .arg(a)
            .arg(b),
        Duration::from_secs(120),
    );
    assert!(
        out.status.success(),
        "{} and {} differ: {}{}",
        a.display(),
        b.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Replay the agent's journal onto a copy of `pre` and check it equals the disk.
pub fn assert_replay_matches(state: &Path, pre: &Path, disk: &Path) {
    let copy = pre.with_extension("replayed");
    run_ok(
        Command::new("cp").arg("--sparse=always").arg(pre).arg(&copy),
        Duration::from_secs(120),
    );
    run_ok(
        Command::new(bin("tidemark"))
            .args(["journal", "replay", "--state"])
            .arg(state)
            .arg("--onto")
            .arg(&copy),
        Duration::from_secs(300),
    );
    assert_identical(&copy, disk);
    let _ = std::fs::remove_file(&copy);
}
