#![allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
//! Recovery points end to end, against references: real agent, collector
//! and target processes on loopback, writes through the shim (qemu-io,
//! ext4 on nbdfuse + loop), points listed by `tidemark points --json`,
//! opened with `tidemark mount --at seq:N`, read with nbdcopy and checked
//! with `qemu-img compare` / `fsck.ext4`.
//!
//! A reference is a copy of the source disk taken right after a burst of
//! writes that ends in a FLUSH, while nothing else writes: every recovery
//! point made by that burst's flushes (a qemu-io run flushes twice: its
//! `flush` command and again on close) must read exactly as that copy.
//! Each burst remembers the agent's last journaled seq before and after it,
//! so a listed point maps to its reference by seq.
//!
//! The target is started with `Site::start_with` to pass the retention
//! flags (`--retention-window`, `--point-interval`).
//! `TIDEMARK_FAULT_SEED=N` replays a run.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use tidemark_tests::pipe::*;
use tidemark_tests::recovery::*;
use tidemark_tests::*;

const T: Duration = Duration::from_secs(60);
/// How long nbdcopy may take to read a view.
const COPY: Duration = Duration::from_secs(120);

/// The agent's last journaled seq.
fn last_seq(state: &Path) -> u64 {
    let o = run_ok(tidemark().args(["agent-status", "--agent", s(state), "--json"]), T);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("agent-status JSON");
    v["last_seq"].as_u64().unwrap_or_else(|| panic!("no last_seq in {v}"))
}

/// The tail of the log of the agent serving `sock` (`DIR/<id>.sock`,
/// logging to `DIR/<id>.log`).
fn agent_log(sock: &Path) -> String {
    tail(&fs::read_to_string(sock.with_extension("log")).unwrap_or_default(), 40)
}

/// One qemu-io run: `writes` writes of 4–64 KiB (data, some zeroes, some
/// discards), a share `hot_share` of them inside the `hot` region, then a
/// flush. Err with qemu-io's output and the agent's log if it failed.
fn burst(
    sock: &Path,
    size: u64,
    rng: &mut StdRng,
    writes: usize,
    hot: (u64, u64),
    hot_share: f64,
) -> Result<(), String> {
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", "raw", "-t", "none", "-d", "unmap"])
        .arg(format!("nbd+unix:///?socket={}", sock.display()));
    for _ in 0..writes {
        let len = rng.gen_range(1..=16u64) * 4096;
        let (lo, hi) = if rng.gen_bool(hot_share) { hot } else { (0, size) };
        let off = lo + rng.gen_range(0..=(hi - lo - len) / 4096) * 4096;
        match rng.gen_range(0..20) {
            0 => cmd.arg("-c").arg(format!("write -z {off} {len}")),
            1 => cmd.arg("-c").arg(format!("discard {off} {len}")),
            _ => cmd.arg("-c").arg(format!("write -P {} {off} {len}", rng.gen::<u8>())),
        };
    }
    cmd.arg("-c").arg("flush");
    let out = run(&mut cmd, T);
    let text = String::from_utf8_lossy(&out.stdout);
    if out.status.success() && !text.contains("failed") {
        return Ok(());
    }
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| !l.starts_with("wrote ") && !l.contains("ops/sec"))
        .collect();
    Err(format!(
        "qemu-io burst failed ({}): {}\n{}\n--- agent log (tail):\n{}",
        out.status,
        lines.join("\n"),
        String::from_utf8_lossy(&out.stderr).trim(),
        agent_log(sock)
    ))
}

/// The source disk as it was after one burst: every point with
/// `before < seq <= after` reads as `file`.
#[derive(Clone, Debug)]
struct Ref {
    before: u64,
    after: u64,
    file: PathBuf,
}

/// Run `write` (a qemu-io run ending in a flush) and copy the source as its
/// reference. Nothing else may write to the disk meanwhile.
fn reference(state: &Path, disk: &Path, file: PathBuf, write: impl FnOnce() -> Result<(), String>) -> Ref {
    let before = last_seq(state);
    write().unwrap_or_else(|e| panic!("{e}"));
    let after = last_seq(state);
    assert!(after > before, "the burst journaled nothing ({before})");
    copy_sparse(disk, &file, T);
    Ref { before, after, file }
}

fn ref_for(refs: &[Ref], seq: u64) -> Option<&Ref> {
    refs.iter().find(|r| r.before < seq && seq <= r.after)
}

/// The newest crash point a reference's burst made.
fn point_of(pts: &[Pt], r: &Ref) -> Option<u64> {
    pts.iter()
        .filter(|p| p.kind == "crash" && p.seq > r.before && p.seq <= r.after)
        .map(|p| p.seq)
        .max()
}

/// How old an RFC 3339 time is, in seconds (GNU date parses it).
fn age_s(time: &str) -> f64 {
    let o = run_ok(Command::new("date").args(["-d", time, "+%s.%N"]), T);
    let t: f64 = stdout(&o)
        .parse()
        .unwrap_or_else(|_| panic!("date printed {:?}", stdout(&o)));
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs_f64() - t
}

/// Open `disk` at `seq`, copy it to `out` and close the view.
fn read_point(data: &Path, disk: &str, seq: u64, sock: &Path, out: &Path) {
    let m = Mount::at_seq(data, disk, seq, sock);
    m.copy_to(out, COPY);
    m.stop();
}

/// Every `(seq, reference)` read through a view equals its reference;
/// panics naming every point that does not.
fn check_points(data: &Path, disk: &str, d: &Path, todo: &[(u64, PathBuf)]) {
    let sock = d.join("view.sock");
    let copy = d.join("view.raw");
    let mut bad = Vec::new();
    for (seq, reference) in todo {
        read_point(data, disk, *seq, &sock, &copy);
        if let Err(e) = compare(&copy, reference) {
            bad.push(format!("point seq {seq}: {e}"));
        }
    }
    let _ = fs::remove_file(&copy);
    assert!(
        bad.is_empty(),
        "{} of {} points are wrong:\n{}",
        bad.len(),
        todo.len(),
        bad.join("\n")
    );
}

fn elapsed_note(name: &str, start: Instant) {
    eprintln!("{name}: {:.1} s", start.elapsed().as_secs_f64());
}

// ---------------------------------------------------------------------

/// At least 20 crash points, each made by the FLUSH that ends a burst of
/// writes and referenced by a copy of the source taken at that flush, read
/// through `mount --at seq:N` as their references — also the early ones,
/// whose hot region later bursts overwrote many times over.
#[test]
fn crash_points_match_references_at_flush() {
    for t in ["qemu-io", "qemu-img", "nbdcopy"] {
        need_tool(t);
    }
    let start = Instant::now();
    let mut rng = StdRng::seed_from_u64(seed());
    let dir = tmpdir("rp-flush");
    let d = dir.path();
    let site = Site::start_with(d, &["--point-interval", "0"], &[]);
    let size = 32 * MIB;
    let a = agent(&site, d, "cp", size, &[]);
    site.wait("cp", T);
    let data = d.join("data");
    let hot = (4 * MIB, 5 * MIB);

    let rounds = 24;
    let mut todo: Vec<(u64, PathBuf)> = Vec::new();
    let mut refs = Vec::new();
    for r in 0..rounds {
        let writes = rng.gen_range(8..=40);
        let r = reference(&a.state, &a.disk, d.join(format!("ref{r}.raw")), || {
            burst(&a.sock, size, &mut rng, writes, hot, 0.6)
        });
        site.wait("cp", T);
        let pts = points(&data, "cp");
        let seq = point_of(&pts, &r).unwrap_or_else(|| {
            panic!(
                "no crash point for the flush of seqs {}..={}: {pts:?}",
                r.before, r.after
            )
        });
        todo.push((seq, r.file.clone()));
        refs.push(r);
    }
    // Later bursts hammer the hot region: every early point's blocks there
    // are overwritten many times over.
    for _ in 0..6 {
        burst(&a.sock, size, &mut rng, 40, hot, 0.95).unwrap_or_else(|e| panic!("{e}"));
    }
    wait_and_compare(&site, "cp", &a.disk, Duration::from_secs(120));
    // The past differs from the present: a view that ignored the undo
    // data would fail the comparisons below.
    assert!(compare(&refs[0].file, &a.disk).is_err(), "the disk never changed");

    let pts = points(&data, "cp");
    assert!(todo.len() >= 20, "only {} crash points", todo.len());
    for (seq, _) in &todo {
        assert!(pts.iter().any(|p| p.seq == *seq), "point {seq} no longer listed");
    }
    // The other points of each burst (the flush on qemu-io's close) are
    // the same disk state; check them too.
    for p in pts.iter().filter(|p| p.kind == "crash") {
        if !todo.iter().any(|(s, _)| *s == p.seq) {
            if let Some(r) = ref_for(&refs, p.seq) {
                todo.push((p.seq, r.file.clone()));
            }
        }
    }
    eprintln!("comparing {} crash points", todo.len());
    check_points(&data, "cp", d, &todo);
    a.stop();
    elapsed_note("crash_points_match_references_at_flush", start);
}

/// ext4 on the shim, file writes with `fsync` of single files and `sync`
/// at several moments: the filesystem at every `sync` point and at the
/// other crash points (up to 60 of them, at random), read through a view onto a throwaway copy, is clean
/// after journal replay (`fsck.ext4 -fy`, then `-fn` passes), and at each
/// `sync` point it holds exactly the files written (and not deleted)
/// before that sync.
#[test]
fn ext4_points_pass_fsck() {
    for t in ["mkfs.ext4", "fsck.ext4", "nbdfuse", "losetup", "nbdcopy"] {
        need_tool(t);
    }
    let start = Instant::now();
    let mut rng = StdRng::seed_from_u64(seed());
    let dir = tmpdir("rp-ext4");
    let d = dir.path();
    let size = 64 * MIB;
    let disk = d.join("fs.img");
    sparse_file(&disk, size);
    run_ok(Command::new("mkfs.ext4").args(["-q", "-F", s(&disk)]), T);
    let site = Site::start_with(d, &["--point-interval", "0"], &[]);
    let a = agent(&site, d, "fs", size, &[]);
    site.wait("fs", T);
    let data = d.join("data");

    let mut undo = Undo::default();
    let nbd = undo.nbdfuse(&d.join("fuse"), &a.sock);
    let lo = undo.losetup(&nbd);
    let mnt = d.join("mnt");
    undo.mount(&lo, &mnt, &[]);

    // What the filesystem holds: path → contents.
    let mut model: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    // (the sync's flushes lie in (before, after], the model then).
    let mut syncs: Vec<(u64, u64, BTreeMap<String, Vec<u8>>)> = Vec::new();
    let mut log = Vec::new();
    let write = |model: &mut BTreeMap<String, Vec<u8>>, rel: String, bytes: Vec<u8>| {
        fs::write(mnt.join(&rel), &bytes).unwrap();
        model.insert(rel, bytes);
    };
    for phase in 0..5 {
        fs::create_dir_all(mnt.join(format!("p{phase}"))).unwrap();
        for f in 0..8 {
            let n = rng.gen_range(1..=256usize) * 1024 - rng.gen_range(0..1024usize);
            let bytes: Vec<u8> = (0..n).map(|_| rng.gen()).collect();
            write(&mut model, format!("p{phase}/f{f}"), bytes);
            if f == 3 {
                // A point in the middle of the phase: one file fsynced,
                // the others' data still in flight.
                let file = fs::File::open(mnt.join(format!("p{phase}/f{f}"))).unwrap();
                file.sync_all().unwrap();
            }
        }
        log.extend_from_slice(format!("phase {phase} done\n").as_bytes());
        write(&mut model, "log.txt".into(), log.clone());
        if phase > 0 {
            let gone = format!("p{}/f{}", phase - 1, rng.gen_range(0..8));
            if model.remove(&gone).is_some() {
                fs::remove_file(mnt.join(&gone)).unwrap();
            }
            let from = format!("p{}/f{}", phase - 1, rng.gen_range(0..8));
            if let Some(b) = model.remove(&from) {
                let to = format!("p{phase}/moved-from-{}", from.replace('/', "-"));
                fs::rename(mnt.join(&from), mnt.join(&to)).unwrap();
                model.insert(to, b);
            }
        }
        let before = last_seq(&a.state);
        let o = run(Command::new("sync").arg("-f").arg(&mnt), T);
        assert!(
            o.status.success(),
            "sync -f failed: {}\n--- agent log (tail):\n{}",
            String::from_utf8_lossy(&o.stderr),
            agent_log(&a.sock)
        );
        let after = last_seq(&a.state);
        assert!(after > before, "sync journaled no flush");
        syncs.push((before, after, model.clone()));
    }
    undo.undo();
    wait_and_compare(&site, "fs", &disk, Duration::from_secs(120));

    let pts: Vec<Pt> = points(&data, "fs").into_iter().filter(|p| p.kind == "crash").collect();
    let mut sample: Vec<(u64, Option<usize>)> = Vec::new();
    for (i, (before, after, _)) in syncs.iter().enumerate() {
        let p = pts
            .iter()
            .filter(|p| p.seq > *before && p.seq <= *after)
            .map(|p| p.seq)
            .max()
            .unwrap_or_else(|| panic!("no crash point for sync {i} ({before}..={after}): {pts:?}"));
        sample.push((p, Some(i)));
    }
    // And the others: mid-phase (an fsync, ext4's own commits) — all of
    // them unless there are very many.
    let mut others: Vec<u64> = pts
        .iter()
        .map(|p| p.seq)
        .filter(|s| !sample.iter().any(|x| x.0 == *s))
        .collect();
    assert!(others.len() >= 4, "too few crash points: {pts:?}");
    others.shuffle(&mut rng);
    sample.extend(others.iter().take(60).map(|s| (*s, None)));
    eprintln!(
        "{} crash points; checking {:?}",
        pts.len(),
        sample.iter().map(|x| x.0).collect::<Vec<_>>()
    );
    assert!(sample.len() >= 4);

    let sock = d.join("view.sock");
    let copy = d.join("view.img");
    let check = d.join("check");
    for (seq, sync) in &sample {
        read_point(&data, "fs", *seq, &sock, &copy);
        let fy = run(
            Command::new("fsck.ext4").args(["-fy", s(&copy)]),
            Duration::from_secs(120),
        );
        let code = fy.status.code().unwrap_or(-1);
        assert!(
            code == 0 || code == 1,
            "point {seq}: fsck.ext4 -fy exited {code}:\n{}{}",
            stdout(&fy),
            String::from_utf8_lossy(&fy.stderr)
        );
        // After the journal replay, the only repairs a crash may need are
        // the free counts (not journaled; the kernel recounts them too).
        let fy_out = stdout(&fy);
        let lines: Vec<&str> = fy_out.lines().collect();
        for (i, l) in lines.iter().enumerate() {
            if l.ends_with("? yes") {
                let what = if i > 0 { lines[i - 1] } else { "" };
                assert!(
                    what.contains("count wrong"),
                    "point {seq}: fsck.ext4 -fy repaired more than a crash leaves ({what:?}):\n{fy_out}"
                );
            }
        }
        let fn_ = run(
            Command::new("fsck.ext4").args(["-fn", s(&copy)]),
            Duration::from_secs(120),
        );
        assert!(
            fn_.status.success(),
            "point {seq}: fsck.ext4 -fn after the replay:\n{}{}\n(-fy said:\n{})",
            stdout(&fn_),
            String::from_utf8_lossy(&fn_.stderr),
            stdout(&fy)
        );
        let Some(i) = sync else { continue };
        // The files at the sync: exactly the model.
        let mut u = Undo::default();
        let lo = u.losetup(&copy);
        u.mount(&lo, &check, &["-o", "ro"]);
        let want = &syncs[*i].2;
        let mut got = BTreeMap::new();
        for e in fs::read_dir(&check).unwrap() {
            let e = e.unwrap();
            let name = e.file_name().to_string_lossy().to_string();
            if name == "lost+found" {
                continue;
            }
            if e.file_type().unwrap().is_dir() {
                for f in fs::read_dir(e.path()).unwrap() {
                    let f = f.unwrap();
                    got.insert(
                        format!("{name}/{}", f.file_name().to_string_lossy()),
                        fs::read(f.path()).unwrap(),
                    );
                }
            } else {
                got.insert(name, fs::read(e.path()).unwrap());
            }
        }
        u.undo();
        let names = |m: &BTreeMap<String, Vec<u8>>| m.keys().cloned().collect::<Vec<_>>();
        assert_eq!(names(&got), names(want), "point {seq} (sync {i}): other files");
        for (k, v) in want {
            assert!(got[k] == *v, "point {seq} (sync {i}): {k} differs");
        }
    }
    a.stop();
    elapsed_note("ext4_points_pass_fsck", start);
}

/// Views opened while a write load is applied and points expire (window
/// 10 s): a view at an early point and one at `latest` (whose blocks the
/// load overwrites right after it is opened), each read a few times over
/// ~15 s, always read the same; the early one equals its reference. Both
/// outlive the window (their pins keep them) while the points around them
/// expire; once closed, they expire too.
#[test]
fn views_under_load_never_change() {
    for t in ["qemu-io", "qemu-img", "nbdcopy"] {
        need_tool(t);
    }
    let start = Instant::now();
    let seed = seed();
    let mut rng = StdRng::seed_from_u64(seed);
    let dir = tmpdir("rp-views");
    let d = dir.path();
    let window = 10.0;
    let site = Site::start_with(d, &["--retention-window", "10s"], &[]);
    let size = 32 * MIB;
    let a = agent(&site, d, "vw", size, &[]);
    site.wait("vw", T);
    let data = d.join("data");
    for _ in 0..3 {
        burst(&a.sock, size, &mut rng, 40, (0, size), 0.0).unwrap_or_else(|e| panic!("{e}"));
    }
    // At most one crash point a second (the default interval).
    std::thread::sleep(Duration::from_millis(1100));
    let r = reference(&a.state, &a.disk, d.join("ref.raw"), || {
        burst(&a.sock, size, &mut rng, 40, (0, size), 0.0)
    });
    site.wait("vw", T);
    let early = point_of(&points(&data, "vw"), &r).expect("a point for the reference burst");

    // The view at `early` is opened (and pins its point) before the load
    // starts: once newer flush points arrive, `early`, the newest until
    // then, may be thinned away (one crash point a second) unless pinned.
    let v1 = Mount::at_seq(&data, "vw", early, &d.join("v1.sock"));
    let load = Load::start(&a.sock, size, seed ^ 0x5eed);
    let applied = || site.disk_status("vw")["applied_seq"].as_u64().expect("applied_seq");
    let applied0 = applied();
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_secs(2));
    let v2 = Mount::start(&["--data", s(&data), "vw", "--at", "latest"], &d.join("v2.sock"));
    // "opened point seq N, …"
    let latest: u64 = v2.lines[0]
        .strip_prefix("opened point seq ")
        .and_then(|r| r.split(',').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("latest opened {:?}", v2.lines));
    assert!(latest > early);
    let (first1, first2) = (d.join("v1-first.raw"), d.join("v2-first.raw"));
    v1.copy_to(&first1, COPY);
    compare(&first1, &r.file).unwrap_or_else(|e| panic!("view at {early}: {e}"));
    v2.copy_to(&first2, COPY);
    let again = d.join("again.raw");
    let mut reads = 1;
    while t0.elapsed() < Duration::from_secs(16) && reads < 12 {
        std::thread::sleep(Duration::from_millis(1500));
        v1.copy_to(&again, COPY);
        compare(&again, &first1).unwrap_or_else(|e| panic!("view at {early}, read {reads}: {e}"));
        v2.copy_to(&again, COPY);
        compare(&again, &first2).unwrap_or_else(|e| panic!("latest view ({:?}), read {reads}: {e}", v2.lines));
        reads += 1;
    }
    let applied1 = applied();
    let secs = t0.elapsed().as_secs_f64();
    eprintln!(
        "{reads} reads of each view over {secs:.1} s while {} records were applied ({:.0}/s)",
        applied1 - applied0,
        (applied1 - applied0) as f64 / secs
    );
    assert!(reads >= 4, "only {reads} reads");
    assert!(
        applied1 > applied0 + 100,
        "apply did not go on: {applied0} → {applied1}"
    );
    // Expiry ran meanwhile: only the pinned points are older than the
    // window.
    let pts = points(&data, "vw");
    assert_eq!(pts[0].seq, early, "the pinned point expired: {pts:?}");
    assert!(pts.iter().any(|p| p.seq == latest), "the pinned point expired: {pts:?}");
    assert!(
        age_s(&pts[0].time) > window,
        "the pinned point is not past the window yet"
    );
    for p in pts.iter().filter(|p| p.seq != early && p.seq != latest) {
        let age = age_s(&p.time);
        assert!(
            age < window + 4.0,
            "point {} is {age:.1} s old: expiry did not run",
            p.seq
        );
    }
    v1.stop();
    v2.stop();
    // Unpinned, both expire with the next batches.
    let t1 = Instant::now();
    while points(&data, "vw").iter().any(|p| p.seq == early || p.seq == latest) {
        assert!(
            t1.elapsed() < Duration::from_secs(15),
            "the pinned points did not expire once unpinned"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let bursts = load.finish();
    eprintln!(
        "load: {bursts} bursts of 32 writes in {:.1} s",
        t0.elapsed().as_secs_f64()
    );
    wait_and_compare(&site, "vw", &a.disk, Duration::from_secs(120));
    a.stop();
    elapsed_note("views_under_load_never_change", start);
}

/// Sum of the sizes of the disk's undo segments, and their names.
fn undo_files(data: &Path, disk: &str) -> (u64, Vec<String>) {
    let mut total = 0;
    let mut names = Vec::new();
    for e in fs::read_dir(data.join(disk).join("undo")).unwrap() {
        let e = e.unwrap();
        total += e.metadata().unwrap().len();
        names.push(e.file_name().to_string_lossy().to_string());
    }
    names.sort();
    (total, names)
}

/// `--retention-window 5s`: after four whole-disk overwrites (more than
/// one 64 MiB undo segment) and a pause, new writes expire the old points,
/// whole segments are deleted (the undo folder shrinks, the first segment
/// goes), no listed point is older than the window, and every remaining
/// point still reads as its reference.
#[test]
fn retention_window_expires_old_points() {
    for t in ["qemu-io", "qemu-img", "nbdcopy"] {
        need_tool(t);
    }
    let start = Instant::now();
    let mut rng = StdRng::seed_from_u64(seed());
    let dir = tmpdir("rp-expire");
    let d = dir.path();
    let window = 5.0;
    let site = Site::start_with(d, &["--retention-window", "5s", "--point-interval", "0"], &[]);
    let size = 32 * MIB;
    let a = agent(&site, d, "ex", size, &[]);
    site.wait("ex", T);
    let data = d.join("data");
    let uri = a.uri();
    let whole = |pat: u8| {
        let out = run(
            Command::new("qemu-io")
                .args(["-f", "raw", "-t", "none"])
                .arg(&uri)
                .args(["-c", &format!("write -P {pat} 0 16M")])
                .args(["-c", &format!("write -P {pat} 16M 16M")])
                .args(["-c", "flush"]),
            T,
        );
        out.status.success() && !String::from_utf8_lossy(&out.stdout).contains("failed")
    };

    // Old points: the disk filled, then overwritten whole four times (each
    // overwrite follows a point, so all of it is captured: ~128 MiB undo).
    let mut old = Vec::new();
    let mut max_undo = 0;
    for pat in 1..=5u8 {
        assert!(whole(pat), "qemu-io write {pat}");
        site.wait("ex", T);
        let after = last_seq(&a.state);
        old.extend(
            points(&data, "ex")
                .into_iter()
                .filter(|p| p.seq <= after)
                .map(|p| p.seq),
        );
        max_undo = max_undo.max(undo_files(&data, "ex").0);
    }
    old.sort_unstable();
    old.dedup();
    let (_, segs_before) = undo_files(&data, "ex");
    eprintln!("undo {max_undo} bytes in {segs_before:?}; old points {old:?}");
    assert!(
        segs_before.len() >= 2,
        "expected more than one undo segment: {segs_before:?}"
    );
    assert!(max_undo > 96 * MIB, "undo {max_undo}");
    let last_old = Instant::now();

    // Past the window, new points (small bursts, each with a reference).
    std::thread::sleep(Duration::from_secs_f64(window + 1.0));
    let hot = (0, MIB);
    let mut refs = Vec::new();
    for i in 0..4 {
        let r = reference(&a.state, &a.disk, d.join(format!("ref{i}.raw")), || {
            burst(&a.sock, size, &mut rng, 24, hot, 0.8)
        });
        site.wait("ex", T);
        refs.push(r);
        std::thread::sleep(Duration::from_millis(1200));
    }
    assert!(last_old.elapsed().as_secs_f64() > window + 2.0);
    // One more batch so that expiry runs now.
    let r = reference(&a.state, &a.disk, d.join("ref-last.raw"), || {
        burst(&a.sock, size, &mut rng, 8, hot, 0.8)
    });
    site.wait("ex", T);
    refs.push(r);

    let pts = points(&data, "ex");
    assert!(!pts.is_empty());
    for p in &pts {
        assert!(!old.contains(&p.seq), "point {} outlived the window: {pts:?}", p.seq);
        let age = age_s(&p.time);
        assert!(age < window + 4.0, "point {} is {age:.1} s old", p.seq);
    }
    let (undo_after, segs_after) = undo_files(&data, "ex");
    eprintln!("after expiry: undo {undo_after} bytes in {segs_after:?}; points {pts:?}");
    assert!(
        !segs_after.contains(&segs_before[0]),
        "the first segment {} was not deleted: {segs_after:?}",
        segs_before[0]
    );
    assert!(
        undo_after + 64 * MIB <= max_undo,
        "the undo folder did not shrink: {max_undo} → {undo_after}"
    );
    let st = site.disk_status("ex");
    eprintln!("status: {st}");

    let todo: Vec<(u64, PathBuf)> = pts
        .iter()
        .map(|p| {
            let r = ref_for(&refs, p.seq).unwrap_or_else(|| panic!("point {} has no reference: {refs:?}", p.seq));
            (p.seq, r.file.clone())
        })
        .collect();
    check_points(&data, "ex", d, &todo);
    wait_and_compare(&site, "ex", &a.disk, Duration::from_secs(120));
    a.stop();
    elapsed_note("retention_window_expires_old_points", start);
}

/// Retention on, bursts of writes (each flush referenced) while the
/// target is killed with SIGKILL at random moments six times and
/// restarted: afterwards every listed point reads as its reference and the
/// replica equals the source.
#[test]
fn kill9_target_during_apply_keeps_points_true() {
    for t in ["qemu-io", "qemu-img", "nbdcopy"] {
        need_tool(t);
    }
    let start = Instant::now();
    let seed = seed();
    let mut rng = StdRng::seed_from_u64(seed);
    let dir = tmpdir("rp-kill");
    let d = dir.path();
    let mut site = Site::start_with(d, &["--retention-window", "1h", "--point-interval", "0"], &[]);
    let size = 32 * MIB;
    let a = agent(&site, d, "kl", size, &[]);
    site.wait("kl", T);
    let data = d.join("data");

    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (stop, state, disk, sock, d) = (
            stop.clone(),
            a.state.clone(),
            a.disk.clone(),
            a.sock.clone(),
            d.to_path_buf(),
        );
        let mut rng = StdRng::seed_from_u64(seed ^ 0x1111);
        std::thread::spawn(move || {
            let mut refs = Vec::new();
            let t = Instant::now();
            let hot = (8 * MIB, 10 * MIB);
            for i in 0..60 {
                if stop.load(Ordering::Relaxed) || t.elapsed() > Duration::from_secs(40) {
                    break;
                }
                let writes = rng.gen_range(32..=96);
                refs.push(reference(&state, &disk, d.join(format!("ref{i}.raw")), || {
                    burst(&sock, size, &mut rng, writes, hot, 0.5)
                }));
                std::thread::sleep(Duration::from_millis(rng.gen_range(100..400)));
            }
            refs
        })
    };
    let mut in_flight = 0;
    for k in 0..6 {
        std::thread::sleep(Duration::from_millis(rng.gen_range(300..1200)));
        // Prefer a moment when records are on their way to the target (it
        // is receiving or applying them): poll briefly for one.
        let t = Instant::now();
        let mut busy = false;
        while !busy && t.elapsed() < Duration::from_millis(800) {
            let st = site.disk_status("kl");
            busy = st["source_seq"].as_u64() > st["applied_seq"].as_u64();
        }
        in_flight += usize::from(busy);
        assert!(
            site.target.alive(),
            "the target died by itself:\n{}",
            tail(&site.target.log_text(), 40)
        );
        site.target.kill9();
        eprintln!(
            "kill -9 #{k} of the target at {:.1} s{}",
            start.elapsed().as_secs_f64(),
            if busy { " (records in flight)" } else { "" }
        );
        std::thread::sleep(Duration::from_millis(rng.gen_range(0..400)));
        site.target.restart();
    }
    std::thread::sleep(Duration::from_secs(1));
    stop.store(true, Ordering::Relaxed);
    let refs = writer.join().expect("writer");
    assert!(refs.len() >= 5, "only {} bursts", refs.len());
    wait_and_compare(&site, "kl", &a.disk, Duration::from_secs(120));
    assert!(compare(&refs[0].file, &a.disk).is_err(), "the disk never changed");

    let pts = points(&data, "kl");
    let mut todo = Vec::new();
    for r in &refs {
        assert!(point_of(&pts, r).is_some(), "no point for the burst {r:?}: {pts:?}");
    }
    for p in &pts {
        let r = ref_for(&refs, p.seq).unwrap_or_else(|| panic!("point {} has no reference", p.seq));
        todo.push((p.seq, r.file.clone()));
    }
    eprintln!(
        "{} bursts, {in_flight} of 6 kills with records in flight, comparing {} points",
        refs.len(),
        todo.len()
    );
    check_points(&data, "kl", d, &todo);
    a.stop();
    elapsed_note("kill9_target_during_apply_keeps_points_true", start);
}
