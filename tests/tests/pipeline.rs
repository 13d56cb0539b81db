#![allow(clippy::cast_possible_truncation)]
//! End-to-end replication: real agent, collector and target processes on
//! loopback, real clients writing through the shim, `tidemark wait`, and
//! `qemu-img compare` of source and replica.

use std::fs;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use tidemark_tests::pipe::*;
use tidemark_tests::*;

/// Pre-existing ext4 data, fio random writes with verify through the shim,
/// then file writes on the ext4 through nbdfuse + loop: the replica ends up
/// identical and its filesystem is clean.
#[test]
fn converges_with_ext4_fio_and_file_writes() {
    for t in ["mkfs.ext4", "fio", "nbdfuse", "losetup", "qemu-img"] {
        need_tool(t);
    }
    let dir = tmpdir("converge");
    let d = dir.path();
    // A 256 MiB disk whose first 128 MiB hold an ext4 filesystem with files.
    let src = d.join("src");
    fs::create_dir_all(src.join("sub")).unwrap();
    for i in 0..40u64 {
        let data: Vec<u8> = (0..(i * 3001 % 70_000)).map(|x| ((x * 7 + i) % 251) as u8).collect();
        fs::write(src.join("sub").join(format!("f{i}")), data).unwrap();
    }
    let disk = d.join("d1.img");
    sparse_file(&disk, 256 * MIB);
    run_ok(
        Command::new("mkfs.ext4").args(["-q", "-F", "-d", s(&src), s(&disk), "128M"]),
        Duration::from_secs(60),
    );
    let site = Site::start(d, &[]);
    let a = agent(&site, d, "d1", 256 * MIB, &[]);

    // fio random writes with verify, past the filesystem's end.
    let out = run(
        Command::new("fio")
            .args([
                "--name=conv",
                "--ioengine=nbd",
                "--thread",
                "--rw=randwrite",
                "--bsrange=4k-64k",
                "--iodepth=8",
                "--offset=160m",
                "--size=64m",
                "--io_size=48m",
                "--verify=crc32c",
                "--do_verify=1",
                "--randseed=7",
            ])
            .arg(format!("--uri={}", a.uri())),
        Duration::from_secs(300),
    );
    assert!(out.status.success(), "fio: {}", String::from_utf8_lossy(&out.stderr));

    // File writes on the ext4, through the shim.
    let fuse = d.join("fuse");
    let mnt = d.join("mnt");
    fs::create_dir_all(&fuse).unwrap();
    fs::create_dir_all(&mnt).unwrap();
    let mut nbdfuse = Command::new("nbdfuse")
        .arg(&fuse)
        .args(["--unix", s(&a.sock)])
        .spawn()
        .expect("nbdfuse");
    wait_for_path(&fuse.join("nbd"), Duration::from_secs(30));
    let lo = String::from_utf8(
        run_ok(
            Command::new("losetup").args(["-f", "--show", s(&fuse.join("nbd"))]),
            Duration::from_secs(30),
        )
        .stdout,
    )
    .unwrap()
    .trim()
    .to_string();
    run_ok(Command::new("mount").args([&lo, s(&mnt)]), Duration::from_secs(30));
    for i in 0..20u64 {
        let data: Vec<u8> = (0..200_000u64).map(|x| ((x ^ i) % 253) as u8).collect();
        fs::write(mnt.join(format!("new{i}")), data).unwrap();
    }
    fs::remove_file(mnt.join("sub/f3")).unwrap();
    run_ok(Command::new("umount").arg(&mnt), Duration::from_secs(60));
    run_ok(Command::new("losetup").args(["-d", &lo]), Duration::from_secs(30));
    run_ok(
        Command::new("fusermount3").args(["-u", s(&fuse)]),
        Duration::from_secs(30),
    );
    let _ = nbdfuse.wait();

    wait_and_compare(&site, "d1", &disk, Duration::from_secs(180));
    // The replica's filesystem is clean (checked on a copy).
    let copy = d.join("replica-copy.img");
    fs::copy(site.replica("d1"), &copy).unwrap();
    run_ok(
        Command::new("fsck.ext4").args(["-fn", s(&copy)]),
        Duration::from_secs(120),
    );
    let st = site.disk_status("d1");
    assert_eq!(st["mode"], "streaming", "{st}");
    assert_eq!(st["full_resyncs"], 0, "{st}");
    assert!(st["payload_bytes"].as_u64().unwrap() > 0, "{st}");
    // The human table names the disk.
    let table = run_ok(
        Command::new(bin("tidemark")).args(["status", "--api", &site.api()]),
        Duration::from_secs(30),
    );
    assert!(String::from_utf8_lossy(&table.stdout).contains("d1"));
    // Every service's log lines for the disk carry its id in a span.
    let alog = a.log_text();
    assert!(alog.contains("ship{disk=d1}"), "agent log:\n{alog}");
    let clog = site.collector.log_text();
    assert!(clog.contains("forward{disk=d1}"), "collector log:\n{clog}");
    assert!(clog.contains(" disk=d1}: agent connected"), "collector log:\n{clog}");
    let tlog = site.target.log_text();
    assert!(
        tlog.contains(" disk=d1}: disk is now consistent"),
        "target log:\n{tlog}"
    );
    a.stop();
}

/// A machine crash (another boot id recorded, no clean-shutdown marker):
/// the agent resyncs the whole disk by hash-compare, counts it, and
/// converges, sending what differs and what was written meanwhile, not the
/// disk.
#[test]
fn machine_crash_resyncs_the_whole_disk() {
    let dir = tmpdir("machine");
    let d = dir.path();
    let site = Site::start(d, &[]);
    let a = agent(&site, d, "m1", 64 * MIB, &[]);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed());
    assert!(write_burst(&a.sock, 64 * MIB, &mut rng, 64));
    site.wait("m1", Duration::from_secs(120));
    let sent_before = site.disk_status("m1")["payload_bytes"].as_u64().unwrap();
    let state = a.state.clone();
    let disk = a.disk.clone();
    a.kill9();
    // Simulate the machine going down: a write reached the disk but not the
    // journal, and the boot id changed.
    let f = fs::OpenOptions::new().write(true).open(&disk).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &[0x5a; 8192], 12 * MIB).unwrap();
    drop(f);
    fs::write(state.join("boot_id"), "00000000-1111-2222-3333-444444444444\n").unwrap();
    let _ = fs::remove_file(state.join("clean-shutdown"));
    let a = agent(&site, d, "m1", 64 * MIB, &[]);
    assert!(write_burst(&a.sock, 64 * MIB, &mut rng, 32));
    wait_and_compare(&site, "m1", &disk, Duration::from_secs(180));
    let st = site.disk_status("m1");
    assert_eq!(st["full_resyncs"], 1, "{st}");
    // The burst's writes cross as writes and may be resent by the compare
    // (hot while it ran: a write into a chunk that differed when compared
    // resends the whole 64 KiB chunk, so a few chunks of slack); the lost
    // write's chunk crosses once.
    let written = a.status()["write_bytes"].as_u64().unwrap();
    let sent = st["payload_bytes"].as_u64().unwrap() - sent_before;
    assert!(
        sent <= 2 * written + 6 * 65536,
        "the resync after a machine crash sent {sent} bytes for {written} written since and one 64 KiB chunk lost"
    );
    let ast = a.status();
    assert_eq!(ast["compare_bytes"].as_u64(), Some(64 * MIB), "{ast}");
    assert!(
        !state.join("resync-required").exists(),
        "resync-required still there after the resync"
    );
    a.stop();
}

/// Sixteen agents through one collector at once: all converge.
#[test]
fn sixteen_agents_converge() {
    let dir = tmpdir("many");
    let d = dir.path();
    let site = Site::start(d, &[]);
    let agents: Vec<Agent> = (0..16)
        .map(|i| agent(&site, d, &format!("m{i:02}"), 16 * MIB, &[]))
        .collect();
    let threads: Vec<_> = agents
        .iter()
        .enumerate()
        .map(|(i, a)| {
            let sock = a.sock.clone();
            std::thread::spawn(move || {
                let mut rng = rand::rngs::StdRng::seed_from_u64(i as u64);
                for _ in 0..3 {
                    assert!(write_burst(&sock, 16 * MIB, &mut rng, 24));
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("writer");
    }
    for (i, a) in agents.iter().enumerate() {
        wait_and_compare(&site, &format!("m{i:02}"), &a.disk, Duration::from_secs(180));
    }
    let st = site.status();
    assert_eq!(st["disks"].as_array().unwrap().len(), 16, "{st}");
    for a in agents {
        a.stop();
    }
}

// ---------------------------------------------------------------------------
// Bad input
// ---------------------------------------------------------------------------

fn frame(kind: u8, body: &[u8]) -> Vec<u8> {
    let mut f = b"TMWF".to_vec();
    f.push(tidemark_wire::frame::FRAME_VERSION); // frame version (tidemark_wire::frame::FRAME_VERSION)
    f.push(kind);
    f.extend_from_slice(&0u16.to_le_bytes());
    f.extend_from_slice(&u32::try_from(body.len()).unwrap().to_le_bytes());
    let crc = crc32c_append(crc32c(&f[0..12]), body);
    f.extend_from_slice(&crc.to_le_bytes());
    f.extend_from_slice(body);
    f
}

// Castagnoli CRC, bitwise: test code, no dependency for one function.
fn crc32c_append(mut crc: u32, data: &[u8]) -> u32 {
    crc = !crc;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0x82f6_3b78
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

fn crc32c(data: &[u8]) -> u32 {
    crc32c_append(0, data)
}

fn hello(protocol: u16, role: u8, uuid: [u8; 16], id: &str, token: &[u8]) -> Vec<u8> {
    let mut b = protocol.to_le_bytes().to_vec();
    b.push(role);
    b.extend_from_slice(&0u32.to_le_bytes());
    b.extend_from_slice(&uuid);
    b.extend_from_slice(&(32u64 << 20).to_le_bytes()); // disk size
    b.push(u8::try_from(id.len()).unwrap());
    b.extend_from_slice(id.as_bytes());
    b.extend_from_slice(&u16::try_from(token.len()).unwrap().to_le_bytes());
    b.extend_from_slice(token);
    // Data generation: a root named after the UUID.
    b.extend_from_slice(&uuid);
    b.extend_from_slice(&[0; 16]);
    b.extend_from_slice(&0u64.to_le_bytes());
    frame(1, &b)
}

/// Send `bytes`, then read what comes back until the peer closes (bounded).
fn exchange(port: u16, bytes: &[u8], half_close: bool) -> Vec<u8> {
    let mut c = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let _ = c.write_all(bytes);
    if half_close {
        let _ = c.shutdown(std::net::Shutdown::Write);
    }
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(10) {
        match c.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
        }
    }
    out
}

/// The reason of the Error frame in `reply`, if it is one.
fn error_reason(reply: &[u8]) -> Option<String> {
    if reply.len() < 20 || &reply[0..4] != b"TMWF" || reply[5] != 5 {
        return None;
    }
    let n = usize::from(u16::from_le_bytes([reply[18], reply[19]]));
    Some(String::from_utf8_lossy(reply.get(20..20 + n)?).into_owned())
}

#[test]
fn bad_input_is_refused_and_other_disks_keep_going() {
    let dir = tmpdir("badin");
    let d = dir.path();
    // Hand-made frames: the listeners in clear text (over TLS, a stranger
    // gets no further than the handshake: tests/tests/security.rs).
    let mut site = Site::start_plaintext(d, &[]);
    let a = agent(&site, d, "good", 32 * MIB, &[]);
    let token = fs::read_to_string(&site.token_file).unwrap();
    let token = token.trim().as_bytes();
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);

    for (port, role, who) in [
        (site.collector_port, 1u8, "collector"),
        (site.target_port, 2u8, "target"),
    ] {
        let r = exchange(port, &hello(1, role, [1; 16], "x1", b"wrong-token"), false);
        let reason = error_reason(&r).unwrap_or_else(|| panic!("{who}: no error frame for a wrong token: {r:?}"));
        assert!(reason.to_lowercase().contains("token"), "{who}: {reason}");

        let r = exchange(port, &hello(99, role, [1; 16], "x1", token), false);
        let reason = error_reason(&r).unwrap_or_else(|| panic!("{who}: no error frame for protocol 99"));
        assert!(
            reason.contains("99") || reason.to_lowercase().contains("version"),
            "{who}: {reason}"
        );

        // Oversized: a header announcing a body past the maximum.
        let mut big = frame(3, &[]);
        big[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        let r = exchange(port, &big, false);
        if let Some(reason) = error_reason(&r) {
            assert!(!reason.is_empty(), "{who}");
        }
        // Truncated: half a hello, then the client goes away.
        let h = hello(1, role, [1; 16], "x1", token);
        let _ = exchange(port, &h[..h.len() / 2], true);
        // Garbage.
        let _ = exchange(port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", true);
        let junk: Vec<u8> = (0..5000).map(|_| rng.gen()).collect();
        let _ = exchange(port, &junk, true);
    }
    assert!(
        site.collector.log_text().contains("token"),
        "collector did not log the refusal"
    );

    // A second agent with another disk under the id already bound: refused
    // with a clear reason, until --force-resync.
    let other = d.join("other");
    fs::create_dir_all(&other).unwrap();
    let b = agent(&site, &other, "good", 32 * MIB, &[]);
    let start = Instant::now();
    while !b.log_text().to_lowercase().contains("bound") && start.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        b.log_text().to_lowercase().contains("bound"),
        "the agent did not report the disk id conflict; log:\n{}",
        b.log_text()
    );
    b.kill9();

    // The good disk still replicates.
    assert!(write_burst(&a.sock, 32 * MIB, &mut rng, 32));
    wait_and_compare(&site, "good", &a.disk.clone(), Duration::from_secs(120));
    assert!(
        site.collector.alive() && site.target.alive(),
        "a service died on bad input"
    );
    let good_disk = a.disk.clone();
    a.stop();

    // --force-resync alone does not rebind: an agent's Hello never replaces
    // a disk's history without an operator's leave.
    let points_before = points_of(&site, "good");
    assert!(!points_before.is_empty());
    let b = agent(&site, &other, "good", 32 * MIB, &["--force-resync"]);
    poll_until("the forced agent's refusal", Duration::from_secs(30), || {
        b.log_text().contains("needs an operator")
    });
    b.kill9();
    assert_eq!(
        points_of(&site, "good"),
        points_before,
        "a refused rebind deleted points"
    );
    assert_identical(&good_disk, &site.replica("good"));

    // With the operator's leave, --force-resync rebinds the id to the new
    // disk, which then converges; the old history is kept as a disk of
    // its own (points and replica), and the old spool at the collector.
    let said = site.allow_rebind("good", None);
    assert!(said.contains("rebind of good allowed"), "{said}");
    let b = agent(&site, &other, "good", 32 * MIB, &["--force-resync"]);
    assert!(write_burst(&b.sock, 32 * MIB, &mut rng, 16));
    wait_and_compare(&site, "good", &b.disk.clone(), Duration::from_secs(120));
    b.stop();
    let kept: Vec<String> = fs::read_dir(d.join("data"))
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("good.replaced-"))
        .collect();
    assert_eq!(kept.len(), 1, "{kept:?}");
    assert_eq!(points_of(&site, &kept[0]), points_before, "the old points are kept");
    assert_identical(&good_disk, &d.join("data").join(&kept[0]).join("replica.raw"));
    let audit = fs::read_to_string(d.join("spool").join("audit.log")).unwrap();
    assert!(
        audit.contains("\"action\":\"rebind\"") && audit.contains("rebind-uuid"),
        "{audit}"
    );
}

/// The seqs of `tidemark points --data` for a disk.
fn points_of(site: &Site, id: &str) -> Vec<u64> {
    let out = run_ok(
        Command::new(bin("tidemark"))
            .args(["points", "--data"])
            .arg(site.dir.join("data"))
            .args([id, "--json"]),
        Duration::from_secs(30),
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("points JSON");
    v["points"]
        .as_array()
        .expect("points")
        .iter()
        .map(|p| p["seq"].as_u64().unwrap())
        .collect()
}
