#![allow(clippy::cast_possible_truncation)]
//! End-to-end recovery tools: `tidemark tag` (with and without
//! `--freeze`), `points`, `mount` (NBD, `--writable`, `--mountpoint`) and
//! `failover`, with real agents, real clients (qemu-io, qemu-img,
//! nbdcopy, nbdinfo) and real ext4 filesystems on loop devices.
//!
//! Needs root, /dev/fuse and loop devices (CI has them). Points come from
//! the target's recovery API (`tidemark_recovery`,
//! `docs/recovery.md`); `mount`/`failover --image` serve a raw file through
//! the same NBD, overlay, FUSE and export code without a target.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use rand::SeedableRng;
use tidemark_tests::pipe::*;
use tidemark_tests::recovery::*;
use tidemark_tests::*;

const T: Duration = Duration::from_secs(60);

/// Tags in the agent's journal: (seq, name).
fn journal_tags(state: &Path) -> Vec<(u64, String)> {
    let o = run_ok(tidemark().args(["journal", "dump", "--state", s(state), "--json"]), T);
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["kind"] == "tag")
        .map(|v| (v["seq"].as_u64().unwrap(), v["tag"].as_str().unwrap().to_string()))
        .collect()
}

/// The agent's `tags.json` entry for `name`.
fn tag_entry(state: &Path, name: &str) -> serde_json::Value {
    let v: serde_json::Value = serde_json::from_slice(&fs::read(state.join("tags.json")).unwrap()).unwrap();
    v["tags"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == name)
        .cloned()
        .unwrap_or_else(|| panic!("{name} not in tags.json: {v}"))
}

/// Can a file be written and synced on the filesystem at `dir` within 20 s
/// (that is, it is not frozen)?
fn writable_now(dir: &Path) -> bool {
    let f = dir.join("probe");
    let out = run(
        Command::new("timeout").args(["20", "sh", "-c", &format!("echo probe > {0} && sync -f {0}", s(&f))]),
        Duration::from_secs(30),
    );
    out.status.success()
}

fn sha(p: &Path) -> String {
    let o = run_ok(Command::new("sha256sum").arg(p), Duration::from_secs(120));
    stdout(&o).split(' ').next().unwrap().to_string()
}

/// Nothing of a mount is left: no mount at `dir`, no tidemark FUSE mount,
/// no loop device on a tidemark FUSE file.
fn nothing_left(dir: &Path) {
    let mounts = fs::read_to_string("/proc/self/mounts").unwrap();
    assert!(
        !mounts.contains(&format!(" {} ", s(dir))),
        "{} still mounted",
        dir.display()
    );
    assert!(!mounts.contains("tidemark"), "a tidemark FUSE mount is left:\n{mounts}");
    let lo = stdout(&run_ok(Command::new("losetup").arg("-a"), T));
    assert!(!lo.contains("tidemark-mount-"), "a loop device is left: {lo}");
}

/// A 64 MiB ext4 image with a few files, under `d`.
fn ext4_image(d: &Path, name: &str) -> PathBuf {
    let src = d.join(format!("{name}-src"));
    fs::create_dir_all(src.join("sub")).unwrap();
    for i in 0..10u64 {
        let data: Vec<u8> = (0..(i * 7001 % 50_000)).map(|x| ((x * 3 + i) % 251) as u8).collect();
        fs::write(src.join("sub").join(format!("f{i}")), data).unwrap();
    }
    fs::write(src.join("hello.txt"), "hello from the point\n").unwrap();
    let img = d.join(format!("{name}.img"));
    sparse_file(&img, 64 * MIB);
    run_ok(Command::new("mkfs.ext4").args(["-q", "-F", "-d", s(&src), s(&img)]), T);
    img
}

/// Tags through a running agent: the seq printed is the tag record's in the
/// journal; names are unique (across restarts), bounded and non-empty.
#[test]
fn tag_through_the_agent() {
    need_tool("qemu-io");
    let dir = tmpdir("tag");
    let d = dir.path();
    let (disk, state) = (d.join("t.img"), d.join("t.state"));
    let a = Agent::start(&disk, &state, &d.join("t.sock"), &["--create-size", "64M"]);
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    assert!(write_burst(&a.sock, 64 * MIB, &mut rng, 20));
    let s1 = tag(&state, "first", &[]);
    assert!(write_burst(&a.sock, 64 * MIB, &mut rng, 20));
    let s2 = tag(&state, "zweiter-Schnappschuss é", &[]);
    assert!(s2 > s1 + 20, "{s1} {s2}");
    assert_eq!(
        journal_tags(&state),
        vec![(s1, "first".to_string()), (s2, "zweiter-Schnappschuss é".to_string())]
    );
    assert_eq!(tag_entry(&state, "first")["app_consistent"], false);

    let refused = |name: &str, why: &str| {
        let o = run(tidemark().args(["tag", "--agent", s(&state), name]), T);
        assert!(!o.status.success(), "{name:?} accepted");
        assert!(stderr(&o).contains(why), "{name:?}: {}", stderr(&o));
    };
    // A retry of a name the agent holds: that tag's seq, nothing journaled again.
    let o = run_ok(tidemark().args(["tag", "--agent", s(&state), "first"]), T);
    assert_eq!(stdout(&o), s1.to_string());
    assert!(stderr(&o).contains("not inserted again"), "{}", stderr(&o));
    refused("", "empty");
    refused(&"x".repeat(256), "at most 255 bytes");
    tag(&state, &"x".repeat(255), &[]);
    a.stop();
    let a = Agent::start(&disk, &state, &d.join("t.sock"), &[]);
    assert_eq!(tag(&state, "first", &[]), s1, "the name is remembered across a restart");
    assert_eq!(journal_tags(&state).len(), 3);
    a.stop();
    let o = run(tidemark().args(["tag", "--agent", s(&state), "nobody-home"]), T);
    assert!(stderr(&o).contains("is the agent running"), "{}", stderr(&o));
}

/// `--freeze` on an ext4 mounted through the shim: the tag is journaled as
/// application-consistent and the filesystem is thawed afterwards. A
/// freeze that cannot happen (not a mountpoint) says why and tags nothing;
/// an agent that does not answer in time gets the filesystem thawed by the
/// watchdog, and the late tag is refused by the agent.
#[test]
fn freeze_tags_are_app_consistent_and_always_thawed() {
    for t in ["mkfs.ext4", "nbdfuse", "losetup", "fsfreeze"] {
        need_tool(t);
    }
    let dir = tmpdir("freeze");
    let d = dir.path();
    let disk = ext4_image(d, "fz");
    let state = d.join("fz.state");
    let a = Agent::start(&disk, &state, &d.join("fz.sock"), &[]);
    let mut undo = Undo::default();
    let nbd = undo.nbdfuse(&d.join("fuse"), &a.sock);
    let lo = undo.losetup(&nbd);
    let mnt = d.join("mnt");
    undo.mount(&lo, &mnt, &[]);
    for i in 0..20u64 {
        fs::write(mnt.join(format!("app{i}")), vec![i as u8; 100_000]).unwrap();
    }

    let o = run_ok(
        tidemark().args(["tag", "--agent", s(&state), "app-1", "--freeze", s(&mnt)]),
        T,
    );
    let seq: u64 = stdout(&o).parse().unwrap();
    assert!(stderr(&o).contains("application-consistent"), "{}", stderr(&o));
    assert_eq!(tag_entry(&state, "app-1")["app_consistent"], true);
    assert_eq!(tag_entry(&state, "app-1")["seq"], seq);
    assert!(journal_tags(&state).contains(&(seq, "app-1".into())));
    assert!(writable_now(&mnt), "the filesystem stayed frozen");

    // Not a mountpoint: refused before anything is frozen.
    let sub = mnt.join("subdir");
    fs::create_dir_all(&sub).unwrap();
    let o = run(
        tidemark().args(["tag", "--agent", s(&state), "nope", "--freeze", s(&sub)]),
        T,
    );
    assert!(!o.status.success());
    assert!(stderr(&o).contains("not a mountpoint"), "{}", stderr(&o));
    assert!(writable_now(&mnt));
    assert!(!journal_tags(&state).iter().any(|t| t.1 == "nope"));

    // A stopped agent: the watchdog thaws at --timeout; the agent, woken
    // later, refuses the tag past its deadline. (The frozen filesystem is a
    // plain loop mount: one on the stopped shim could not even freeze.)
    let plain = ext4_image(d, "plain");
    let plo = undo.losetup(&plain);
    let pmnt = d.join("pmnt");
    undo.mount(&plo, &pmnt, &[]);
    let pid = a.child.id().to_string();
    run_ok(Command::new("kill").args(["-STOP", &pid]), T);
    let start = Instant::now();
    let o = run(
        tidemark().args([
            "tag",
            "--agent",
            s(&state),
            "too-late",
            "--freeze",
            s(&pmnt),
            "--timeout",
            "2s",
        ]),
        T,
    );
    let took = start.elapsed();
    let thawed = writable_now(&pmnt);
    run_ok(Command::new("kill").args(["-CONT", &pid]), T);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("timed out"), "{}", stderr(&o));
    assert!(took < Duration::from_secs(10), "took {took:?}");
    assert!(thawed, "the watchdog did not thaw");
    std::thread::sleep(Duration::from_secs(1));
    assert!(
        !journal_tags(&state).iter().any(|t| t.1 == "too-late"),
        "a tag journaled after the thaw"
    );
    // The agent is fine and tags again.
    tag(&state, "after", &[]);

    undo.undo();
    a.stop();
}

/// `mount --image`: the NBD export reads the image exactly (nbdcopy,
/// `qemu-img compare`, base:allocation), refuses writes read-only, keeps
/// `--writable` writes in a throwaway overlay; `--mountpoint` shows the
/// files read-only, or writable with the changes gone after exit; the
/// image is byte-identical throughout and nothing is left mounted.
#[test]
fn mount_serves_views_and_cleans_up() {
    for t in ["mkfs.ext4", "nbdcopy", "nbdinfo", "qemu-io", "qemu-img", "losetup"] {
        need_tool(t);
    }
    let dir = tmpdir("mount");
    let d = dir.path();
    let img = ext4_image(d, "v");
    let before = sha(&img);
    let sock = d.join("v.sock");

    // Read-only NBD.
    let m = Mount::start(&["--image", s(&img)], &sock);
    assert!(m.lines[0].starts_with("opened image"), "{:?}", m.lines);
    let copy = d.join("copy.raw");
    m.copy_to(&copy, Duration::from_secs(300));
    assert_identical(&copy, &img);
    let map = run_ok(Command::new("nbdinfo").arg("--map").arg(m.uri()), T);
    assert!(stdout(&map).contains("hole"), "{}", stdout(&map));
    let w = run(
        Command::new("qemu-io")
            .args(["-f", "raw", "-c", "write -P 1 0 4096"])
            .arg(m.uri()),
        T,
    );
    assert!(
        !w.status.success() || stdout(&w).contains("failed") || stderr(&w).contains("read-only"),
        "a write to a read-only view succeeded: {}",
        stdout(&w)
    );
    m.stop_removing_socket();

    // Writable NBD: writes read back, then vanish.
    let m = Mount::start(&["--image", s(&img), "--writable"], &sock);
    run_ok(
        Command::new("qemu-io")
            .args(["-f", "raw", "-c", "write -P 7 1000 300000", "-c", "write -z 8M 2M"])
            .arg(m.uri()),
        T,
    );
    let r = run_ok(
        Command::new("qemu-io")
            .args(["-f", "raw", "-c", "read -P 7 1000 300000", "-c", "read -P 0 8M 2M"])
            .arg(m.uri()),
        T,
    );
    assert!(
        !stdout(&r).contains("failed") && !stdout(&r).contains("mismatch"),
        "{}",
        stdout(&r)
    );
    m.stop_removing_socket();
    assert_eq!(sha(&img), before);

    // --mountpoint, read-only.
    let mnt = d.join("mnt");
    fs::create_dir_all(&mnt).unwrap();
    let m = Mount::start(&["--image", s(&img), "--mountpoint", s(&mnt)], &sock);
    assert_eq!(
        fs::read_to_string(mnt.join("hello.txt")).unwrap(),
        "hello from the point\n"
    );
    assert_eq!(fs::read(mnt.join("sub/f3")).unwrap().len(), 21_003);
    assert!(fs::write(mnt.join("new"), "x").is_err(), "read-only mount took a write");
    let opts = mount_options(&mnt);
    for o in ["ro", "nosuid", "nodev", "noexec"] {
        assert!(opts.contains(&o.to_string()), "{o} missing: {opts:?}");
    }
    m.stop_removing_socket();
    nothing_left(&mnt);
    assert_eq!(sha(&img), before);

    // --mountpoint --writable: changes visible, then gone.
    let m = Mount::start(&["--image", s(&img), "--writable", "--mountpoint", s(&mnt)], &sock);
    fs::write(mnt.join("drill.txt"), "drill").unwrap();
    fs::remove_file(mnt.join("hello.txt")).unwrap();
    // The recovered filesystem's programs, setuid or not, do not run here.
    let opts = mount_options(&mnt);
    for o in ["nosuid", "nodev", "noexec"] {
        assert!(opts.contains(&o.to_string()), "{o} missing: {opts:?}");
    }
    let prog = mnt.join("setuid.sh");
    fs::write(&prog, "#!/bin/sh\necho ran\n").unwrap();
    fs::set_permissions(&prog, std::os::unix::fs::PermissionsExt::from_mode(0o4755)).unwrap();
    let e = Command::new(&prog).output();
    assert!(
        e.as_ref()
            .is_err_and(|e| e.kind() == std::io::ErrorKind::PermissionDenied),
        "a program on the recovered filesystem ran: {e:?}"
    );
    assert_eq!(fs::read_to_string(mnt.join("drill.txt")).unwrap(), "drill");
    m.stop_removing_socket();
    nothing_left(&mnt);
    assert!(!mnt.join("drill.txt").exists());
    assert_eq!(sha(&img), before);
    let m = Mount::start(&["--image", s(&img), "--mountpoint", s(&mnt)], &sock);
    assert!(mnt.join("hello.txt").exists() && !mnt.join("drill.txt").exists());
    m.stop_removing_socket();
    nothing_left(&mnt);

    // A bad mountpoint fails cleanly.
    let o = run(
        tidemark().args([
            "mount",
            "--image",
            s(&img),
            "--listen",
            &format!("unix:{}", sock.display()),
            "--mountpoint",
            s(&d.join("missing")),
        ]),
        T,
    );
    assert!(!o.status.success());
    assert!(stderr(&o).contains("not a directory"), "{}", stderr(&o));
    assert!(!sock.exists());
}

/// `failover --image` to every format: each output passes `qemu-img
/// check` (VMDK), shows the right create type, and compares identical to
/// the source; progress (bytes, rate, ETA) goes to stderr.
#[test]
fn failover_exports_every_format() {
    need_tool("qemu-img");
    let dir = tmpdir("failover-img");
    let d = dir.path();
    let img = ext4_image(d, "f");
    for (fmt, create_type) in [
        ("raw", ""),
        ("vmdk-flat", "monolithicFlat"),
        ("vmdk-sparse", "monolithicSparse"),
        ("vmdk-stream", "streamOptimized"),
    ] {
        let out = d.join(format!("out-{fmt}.img"));
        let o = run_ok(
            tidemark().args(["failover", "--image", s(&img), "--output", s(&out), "--format", fmt]),
            Duration::from_secs(120),
        );
        assert!(
            stderr(&o).contains("100.0%") && stderr(&o).contains("/s"),
            "{}",
            stderr(&o)
        );
        assert!(stdout(&o).contains("exported"), "{}", stdout(&o));
        if fmt == "raw" {
            assert_identical(&img, &out);
            continue;
        }
        run_ok(Command::new("qemu-img").args(["check", "-f", "vmdk", s(&out)]), T);
        let info = run_ok(Command::new("qemu-img").args(["info", "-f", "vmdk", s(&out)]), T);
        assert!(stdout(&info).contains(create_type), "{fmt}: {}", stdout(&info));
        run_ok(
            Command::new("qemu-img").args(["compare", "-f", "vmdk", "-F", "raw", s(&out), s(&img)]),
            Duration::from_secs(120),
        );
    }
}

// ---------------------------------------------------------------------
// With the target's recovery API (tools feature `recovery`).

/// Point-in-time truth: each tagged point, mounted through NBD, equals the
/// reference copied at that moment; tags are listed by `tidemark points`;
/// `seq:N` and `tag:NAME` open the same point; failover to each format
/// passes `qemu-img check` and compares identical.
#[test]
fn tagged_points_are_true() {
    for t in ["qemu-io", "qemu-img", "nbdcopy"] {
        need_tool(t);
    }
    let dir = tmpdir("pit");
    let d = dir.path();
    let site = Site::start(d, &[]);
    let size = 64 * MIB;
    let a = agent(&site, d, "pit", size, &[]);
    let refs = tagged_workload(&a, d, size, 4, 5);
    wait_and_compare(&site, "pit", &a.disk, Duration::from_secs(180));
    let data = d.join("data");

    let pts = points_json(&data, "pit");
    for (name, seq, _) in &refs {
        let p = pts
            .iter()
            .find(|p| p["tag"] == name.as_str())
            .unwrap_or_else(|| panic!("{name} not listed: {pts:?}"));
        assert_eq!(p["seq"], *seq);
        assert_eq!(p["kind"], "tag");
        assert!(p["time"].as_str().unwrap().contains('T'));
    }
    let table = run_ok(tidemark().args(["points", "--data", s(&data), "pit"]), T);
    assert!(stdout(&table).contains("round-0"));

    let sock = d.join("view.sock");
    for (i, (name, seq, reference)) in refs.iter().enumerate() {
        let at = match i % 3 {
            0 => name.clone(),
            1 => format!("tag:{name}"),
            _ => format!("seq:{seq}"),
        };
        let m = Mount::start(&["--data", s(&data), "pit", "--at", &at], &sock);
        assert!(m.lines[0].contains(&format!("seq {seq}")), "{at} opened {:?}", m.lines);
        let copy = d.join(format!("view{i}.raw"));
        m.copy_to(&copy, Duration::from_secs(300));
        m.stop_removing_socket();
        assert_identical(&copy, reference);
    }

    // Failover to every format at one point.
    let (name, _, reference) = &refs[1];
    for fmt in ["raw", "vmdk-flat", "vmdk-sparse", "vmdk-stream"] {
        let out = d.join(format!("fo-{fmt}.img"));
        run_ok(
            tidemark().args([
                "failover",
                "--data",
                s(&data),
                "pit",
                "--at",
                name,
                "--output",
                s(&out),
                "--format",
                fmt,
            ]),
            Duration::from_secs(300),
        );
        let f = if fmt == "raw" { "raw" } else { "vmdk" };
        if f == "vmdk" {
            run_ok(Command::new("qemu-img").args(["check", "-f", "vmdk", s(&out)]), T);
        }
        run_ok(
            Command::new("qemu-img").args(["compare", "-f", f, "-F", "raw", s(&out), s(reference)]),
            Duration::from_secs(120),
        );
    }
    a.stop();
}

/// `--mountpoint` on a point of a replicated ext4: its files are there;
/// `--writable` changes vanish and the replica is byte-identical after;
/// a `--freeze` tag is listed as `app` and `latest-app` opens it.
#[test]
fn mounted_points_and_app_consistent_tags() {
    for t in ["mkfs.ext4", "nbdfuse", "losetup", "qemu-img"] {
        need_tool(t);
    }
    let dir = tmpdir("pit-fs");
    let d = dir.path();
    let site = Site::start(d, &[]);
    let disk = ext4_image(d, "pfs");
    let a = agent(&site, d, "pfs", 64 * MIB, &[]);
    let mut undo = Undo::default();
    let nbd = undo.nbdfuse(&d.join("fuse"), &a.sock);
    let lo = undo.losetup(&nbd);
    let mnt = d.join("mnt");
    undo.mount(&lo, &mnt, &[]);
    fs::write(mnt.join("at-tag.txt"), "frozen in time").unwrap();
    let seq = tag(&a.state, "app-point", &["--freeze", s(&mnt)]);
    fs::write(mnt.join("after-tag.txt"), "later").unwrap();
    undo.undo();
    wait_and_compare(&site, "pfs", &disk, Duration::from_secs(180));
    let data = d.join("data");
    let p = points_json(&data, "pfs")
        .into_iter()
        .find(|p| p["tag"] == "app-point")
        .expect("app-point listed");
    assert_eq!((p["seq"].as_u64(), p["kind"].as_str()), (Some(seq), Some("app")));

    let replica_before = sha(&site.replica("pfs"));
    let vm = d.join("view-mnt");
    fs::create_dir_all(&vm).unwrap();
    let sock = d.join("view.sock");
    let m = Mount::start(
        &["--data", s(&data), "pfs", "--at", "latest-app", "--mountpoint", s(&vm)],
        &sock,
    );
    assert!(m.lines[0].contains(&format!("seq {seq}")), "{:?}", m.lines);
    assert_eq!(fs::read_to_string(vm.join("at-tag.txt")).unwrap(), "frozen in time");
    assert!(!vm.join("after-tag.txt").exists());
    m.stop_removing_socket();
    nothing_left(&vm);
    let m = Mount::start(
        &[
            "--data",
            s(&data),
            "pfs",
            "--at",
            "app-point",
            "--writable",
            "--mountpoint",
            s(&vm),
        ],
        &sock,
    );
    fs::write(vm.join("drill.txt"), "drill").unwrap();
    m.stop_removing_socket();
    nothing_left(&vm);
    assert_eq!(sha(&site.replica("pfs")), replica_before);
    a.stop();
}

/// The options `mountpoint` is mounted with (from /proc/self/mounts).
fn mount_options(mountpoint: &Path) -> Vec<String> {
    let want = fs::canonicalize(mountpoint).unwrap();
    let mounts = fs::read_to_string("/proc/self/mounts").unwrap();
    mounts
        .lines()
        .map(|l| l.split(' ').collect::<Vec<_>>())
        .rfind(|f| f.len() > 3 && Path::new(f[1]) == want)
        .map(|f| f[3].split(',').map(str::to_string).collect())
        .unwrap_or_else(|| panic!("{} is not mounted: {mounts}", want.display()))
}
