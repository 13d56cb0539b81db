//! Helpers shared by the recovery tests: the `tidemark` CLI, tags and
//! reference copies, `tidemark points`, views served by `tidemark mount`,
//! and mounts / loop devices / FUSE mounts undone on drop.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use rand::SeedableRng;

use crate::pipe::{s, seed, write_burst};
use crate::{bin, copy_sparse, run_ok, wait_for_path, Agent};

/// How long a CLI call, a view starting or stopping may take.
const T: Duration = Duration::from_secs(60);

/// The `tidemark` CLI.
pub fn tidemark() -> Command {
    Command::new(bin("tidemark"))
}

/// A command's stdout, trimmed.
pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

/// A command's stderr.
pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string()
}

/// `tidemark tag` with `extra` flags; the seq it printed.
pub fn tag(state: &Path, name: &str, extra: &[&str]) -> u64 {
    let o = run_ok(tidemark().args(["tag", "--agent", s(state), name]).args(extra), T);
    stdout(&o)
        .parse()
        .unwrap_or_else(|_| panic!("tag printed {:?}", stdout(&o)))
}

/// Write bursts and, at each of `rounds` moments, copy the source as a
/// reference and tag it (`round-N`); then `later` more bursts overwrite the
/// same regions. Returns (tag name, seq, reference copy).
pub fn tagged_workload(a: &Agent, d: &Path, size: u64, rounds: usize, later: usize) -> Vec<(String, u64, PathBuf)> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed());
    let mut refs = Vec::new();
    for r in 0..rounds {
        for _ in 0..3 {
            assert!(write_burst(&a.sock, size, &mut rng, 40));
        }
        // write_burst ends with a flush; nothing writes until the tag.
        let copy = d.join(format!("ref{r}.raw"));
        copy_sparse(&a.disk, &copy, T);
        let name = format!("round-{r}");
        let seq = tag(&a.state, &name, &[]);
        refs.push((name, seq, copy));
    }
    for _ in 0..later {
        assert!(write_burst(&a.sock, size, &mut rng, 40));
    }
    refs
}

/// `tidemark points --json`: the points as listed, oldest first.
pub fn points_json(data: &Path, disk: &str) -> Vec<serde_json::Value> {
    let o = run_ok(tidemark().args(["points", "--data", s(data), disk, "--json"]), T);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("points JSON");
    v["points"].as_array().expect("points array").clone()
}

/// A listed recovery point.
#[derive(Clone, Debug)]
pub struct Pt {
    pub seq: u64,
    pub kind: String,
    pub time: String,
}

/// `tidemark points --json`, parsed, oldest first.
pub fn points(data: &Path, disk: &str) -> Vec<Pt> {
    points_json(data, disk)
        .iter()
        .map(|p| Pt {
            seq: p["seq"].as_u64().expect("seq"),
            kind: p["kind"].as_str().expect("kind").to_string(),
            time: p["time"].as_str().expect("time").to_string(),
        })
        .collect()
}

/// A running `tidemark mount … --listen unix:SOCK`, stopped with SIGTERM
/// on drop.
pub struct Mount {
    pub child: Child,
    /// What it printed before `ready`.
    pub lines: Vec<String>,
    pub sock: PathBuf,
}

impl Mount {
    /// Start `tidemark mount <args> --listen unix:<sock>` and wait for its
    /// `ready` line; panics (with its stderr) if it exits first.
    pub fn start(args: &[&str], sock: &Path) -> Mount {
        let mut child = tidemark()
            .arg("mount")
            .args(args)
            .arg("--listen")
            .arg(format!("unix:{}", sock.display()))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn tidemark mount");
        let (tx, rx) = mpsc::channel();
        let out = child.stdout.take().expect("stdout");
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines().map_while(Result::ok) {
                let _ = tx.send(l);
            }
        });
        let err = child.stderr.take().expect("stderr");
        let (etx, erx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut s = String::new();
            let _ = std::io::Read::read_to_string(&mut BufReader::new(err), &mut s);
            let _ = etx.send(s);
        });
        let mut lines = Vec::new();
        let start = Instant::now();
        loop {
            match rx.recv_timeout(Duration::from_millis(100)) {
                Ok(l) if l == "ready" => break,
                Ok(l) => lines.push(l),
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let _ = child.wait();
                    panic!(
                        "tidemark mount {args:?} exited before ready: {lines:?}\n{}",
                        erx.recv_timeout(T).unwrap_or_default()
                    );
                }
            }
            if let Ok(Some(st)) = child.try_wait() {
                panic!(
                    "tidemark mount {args:?} exited ({st}) before ready: {lines:?}\n{}",
                    erx.recv_timeout(T).unwrap_or_default()
                );
            }
            assert!(start.elapsed() < T, "tidemark mount {args:?} not ready: {lines:?}");
        }
        Mount {
            child,
            lines,
            sock: sock.to_path_buf(),
        }
    }

    /// A view of `disk` (under `data`) at exactly `seq`.
    pub fn at_seq(data: &Path, disk: &str, seq: u64, sock: &Path) -> Mount {
        let m = Mount::start(&["--data", s(data), disk, "--at", &format!("seq:{seq}")], sock);
        assert!(
            m.lines.first().is_some_and(|l| l.contains(&format!("seq {seq},"))),
            "seq:{seq} opened {:?}",
            m.lines
        );
        m
    }

    /// The first line printed before `ready` ("" if none).
    pub fn first_line(&self) -> &str {
        self.lines.first().map_or("", String::as_str)
    }

    /// The NBD URI of the view.
    pub fn uri(&self) -> String {
        format!("nbd+unix:///?socket={}", self.sock.display())
    }

    /// Copy the export to `out` with nbdcopy, within `timeout`.
    pub fn copy_to(&self, out: &Path, timeout: Duration) {
        run_ok(Command::new("nbdcopy").arg(self.uri()).arg(out), timeout);
    }

    /// SIGTERM; waits for the exit and returns its status.
    pub fn terminate(mut self) -> ExitStatus {
        run_ok(Command::new("kill").arg("-TERM").arg(self.child.id().to_string()), T);
        let start = Instant::now();
        loop {
            if let Some(st) = self.child.try_wait().expect("try_wait") {
                return st;
            }
            assert!(start.elapsed() < T, "tidemark mount did not stop on SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM; waits for a clean exit.
    pub fn stop(self) {
        let st = self.terminate();
        assert!(st.success(), "tidemark mount exited with {st}");
    }

    /// As [`Mount::stop`], and the socket is removed.
    pub fn stop_removing_socket(self) {
        let sock = self.sock.clone();
        self.stop();
        assert!(!sock.exists(), "socket left behind");
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(self.child.id().to_string())
                .output();
            let start = Instant::now();
            while matches!(self.child.try_wait(), Ok(None)) && start.elapsed() < T {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Mounts, loop devices and FUSE mounts undone on drop, also when a test
/// panics halfway.
#[derive(Default)]
pub struct Undo {
    mounts: Vec<PathBuf>,
    loops: Vec<String>,
    fuse: Vec<(PathBuf, Child)>,
}

impl Undo {
    /// Serve the NBD socket `sock` as the file `dir/nbd` (nbdfuse).
    pub fn nbdfuse(&mut self, dir: &Path, sock: &Path) -> PathBuf {
        std::fs::create_dir_all(dir).expect("create nbdfuse dir");
        let child = Command::new("nbdfuse")
            .arg(dir)
            .args(["--unix", s(sock)])
            .spawn()
            .expect("nbdfuse");
        self.fuse.push((dir.to_path_buf(), child));
        wait_for_path(&dir.join("nbd"), T);
        dir.join("nbd")
    }

    /// A loop device on `file`.
    pub fn losetup(&mut self, file: &Path) -> String {
        let lo = stdout(&run_ok(Command::new("losetup").args(["-f", "--show", s(file)]), T));
        self.loops.push(lo.clone());
        lo
    }

    /// `mount <opts> <dev> <at>`.
    pub fn mount(&mut self, dev: &str, at: &Path, opts: &[&str]) {
        std::fs::create_dir_all(at).expect("create mountpoint");
        run_ok(Command::new("mount").args(opts).args([dev, s(at)]), T);
        self.mounts.push(at.to_path_buf());
    }

    /// Thaw and unmount the mounts, detach the loop devices, unmount the
    /// FUSE mounts (newest first).
    pub fn undo(&mut self) {
        for m in self.mounts.drain(..).rev() {
            let _ = Command::new("fsfreeze").arg("-u").arg(&m).output();
            let _ = Command::new("umount").arg(&m).output();
        }
        for l in self.loops.drain(..).rev() {
            let _ = Command::new("losetup").args(["-d", &l]).output();
        }
        for (d, mut c) in self.fuse.drain(..).rev() {
            let _ = Command::new("fusermount3").arg("-u").arg(&d).output();
            let _ = c.wait();
        }
    }
}

impl Drop for Undo {
    fn drop(&mut self) {
        self.undo();
    }
}
