//! End to end with VMDK replicas: a real agent, collector and target
//! (`tidemark-target --format vmdk-flat`, then `--format vmdk-sparse`).
//! Writes through the shim with flushes and tags; after `tidemark wait` the
//! live replica passes `qemu-img check`, has the right create type, and
//! compares identical to the source; every tagged point served by
//! `tidemark mount` (read with nbdcopy) equals the reference copied at the
//! tag; `tidemark failover --format vmdk-stream` passes check and compare.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use rand::SeedableRng;
use tidemark_tests::pipe::*;
use tidemark_tests::*;

const T: Duration = Duration::from_secs(60);
const SIZE: u64 = 64 * MIB;

fn tidemark() -> Command {
    Command::new(bin("tidemark"))
}

fn stdout(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

/// A target started with `--format <format>` and a collector, as a [`Site`]
/// (whose own start would use the target's default format).
fn site_with_format(d: &Path, format: &str) -> Site {
    let token_file = d.join("token");
    std::fs::write(&token_file, "test-secret-token\n").unwrap();
    let (target_port, collector_port, api_port) = (free_port(), free_port(), free_port());
    let targs: Vec<String> = vec![
        "--listen".into(),
        format!("127.0.0.1:{target_port}"),
        "--data".into(),
        d.join("data").display().to_string(),
        "--token-file".into(),
        token_file.display().to_string(),
        "--format".into(),
        format.into(),
    ];
    let target = Service::start("tidemark-target", &targs, &d.join("target.log"), target_port);
    let cargs: Vec<String> = vec![
        "--listen".into(),
        format!("127.0.0.1:{collector_port}"),
        "--spool".into(),
        d.join("spool").display().to_string(),
        "--target".into(),
        format!("127.0.0.1:{target_port}"),
        "--api".into(),
        format!("127.0.0.1:{api_port}"),
        "--token-file".into(),
        token_file.display().to_string(),
    ];
    let collector = Service::start("tidemark-collector", &cargs, &d.join("collector.log"), api_port);
    Site {
        dir: d.into(),
        token_file,
        target,
        collector,
        target_port,
        collector_port,
        api_port,
    }
}

/// `tidemark tag`; the seq it printed.
fn tag(state: &Path, name: &str) -> u64 {
    let o = run_ok(tidemark().args(["tag", "--agent", s(state), name]), T);
    stdout(&o)
        .parse()
        .unwrap_or_else(|_| panic!("tag printed {:?}", stdout(&o)))
}

fn qemu_img(args: &[&str]) -> String {
    stdout(&run_ok(Command::new("qemu-img").args(args), Duration::from_secs(120)))
}

/// `qemu-img check`, `info` (create type) and `compare` against `reference`.
fn check_vmdk(vmdk: &Path, create_type: &str, reference: &Path) {
    let out = qemu_img(&["check", "-U", "-f", "vmdk", s(vmdk)]);
    assert!(out.contains("No errors"), "{}: {out}", vmdk.display());
    let info: serde_json::Value =
        serde_json::from_str(&qemu_img(&["info", "-U", "-f", "vmdk", "--output=json", s(vmdk)])).unwrap();
    assert_eq!(
        info["format-specific"]["data"]["create-type"],
        create_type,
        "{}: {info}",
        vmdk.display()
    );
    let out = qemu_img(&["compare", "-U", "-f", "vmdk", "-F", "raw", s(vmdk), s(reference)]);
    assert!(out.contains("Images are identical"), "{}: {out}", vmdk.display());
}

/// A running `tidemark mount … --listen unix:SOCK`, stopped with SIGTERM.
struct Mount {
    child: Child,
    first_line: String,
    sock: PathBuf,
}

impl Mount {
    fn start(args: &[&str], sock: &Path) -> Mount {
        let mut child = tidemark()
            .arg("mount")
            .args(args)
            .arg("--listen")
            .arg(format!("unix:{}", sock.display()))
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn tidemark mount");
        let (tx, rx) = mpsc::channel();
        let out = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines().map_while(Result::ok) {
                let _ = tx.send(l);
            }
        });
        let mut lines = Vec::new();
        let start = Instant::now();
        loop {
            match rx.recv_timeout(Duration::from_millis(100)) {
                Ok(l) if l == "ready" => break,
                Ok(l) => lines.push(l),
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let st = child.wait();
                    panic!("tidemark mount exited ({st:?}) before ready: {lines:?}");
                }
            }
            assert!(start.elapsed() < T, "tidemark mount not ready: {lines:?}");
        }
        Mount {
            child,
            first_line: lines.first().cloned().unwrap_or_default(),
            sock: sock.to_path_buf(),
        }
    }

    fn copy_to(&self, out: &Path) {
        run_ok(
            Command::new("nbdcopy")
                .arg(format!("nbd+unix:///?socket={}", self.sock.display()))
                .arg(out),
            Duration::from_secs(300),
        );
    }

    fn stop(mut self) {
        run_ok(Command::new("kill").arg("-TERM").arg(self.child.id().to_string()), T);
        let start = Instant::now();
        while self.child.try_wait().unwrap().is_none() {
            assert!(start.elapsed() < T, "tidemark mount did not stop on SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn replicate_in(format: &str, create_type: &str) {
    let dir = tmpdir(&format!("fmt-{format}"));
    let d = dir.path();
    let site = site_with_format(d, format);
    let id = "vm";
    let a = agent(&site, d, id, SIZE, &[]);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed());
    let mut refs = Vec::new();
    for r in 0..3 {
        for _ in 0..3 {
            assert!(write_burst(&a.sock, SIZE, &mut rng, 40));
        }
        // write_burst ends with a flush; nothing writes until the tag.
        let copy = d.join(format!("ref{r}.raw"));
        run_ok(Command::new("cp").arg("--sparse=always").arg(&a.disk).arg(&copy), T);
        let name = format!("round-{r}");
        let seq = tag(&a.state, &name);
        refs.push((name, seq, copy));
    }
    // Later writes overwrite what the tagged points hold.
    for _ in 0..4 {
        assert!(write_burst(&a.sock, SIZE, &mut rng, 40));
    }
    site.wait(id, Duration::from_secs(180));

    let data = d.join("data");
    let disk_dir = data.join(id);
    assert!(!disk_dir.join("replica.raw").exists(), "a raw replica beside the VMDK");
    let replica = disk_dir.join("replica.vmdk");
    assert_eq!(
        disk_dir.join("replica-flat.vmdk").exists(),
        format == "vmdk-flat",
        "the flat extent exists exactly for vmdk-flat"
    );
    check_vmdk(&replica, create_type, &a.disk);
    let info: serde_json::Value =
        serde_json::from_str(&qemu_img(&["info", "-U", "-f", "vmdk", "--output=json", s(&replica)])).unwrap();
    assert_eq!(info["virtual-size"], SIZE, "{info}");
    assert!(site.target.log_text().contains(&format!("created a {format} replica")));

    let sock = d.join("view.sock");
    for (i, (name, seq, reference)) in refs.iter().enumerate() {
        let m = Mount::start(&["--data", s(&data), id, "--at", &format!("tag:{name}")], &sock);
        assert!(
            m.first_line.contains(&format!("seq {seq}")),
            "{name} opened {:?}",
            m.first_line
        );
        let copy = d.join(format!("view{i}.raw"));
        m.copy_to(&copy);
        m.stop();
        assert_identical(&copy, reference);
    }

    // Failover (last: it stops applying to the disk) to a stream VMDK.
    let (name, _, reference) = &refs[1];
    let out = d.join("failover.vmdk");
    run_ok(
        tidemark().args([
            "failover",
            "--data",
            s(&data),
            id,
            "--at",
            name,
            "--output",
            s(&out),
            "--format",
            "vmdk-stream",
        ]),
        Duration::from_secs(300),
    );
    check_vmdk(&out, "streamOptimized", reference);
    // The live replica is untouched by the export.
    check_vmdk(&replica, create_type, &a.disk);
    a.stop();
}

#[test]
fn vmdk_flat_replica_points_and_failover() {
    for t in ["qemu-io", "qemu-img", "nbdcopy"] {
        need_tool(t);
    }
    replicate_in("vmdk-flat", "monolithicFlat");
}

#[test]
fn vmdk_sparse_replica_points_and_failover() {
    for t in ["qemu-io", "qemu-img", "nbdcopy"] {
        need_tool(t);
    }
    replicate_in("vmdk-sparse", "monolithicSparse");
}
