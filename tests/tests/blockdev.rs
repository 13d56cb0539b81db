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
    assert_eq!(st["disk_size"], 64 << 20);
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
