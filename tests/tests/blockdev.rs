//! A block device as the protected disk: a loop device over a file. TRIM
//! and WRITE_ZEROES must leave it reading zeros (a block device's discard
//! need not zero, so the shim zeroes out), and the journal replay must equal
//! the device's content. Needs root and loop devices (CI has both).

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use tidemark_tests::*;

struct Loop(String);

impl Loop {
    fn attach(file: &Path) -> Loop {
        need_tool("losetup");
        let out = run_ok(
            Command::new("losetup").args(["-f", "--show"]).arg(file),
            Duration::from_secs(20),
        );
        Loop(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.0).status();
    }
}

fn qemu_io(uri: &str, cmds: &[&str]) -> String {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw", uri]);
    for x in cmds {
        c.arg("-c").arg(x);
    }
    let out = run_ok(&mut c, Duration::from_secs(60));
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(!text.contains("Pattern verification failed"), "{text}");
    text
}

#[test]
fn loop_device_is_protected_and_trims_read_zeros() {
    need_tool("qemu-io");
    let d = tempfile::tempdir().unwrap();
    let backing = d.path().join("backing.img");
    // Start from non-zero content so a discard that does not zero would show.
    run_ok(
        Command::new("dd")
            .args(["if=/dev/urandom", "bs=1M", "count=64", "status=none"])
            .arg(format!("of={}", backing.display())),
        Duration::from_secs(60),
    );
    let pre = d.path().join("pre.img");
    std::fs::copy(&backing, &pre).unwrap();
    let lo = Loop::attach(&backing);
    let agent = Agent::start(
        Path::new(&lo.0),
        &d.path().join("state"),
        &d.path().join("nbd.sock"),
        &["--disk-id", "blk0"],
    );
    let st = agent.status();
    assert_eq!(st["disk_size_bytes"], 64 << 20);
    assert_eq!(st["disk_id"], "blk0");
    let uri = agent.uri();
    qemu_io(
        &uri,
        &[
            "write -P 0x11 0 1M",
            "write -P 0x22 4M 256k",
            "discard 8M 2M",
            "write -z 16M 1M",
            "write -P 0x33 8M 4k",
            "flush",
        ],
    );
    qemu_io(
        &uri,
        &[
            "read -P 0x11 0 1M",
            "read -P 0x22 4M 256k",
            "read -P 0 8392704 2044k",
            "read -P 0 16M 1M",
            "read -P 0x33 8M 4k",
        ],
    );
    agent.stop();
    drop(lo);
    // The client's FLUSH is a crash-consistent boundary in the stream.
    let dump = run_ok(
        Command::new(bin("tidemark"))
            .args(["journal", "dump", "--json", "--state"])
            .arg(d.path().join("state")),
        Duration::from_secs(30),
    );
    let kinds: Vec<String> = String::from_utf8_lossy(&dump.stdout)
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["kind"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    let flush_at = kinds.iter().position(|k| k == "flush").expect("a flush record");
    assert_eq!(
        kinds[..flush_at].iter().filter(|k| *k == "write").count(),
        3,
        "{kinds:?}"
    );
    assert_replay_matches(&d.path().join("state"), &pre, &backing);
}

/// Unmounts and removes a small tmpfs on drop.
struct Tmpfs(std::path::PathBuf);

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

/// A journal that cannot grow (its filesystem is full) fails the client's
/// writes with an error: no write is acknowledged without being journaled,
/// and nothing untracked reaches the disk, so replay still equals the disk.
#[test]
fn journal_out_of_space_fails_writes_instead_of_dropping_them() {
    need_tool("qemu-io");
    let d = tempfile::tempdir().unwrap();
    let state_fs = d.path().join("statefs");
    std::fs::create_dir(&state_fs).unwrap();
    // Room for the first 64 MiB segment (1 GiB default cap) and a little more.
    run_ok(
        Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=72m", "tmpfs"])
            .arg(&state_fs),
        Duration::from_secs(10),
    );
    let _fs = Tmpfs(state_fs.clone());
    let disk = d.path().join("disk.img");
    sparse_file(&disk, 256 << 20);
    let pre = d.path().join("pre.img");
    sparse_file(&pre, 256 << 20);
    let agent = Agent::start(&disk, &state_fs.join("state"), &d.path().join("nbd.sock"), &[]);
    // 96 writes of 1 MiB: the journal's first segment fills after ~63, and
    // the next segment cannot be created on the full filesystem.
    let mut ok = Vec::new();
    let mut failed = 0;
    for i in 0..96u64 {
        let out = run(
            Command::new("qemu-io")
                .args(["-f", "raw", &agent.uri(), "-c"])
                .arg(format!("write -P {} {}M 1M", i % 200 + 1, i)),
            Duration::from_secs(30),
        );
        let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
        if out.status.success() && text.contains("wrote 1048576/1048576") {
            ok.push(i);
        } else {
            failed += 1;
        }
    }
    assert!(failed > 0, "every write succeeded: the journal filesystem never filled");
    assert!(ok.len() > 32, "only {} writes succeeded", ok.len());
    let st = agent.status();
    assert!(st["tracking_errors"].as_u64().unwrap() > 0, "{st}");
    assert!(
        agent.log_text().contains("journal append failed, request refused"),
        "{}",
        agent.log_text()
    );
    // Every acknowledged write reads back.
    for &i in &ok {
        let out = run_ok(
            Command::new("qemu-io")
                .args(["-f", "raw", &agent.uri(), "-c"])
                .arg(format!("read -P {} {}M 1M", i % 200 + 1, i)),
            Duration::from_secs(30),
        );
        assert!(!String::from_utf8_lossy(&out.stdout).contains("Pattern verification failed"));
    }
    agent.kill9();
    // The journal holds exactly what the disk holds.
    assert_replay_matches(&state_fs.join("state"), &pre, &disk);
}
