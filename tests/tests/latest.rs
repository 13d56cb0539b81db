//! "latest" is the latest, tested the way an operator relies on it: an
//! ext4 filesystem is written through the shim (nbdfuse + a loop device),
//! its last change and the unmount's flush come well inside the point
//! interval after the previous point; `tidemark wait` returns; then a mount
//! and a failover at `latest` (raw and every VMDK format) must equal the
//! source byte for byte, and the mounted filesystem must hold the last
//! file. Also: failover never destroys by accident (an existing output, a
//! directory, a missing folder are refused before anything is read), says
//! when the disk was failed over already, and tag names that `--at` would
//! read as something else are refused.

use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use tidemark_tests::pipe::*;
use tidemark_tests::recovery::*;
use tidemark_tests::*;

const SIZE: u64 = 64 * MIB;
const T: Duration = Duration::from_secs(120);

fn qemu_img(args: &[&str]) -> String {
    stdout(&run_ok(Command::new("qemu-img").args(args), T))
}

/// `qemu-img check` (formats that have one) and `compare` against the source.
fn assert_equals_source(img: &Path, fmt: &str, source: &Path) {
    if fmt == "vmdk" {
        let out = qemu_img(&["check", "-U", "-f", "vmdk", s(img)]);
        assert!(out.contains("No errors"), "{}: {out}", img.display());
    }
    let out = qemu_img(&["compare", "-U", "-f", fmt, "-F", "raw", s(img), s(source)]);
    assert!(out.contains("Images are identical"), "{}: {out}", img.display());
}

#[test]
fn after_wait_latest_holds_the_last_flushed_writes_in_every_format() {
    for t in ["mkfs.ext4", "nbdfuse", "losetup", "qemu-img", "nbdcopy"] {
        need_tool(t);
    }
    let dir = tmpdir("latest");
    let d = dir.path();
    // The default point interval (1 s): the last flushes below land inside it.
    let site = Site::start(d, &[]);
    let id = "vm";
    let a = agent(&site, d, id, SIZE, &[]);
    let data = d.join("data");
    {
        let mut undo = Undo::default();
        let nbd = undo.nbdfuse(&d.join("fuse"), &a.sock);
        let lo = undo.losetup(&nbd);
        run_ok(Command::new("mkfs.ext4").args(["-q", "-F", &lo]), T);
        let mnt = d.join("mnt");
        undo.mount(&lo, &mnt, &[]);
        fs::write(mnt.join("hello.txt"), "hello v1\n").unwrap();
        fs::write(mnt.join("data1.bin"), vec![7u8; 3 << 20]).unwrap();
        run_ok(Command::new("sync").arg("-f").arg(mnt.join("hello.txt")), T);
        // Let the first points be made, then change the files and flush
        // twice in quick succession (well inside the interval).
        std::thread::sleep(Duration::from_millis(1500));
        fs::write(mnt.join("hello.txt"), "hello v3\n").unwrap();
        fs::remove_file(mnt.join("data1.bin")).unwrap();
        run_ok(Command::new("sync").arg("-f").arg(mnt.join("hello.txt")), T);
        fs::write(mnt.join("checksum.txt"), "the last file\n").unwrap();
        undo.undo(); // umount: the last flush
    }
    site.wait(id, Duration::from_secs(180));

    // The newest point is the applied state, and the disk is idle.
    let pts = points_json(&data, id);
    let newest = pts.last().expect("points");
    let st = site.disk_status(id);
    assert_eq!(
        newest["seq"].as_u64(),
        st["applied_seq"].as_u64(),
        "latest is every applied record: {newest} vs {st}"
    );

    // A mount at latest: byte for byte the source, and the last file is there.
    let sock = d.join("view.sock");
    let m = Mount::start(&["--data", s(&data), id, "--at", "latest"], &sock);
    let copy = d.join("latest.raw");
    m.copy_to(&copy, Duration::from_secs(300));
    m.terminate();
    assert_equals_source(&copy, "raw", &a.disk);
    let mut undo = Undo::default();
    let lo = undo.losetup(&copy);
    let mnt = d.join("check");
    undo.mount(&lo, &mnt, &["-o", "ro,noload"]);
    assert_eq!(fs::read_to_string(mnt.join("hello.txt")).unwrap(), "hello v3\n");
    assert_eq!(fs::read_to_string(mnt.join("checksum.txt")).unwrap(), "the last file\n");
    assert!(!mnt.join("data1.bin").exists());
    undo.undo();

    // Output checks come first: nothing is read or recorded.
    let taken = d.join("taken.raw");
    fs::write(&taken, b"keep me").unwrap();
    for (out, why) in [
        (taken.clone(), "exists; use --force"),
        (d.to_path_buf(), "is a directory"),
        (d.join("no/such/folder/x.raw"), "does not exist"),
    ] {
        let o = run(
            tidemark().args([
                "failover",
                "--data",
                s(&data),
                id,
                "--at",
                "latest",
                "--output",
                s(&out),
            ]),
            T,
        );
        assert!(!o.status.success(), "failover to {} succeeded", out.display());
        assert!(stderr(&o).contains(why), "{}: {}", out.display(), stderr(&o));
    }
    assert_eq!(fs::read(&taken).unwrap(), b"keep me");
    assert!(site.disk_status(id)["target_state"] != "failed-over");

    // A failover at latest, with the drain barrier, in every format.
    for (i, (format, qfmt)) in [
        ("raw", "raw"),
        ("vmdk-flat", "vmdk"),
        ("vmdk-sparse", "vmdk"),
        ("vmdk-stream", "vmdk"),
    ]
    .into_iter()
    .enumerate()
    {
        let out = d.join(format!(
            "failover-{format}.{}",
            if qfmt == "raw" { "raw" } else { "vmdk" }
        ));
        let o = run_ok(
            tidemark().args([
                "failover",
                "--data",
                s(&data),
                id,
                "--at",
                "latest",
                "--output",
                s(&out),
                "--format",
                format,
            ]),
            Duration::from_secs(300),
        );
        let err = stderr(&o);
        if i == 0 {
            assert!(err.contains("drained: the agent held up to seq"), "{err}");
        } else {
            assert!(err.contains("already failed over"), "{err}");
        }
        assert_equals_source(&out, qfmt, &a.disk);
        assert!(!d
            .join(format!("{}.part", out.file_name().unwrap().to_str().unwrap()))
            .exists());
    }
    // --force replaces an existing file.
    run_ok(
        tidemark().args([
            "failover",
            "--data",
            s(&data),
            id,
            "--at",
            "latest",
            "--output",
            s(&taken),
            "--force",
        ]),
        Duration::from_secs(300),
    );
    assert_equals_source(&taken, "raw", &a.disk);
    a.stop();
}

#[test]
fn tag_names_that_at_would_misread_are_refused() {
    let dir = tmpdir("tagnames");
    let d = dir.path();
    let disk = d.join("t.img");
    sparse_file(&disk, 16 * MIB);
    let state = d.join("t.state");
    let a = Agent::start(&disk, &state, &d.join("t.sock"), &[]);
    for bad in ["latest", "latest-app", "seq:5", "10m ago", "2026-11-28 10:00", "tag:x"] {
        let o = run(tidemark().args(["tag", "--agent", s(&state), bad]), T);
        assert!(!o.status.success(), "tag {bad:?} was accepted");
        assert!(stderr(&o).contains("tag name"), "{bad}: {}", stderr(&o));
    }
    let seq: u64 = stdout(&run_ok(tidemark().args(["tag", "--agent", s(&state), "nightly"]), T))
        .parse()
        .unwrap();
    assert!(seq > 0);
    a.stop();
}
