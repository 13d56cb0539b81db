//! Harness for end-to-end tests: finds the built binaries, starts agents,
//! waits for their sockets, runs real clients and compares images.
//!
//! The binaries must be built first (`cargo build --bins`, which the test
//! script does); a missing binary or client tool fails with a message that
//! names it.

pub mod pipe;
pub mod recovery;

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
        Self::start_env(disk, state, sock, extra, &[])
    }

    /// As [`Agent::start`], with extra environment (e.g. `FAILPOINTS`).
    pub fn start_env<S: AsRef<std::ffi::OsStr>>(
        disk: &Path,
        state: &Path,
        sock: &Path,
        extra: &[S],
        env: &[(&str, &str)],
    ) -> Agent {
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
            .envs(env.iter().copied())
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

/// `qemu-img compare` two raw images; Err with its output if they differ.
pub fn compare(a: &Path, b: &Path) -> Result<(), String> {
    let out = run(
        Command::new("qemu-img")
            .args(["compare", "-f", "raw", "-F", "raw"])
            .arg(a)
            .arg(b),
        Duration::from_secs(120),
    );
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{} and {} differ: {}{}",
            a.display(),
            b.display(),
            String::from_utf8_lossy(&out.stdout).trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// `qemu-img compare` two raw images; panics with its output if they differ.
pub fn assert_identical(a: &Path, b: &Path) {
    if let Err(e) = compare(a, b) {
        panic!("{e}");
    }
}

/// `cp --sparse=always from to`, within `timeout`.
pub fn copy_sparse(from: &Path, to: &Path, timeout: Duration) {
    run_ok(Command::new("cp").arg("--sparse=always").arg(from).arg(to), timeout);
}

/// Replay the agent's journal onto a copy of `pre` and check it equals the disk.
pub fn assert_replay_matches(state: &Path, pre: &Path, disk: &Path) {
    let copy = pre.with_extension("replayed");
    copy_sparse(pre, &copy, Duration::from_secs(120));
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

/// A free loopback TCP port (bound, then released for a service to take).
///
/// Chosen below the kernel's ephemeral range (32768-60999 by default), so
/// that no outgoing connection of a concurrent test can take it between
/// this check and the service's bind (`bind(":0")` would hand out exactly
/// such a port), and spread by process id so that concurrent test
/// processes try different ports first.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    const BASE: u32 = 20_000;
    const SPAN: u32 = 12_000;
    let seed = std::process::id().wrapping_mul(2_654_435_761) % SPAN;
    for _ in 0..SPAN {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = u16::try_from(BASE + (seed + n.wrapping_mul(7)) % SPAN).expect("a port below 32000");
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// A running collector or target daemon, killed on drop.
pub struct Service {
    pub child: Child,
    pub name: String,
    pub args: Vec<String>,
    pub log: PathBuf,
    /// The port that says it is ready once it accepts connections.
    pub ready_port: u16,
    pub env: Vec<(String, String)>,
}

impl Service {
    /// Start `bin_name` with `args`, logging (appending) to `log`, and wait
    /// until `ready_port` on 127.0.0.1 accepts connections.
    pub fn start(bin_name: &str, args: &[String], log: &Path, ready_port: u16) -> Service {
        Self::start_env(bin_name, args, log, ready_port, &[])
    }

    /// As [`Service::start`], with extra environment (e.g. `FAILPOINTS`).
    pub fn start_env(bin_name: &str, args: &[String], log: &Path, ready_port: u16, env: &[(&str, &str)]) -> Service {
        let mut s = Service {
            child: Self::spawn(bin_name, args, log, env),
            name: bin_name.into(),
            args: args.to_vec(),
            log: log.into(),
            ready_port,
            env: env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        };
        s.wait_ready();
        s
    }

    fn spawn(bin_name: &str, args: &[String], log: &Path, env: &[(&str, &str)]) -> Child {
        let logf = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .expect("service log");
        let mut c = Command::new(bin(bin_name));
        c.args(args).env("RUST_LOG", "info").stdout(Stdio::null()).stderr(logf);
        for (k, v) in env {
            c.env(k, v);
        }
        c.spawn().unwrap_or_else(|e| panic!("spawn {bin_name}: {e}"))
    }

    fn wait_ready(&mut self) {
        let start = Instant::now();
        loop {
            if std::net::TcpStream::connect(("127.0.0.1", self.ready_port)).is_ok() {
                return;
            }
            if let Ok(Some(st)) = self.child.try_wait() {
                panic!(
                    "{} exited with {st} while starting; log:\n{}",
                    self.name,
                    self.log_text()
                );
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "{} did not start listening on port {}; log:\n{}",
                self.name,
                self.ready_port,
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Whether the process is still running.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// kill -9 (if still running) and reap.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// kill -9, then start again with the same arguments but `env`.
    pub fn restart_env(&mut self, env: &[(&str, &str)]) {
        self.kill9();
        self.child = Self::spawn(&self.name, &self.args, &self.log, env);
        self.env = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        self.wait_ready();
    }

    /// kill -9 and start again with the same arguments (no failpoints).
    pub fn restart(&mut self) {
        self.restart_env(&[]);
    }

    /// SIGTERM and wait for a clean exit.
    pub fn stop(&mut self) {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let start = Instant::now();
        loop {
            if let Ok(Some(st)) = self.child.try_wait() {
                assert!(
                    st.success(),
                    "{} exited with {st}; log:\n{}",
                    self.name,
                    self.log_text()
                );
                return;
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "{} did not stop on SIGTERM; log:\n{}",
                self.name,
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Peak resident set size (VmHWM) in bytes, from /proc.
    pub fn peak_rss(&self) -> u64 {
        proc_kib(self.child.id(), "VmHWM:") * 1024
    }

    /// Current resident set size (VmRSS) in bytes, from /proc.
    pub fn rss(&self) -> u64 {
        proc_kib(self.child.id(), "VmRSS:") * 1024
    }
}

fn proc_kib(pid: u32, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

impl Drop for Service {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Write a secret file (a token) its owner alone may read, as the
/// services require.
pub fn write_secret(path: &Path, text: &str) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, text).expect("write a secret file");
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).expect("chmod 600");
}

/// The test deployment's CA (made once, in `dir/pki/ca`) and an identity
/// of it, `name` as `role` (issued once, into `dir/pki/ROLE-NAME`): the
/// folder a service's `--tls` takes. Every service of a test under `dir`
/// trusts the same CA, as one deployment's do.
pub fn tls_identity(dir: &Path, role: &str, name: &str) -> PathBuf {
    let pki = dir.join("pki");
    let ca = pki.join("ca");
    if !ca.join("ca.pem").exists() {
        std::fs::create_dir_all(&pki).expect("pki folder");
        run_ok(
            Command::new(bin("tidemark")).args(["ca", "init", "--dir"]).arg(&ca),
            Duration::from_secs(60),
        );
    }
    // The `tidemark` tools this test runs reach the collector's API over
    // HTTPS with this CA (one CA per test directory).
    std::env::set_var("TIDEMARK_API_CA", ca.join("ca.pem"));
    let out = pki.join(format!("{role}-{name}"));
    if !out.join("cert.pem").exists() {
        run_ok(
            Command::new(bin("tidemark"))
                .args(["ca", "issue", "--ca"])
                .arg(&ca)
                .args([name, "--role", role, "--out"])
                .arg(&out),
            Duration::from_secs(60),
        );
    }
    out
}

/// `--tls` with the test identity `name` as `role`, or
/// `--insecure-plaintext`.
fn security_flags(dir: &Path, role: &str, name: &str, plaintext: bool) -> Vec<String> {
    if plaintext {
        vec!["--insecure-plaintext".into()]
    } else {
        vec!["--tls".into(), tls_identity(dir, role, name).display().to_string()]
    }
}

/// A target and a collector on loopback, sharing one token, under `dir`.
pub struct Site {
    pub dir: PathBuf,
    pub token_file: PathBuf,
    pub target: Service,
    pub collector: Service,
    pub target_port: u16,
    pub collector_port: u16,
    pub api_port: u16,
    /// Started with --insecure-plaintext (tests that speak the wire
    /// format to the listeners themselves); else mutual TLS.
    pub plaintext: bool,
}

impl Site {
    /// Start a target (data in `dir/data`) and a collector (spool in
    /// `dir/spool`) with `collector_extra` flags (e.g. `--spool-cap 64M`).
    pub fn start(dir: &Path, collector_extra: &[&str]) -> Site {
        Self::start_with(dir, &[], collector_extra)
    }

    /// As [`Site::start`], with `target_extra` flags for the target too
    /// (e.g. `--retention-window 10s`, `--format vmdk-flat`).
    pub fn start_with(dir: &Path, target_extra: &[&str], collector_extra: &[&str]) -> Site {
        Self::start_secured(dir, target_extra, collector_extra, false)
    }

    /// As [`Site::start`], but both hops in clear text
    /// (`--insecure-plaintext`): for tests that send hand-made frames to
    /// the listeners (bad Hellos, truncated frames), which TLS would turn
    /// away before a frame is read. Its agents ship in clear text too.
    pub fn start_plaintext(dir: &Path, collector_extra: &[&str]) -> Site {
        Self::start_secured(dir, &[], collector_extra, true)
    }

    fn start_secured(dir: &Path, target_extra: &[&str], collector_extra: &[&str], plaintext: bool) -> Site {
        let token_file = dir.join("token");
        write_secret(&token_file, "test-secret-token\n");
        let (target_port, collector_port, api_port) = (free_port(), free_port(), free_port());
        let mut targs = Self::target_args(dir, &token_file, target_port, plaintext);
        targs.extend(target_extra.iter().map(|s| s.to_string()));
        let target = Service::start("tidemark-target", &targs, &dir.join("target.log"), target_port);
        let mut cargs = vec![
            "--listen".to_string(),
            format!("127.0.0.1:{collector_port}"),
            "--spool".into(),
            dir.join("spool").display().to_string(),
            "--target".into(),
            format!("127.0.0.1:{target_port}"),
            "--api".into(),
            format!("127.0.0.1:{api_port}"),
            "--token-file".into(),
            token_file.display().to_string(),
        ];
        cargs.extend(security_flags(dir, "collector", "c", plaintext));
        cargs.extend(collector_extra.iter().map(|s| s.to_string()));
        let collector = Service::start("tidemark-collector", &cargs, &dir.join("collector.log"), api_port);
        Site {
            dir: dir.into(),
            token_file,
            target,
            collector,
            target_port,
            collector_port,
            api_port,
            plaintext,
        }
    }

    fn target_args(dir: &Path, token: &Path, port: u16, plaintext: bool) -> Vec<String> {
        let mut v = vec![
            "--listen".into(),
            format!("127.0.0.1:{port}"),
            "--data".into(),
            dir.join("data").display().to_string(),
            "--token-file".into(),
            token.display().to_string(),
        ];
        v.extend(security_flags(dir, "target", "t", plaintext));
        v
    }

    /// Agent flags that ship to this site's collector (over mutual TLS,
    /// with the test's agent identity).
    pub fn agent_flags(&self) -> Vec<String> {
        vec![
            "--collector".into(),
            format!("127.0.0.1:{}", self.collector_port),
            "--token-file".into(),
            self.token_file.display().to_string(),
        ]
        .into_iter()
        .chain(security_flags(&self.dir, "agent", "a", self.plaintext))
        .collect()
    }

    /// The collector's API address (HTTPS over TLS: the tools trust the
    /// test's CA through `TIDEMARK_API_CA`).
    pub fn api(&self) -> String {
        let scheme = if self.plaintext { "http" } else { "https" };
        format!("{scheme}://127.0.0.1:{}", self.api_port)
    }

    /// `tidemark rebind` (the operator's leave for the disk's next Hello
    /// to rebind it), optionally to agent identity `owner`.
    pub fn allow_rebind(&self, disk_id: &str, owner: Option<&str>) -> String {
        let mut c = Command::new(bin("tidemark"));
        c.args(["rebind", disk_id, "--api", &self.api(), "--token-file"])
            .arg(&self.token_file);
        if let Some(o) = owner {
            c.args(["--owner", o]);
        }
        String::from_utf8_lossy(&run_ok(&mut c, Duration::from_secs(30)).stdout).into_owned()
    }

    /// Path of a disk's replica.
    pub fn replica(&self, disk_id: &str) -> PathBuf {
        self.dir.join("data").join(disk_id).join("replica.raw")
    }

    /// `tidemark wait` for `disk_id`; panics with both logs on failure.
    pub fn wait(&self, disk_id: &str, timeout: Duration) {
        let out = run(
            Command::new(bin("tidemark"))
                .args(["wait", "--api", &self.api(), disk_id, "--timeout"])
                .arg(format!("{}s", timeout.as_secs())),
            timeout + Duration::from_secs(30),
        );
        assert!(
            out.status.success(),
            "tidemark wait {disk_id} failed: {}{}\n--- collector log (tail):\n{}\n--- target log (tail):\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            tail(&self.collector.log_text(), 60),
            tail(&self.target.log_text(), 60)
        );
    }

    /// `tidemark status --json`, parsed.
    pub fn status(&self) -> serde_json::Value {
        let out = run_ok(
            Command::new(bin("tidemark")).args(["status", "--api", &self.api(), "--json"]),
            Duration::from_secs(30),
        );
        serde_json::from_slice(&out.stdout).expect("status JSON")
    }

    /// One disk's status object.
    pub fn disk_status(&self, disk_id: &str) -> serde_json::Value {
        self.status()["disks"]
            .as_array()
            .and_then(|a| a.iter().find(|d| d["disk_id"] == disk_id).cloned())
            .unwrap_or_else(|| panic!("disk {disk_id} not in status"))
    }
}

/// Send `request` (raw HTTP/1.1, `Connection: close`) to the collector's
/// API on `port`, over HTTPS with the CA of `TIDEMARK_API_CA` when `tls`;
/// returns everything the API answered.
pub fn raw_api(port: u16, tls: bool, request: &str) -> String {
    use std::io::{Read, Write};
    let mut c = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect to the API");
    c.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut out = Vec::new();
    if tls {
        let ca = std::env::var_os("TIDEMARK_API_CA").expect("TIDEMARK_API_CA (a TLS site sets it)");
        let config = tidemark_net::https::api_client_config(Path::new(&ca)).expect("API client config");
        let name = rustls::pki_types::ServerName::try_from("collector.tidemark").unwrap();
        let conn = rustls::ClientConnection::new(config, name).unwrap();
        let mut s = rustls::StreamOwned::new(conn, c);
        s.write_all(request.as_bytes()).expect("send the request");
        let _ = s.read_to_end(&mut out);
    } else {
        c.write_all(request.as_bytes()).expect("send the request");
        let _ = c.read_to_end(&mut out);
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The last `n` lines of `s`.
pub fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
