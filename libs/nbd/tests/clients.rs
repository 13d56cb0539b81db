//! The server (with the file backend of the example) driven by real NBD
//! clients nobody here wrote: nbdinfo, qemu-io, qemu-img, nbdcopy, fio.
//! A missing tool fails the test with a message naming the tool and package.

// Test code: lengths and offsets here are small constants.
#![allow(clippy::cast_possible_truncation)]

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;

const MIB: u64 = 1 << 20;
const LIMIT: Duration = Duration::from_secs(120);

#[test]
fn nbdinfo_reports_the_export() {
    require("nbdinfo", "libnbd-bin");
    let (srv, _) = Server::with_file(64 * MIB);
    let out = run_ok(Command::new("nbdinfo").arg("--json").arg(srv.uri()), LIMIT);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("bad JSON ({e}): {out}"));
    assert_eq!(v["protocol"], "newstyle-fixed", "{out}");
    assert_eq!(v["structured"], true, "{out}");
    let e = &v["exports"][0];
    assert_eq!(e["export-size"], 64 * MIB, "{out}");
    assert_eq!(e["block_size_minimum"], 1, "{out}");
    assert_eq!(e["block_size_preferred"], 4096, "{out}");
    assert_eq!(e["block_size_maximum"], 32 * MIB, "{out}");
    for flag in [
        "can_fua",
        "can_trim",
        "can_zero",
        "can_flush",
        "can_multi_conn",
        "can_fast_zero",
        "can_cache",
    ] {
        assert_eq!(e[flag], true, "{flag}: {out}");
    }
    assert_eq!(e["is_read_only"], false, "{out}");
    let contexts = e["contexts"].as_array().unwrap_or_else(|| panic!("no contexts: {out}"));
    assert!(contexts.iter().any(|c| c == "base:allocation"), "{out}");

    // The export is listed under its name.
    let list = run_ok(
        Command::new("nbdinfo").arg("--list").arg("--json").arg(srv.uri()),
        LIMIT,
    );
    assert!(list.contains("\"export-name\": \"disk.raw\""), "{list}");
}

fn qemu_io(uri: &str, cmds: &[&str]) -> (bool, String) {
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", "raw", uri]);
    for c in cmds {
        cmd.args(["-c", c]);
    }
    let o = run(&mut cmd, LIMIT);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    let ok = o.status.success() && !text.contains("Pattern verification failed") && !text.contains("failed:");
    (ok, text)
}

#[test]
fn qemu_io_writes_and_reads_patterns() {
    require("qemu-io", "qemu-utils");
    let (srv, path) = Server::with_file(64 * MIB);
    let uri = srv.uri();
    let (ok, text) = qemu_io(
        &uri,
        &[
            "write -P 0xab 0 64k",
            "read -P 0xab 0 64k",
            "write -P 0xcd 1M 4M",
            "write -z 2M 1M",
            "discard 3M 512k",
            "flush",
            "read -P 0xcd 1M 1M",
            "read -P 0 2M 1M",
            "read -P 0 3M 512k",
            "read -P 0xcd 3584k 1536k",
            "write -P 0x11 -f 63M 1M",
            "read -P 0x11 63M 1M",
            "read -P 0 64k 960k",
        ],
    );
    assert!(ok, "{text}");
    // The bytes really are in the file.
    let disk = std::fs::read(&path).unwrap();
    assert!(disk[..65536].iter().all(|&b| b == 0xab));
    assert!(disk[MIB as usize..(2 * MIB) as usize].iter().all(|&b| b == 0xcd));
    assert!(disk[(2 * MIB) as usize..(3 * MIB + MIB / 2) as usize]
        .iter()
        .all(|&b| b == 0));
    // And the check can fail: a wrong pattern is reported.
    let (ok, text) = qemu_io(&uri, &["read -P 0xcd 0 64k"]);
    assert!(!ok, "reading 0xab data with pattern 0xcd must fail: {text}");
}

#[test]
fn qemu_img_convert_in_and_out_and_compare() {
    require("qemu-img", "qemu-utils");
    let (srv, _) = Server::with_file(16 * MIB);
    let uri = srv.uri();
    let src = srv.dir.path().join("src.raw");
    // Random data with holes in between, so block status and zero detection matter.
    let mut img = vec![0u8; (16 * MIB) as usize];
    for (i, chunk) in img.chunks_mut((MIB / 2) as usize).enumerate() {
        if i % 3 != 1 {
            chunk.copy_from_slice(&pattern(chunk.len(), i as u64));
        }
    }
    std::fs::write(&src, &img).unwrap();
    run_ok(
        Command::new("qemu-img")
            .args(["convert", "-n", "-f", "raw", "-O", "raw"])
            .arg(&src)
            .arg(&uri),
        LIMIT,
    );
    run_ok(
        Command::new("qemu-img")
            .args(["compare", "-f", "raw", "-F", "raw"])
            .arg(&src)
            .arg(&uri),
        LIMIT,
    );

    let out = srv.dir.path().join("out.raw");
    run_ok(
        Command::new("qemu-img")
            .args(["convert", "-f", "raw", "-O", "raw"])
            .arg(&uri)
            .arg(&out),
        LIMIT,
    );
    assert!(
        std::fs::read(&out).unwrap() == img,
        "image read back through NBD differs"
    );

    // compare can fail: change one byte of the source.
    img[12345] ^= 0xff;
    std::fs::write(&src, &img).unwrap();
    let o = run(
        Command::new("qemu-img")
            .args(["compare", "-f", "raw", "-F", "raw"])
            .arg(&src)
            .arg(&uri),
        LIMIT,
    );
    assert_eq!(
        o.status.code(),
        Some(1),
        "qemu-img compare must see the difference: {o:?}"
    );

    // Block status: the holes of a fresh sparse region are reported as zero.
    let map = run_ok(
        Command::new("qemu-img")
            .args(["map", "--output=json", "-f", "raw"])
            .arg(&uri),
        LIMIT,
    );
    let v: serde_json::Value = serde_json::from_str(&map).unwrap();
    let zero_bytes: u64 = v
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["zero"] == true)
        .map(|e| e["length"].as_u64().unwrap())
        .sum();
    assert!(
        zero_bytes >= 4 * MIB,
        "expected the holes to be reported as zero: {map}"
    );
}

#[test]
fn nbdcopy_roundtrip() {
    require("nbdcopy", "libnbd-bin");
    let (srv, path) = Server::with_file(32 * MIB);
    let uri = srv.uri();
    let src = srv.dir.path().join("src.raw");
    let mut img = pattern((32 * MIB) as usize, 42);
    img[(8 * MIB) as usize..(12 * MIB) as usize].fill(0);
    std::fs::write(&src, &img).unwrap();
    // nbdcopy uses several connections (CAN_MULTI_CONN) and many requests in flight.
    run_ok(Command::new("nbdcopy").arg("--flush").arg(&src).arg(&uri), LIMIT);
    assert!(
        std::fs::read(&path).unwrap() == img,
        "export differs from the source after nbdcopy"
    );
    let out = srv.dir.path().join("out.raw");
    run_ok(Command::new("nbdcopy").arg(&uri).arg(&out), LIMIT);
    assert!(std::fs::read(&out).unwrap() == img, "copy out differs from the source");
}

#[test]
fn fio_random_writes_verify() {
    require("fio", "fio");
    let (srv, _) = Server::with_file(32 * MIB);
    let job = format!(
        "[global]\nioengine=nbd\nuri={}\nrw=randwrite\nbs=4k\niodepth=16\nsize=32m\n\
         verify=crc32c\nverify_fatal=1\ndo_verify=1\nverify_state_save=0\n[job]\n",
        srv.uri()
    );
    let jobfile = srv.dir.path().join("job.fio");
    std::fs::write(&jobfile, job).unwrap();
    let out = run_ok(Command::new("fio").arg(&jobfile).current_dir(srv.dir.path()), LIMIT);
    assert!(out.contains("err= 0"), "{out}");
    assert!(!out.contains("verify: bad"), "{out}");
    // The verify pass reads everything back.
    assert!(out.contains("read: IOPS="), "fio did not run its verify pass: {out}");
}

#[test]
fn clients_over_tcp() {
    require("nbdinfo", "libnbd-bin");
    require("qemu-io", "qemu-utils");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.raw");
    std::fs::File::create(&path).unwrap().set_len(8 * MIB).unwrap();
    let backend = std::sync::Arc::new(tidemark_nbd::FileBackend::open(&path, false).unwrap());
    let addr = tidemark_nbd::parse_listen("tcp:127.0.0.1:0").unwrap();
    let srv = Server::start_on(dir, backend, addr);
    let uri = srv.uri();
    assert!(uri.starts_with("nbd://127.0.0.1:"), "{uri}");
    let out = run_ok(Command::new("nbdinfo").arg("--json").arg(&uri), LIMIT);
    assert!(out.contains("\"export-size\": 8388608"), "{out}");
    let (ok, text) = qemu_io(&uri, &["write -P 0x5a 4k 1M", "read -P 0x5a 4k 1M", "read -P 0 0 4k"]);
    assert!(ok, "{text}");
}
