//! The way back (issue 13; docs/failback.md, sections 1–3), with real
//! processes on two "sites": a disk protected from site A to site B is
//! failed over on B with `--protect-state`, the copy is protected in
//! reverse through a second collector, the old disk on A is adopted with
//! `tidemark reprotect`, and once a target serves it the two sides agree on
//! their common generation: only the copy's writes since the failover (and
//! what A wrote that B never got) cross the wire, never the whole disk.
//! A divergent old source is refused by name, and `--discard-divergent`
//! keeps its state before overwriting it.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use tidemark_tests::pipe::*;
use tidemark_tests::recovery::*;
use tidemark_tests::*;

const SIZE: u64 = 64 * MIB;
const T: Duration = Duration::from_secs(120);
const ID: &str = "vm";

/// Site A on the way back: a collector (for the copy's agent) forwarding to
/// a target port on which nothing listens until `start_target`.
struct Back {
    dir: PathBuf,
    token: PathBuf,
    collector: Service,
    collector_port: u16,
    api_port: u16,
    target_port: u16,
    target: Option<Service>,
}

impl Back {
    fn start(dir: &Path, token: &Path) -> Back {
        let (collector_port, api_port, target_port) = (free_port(), free_port(), free_port());
        let args: Vec<String> = vec![
            "--listen".into(),
            format!("127.0.0.1:{collector_port}"),
            "--spool".into(),
            dir.join("spool2").display().to_string(),
            "--target".into(),
            format!("127.0.0.1:{target_port}"),
            "--api".into(),
            format!("127.0.0.1:{api_port}"),
            "--token-file".into(),
            token.display().to_string(),
            "--tls".into(),
            tls_identity(dir, "collector", "c2").display().to_string(),
        ];
        let collector = Service::start("tidemark-collector", &args, &dir.join("collector2.log"), api_port);
        Back {
            dir: dir.into(),
            token: token.into(),
            collector,
            collector_port,
            api_port,
            target_port,
            target: None,
        }
    }

    fn data(&self) -> PathBuf {
        self.dir.join("data-a")
    }

    fn start_target(&mut self) {
        let args: Vec<String> = vec![
            "--listen".into(),
            format!("127.0.0.1:{}", self.target_port),
            "--data".into(),
            self.data().display().to_string(),
            "--token-file".into(),
            self.token.display().to_string(),
            "--tls".into(),
            tls_identity(&self.dir, "target", "ta").display().to_string(),
        ];
        self.target = Some(Service::start(
            "tidemark-target",
            &args,
            &self.dir.join("target-a.log"),
            self.target_port,
        ));
    }

    fn agent(&self, disk: &Path, state: &Path, sock: &Path) -> Agent {
        Agent::start(
            disk,
            state,
            sock,
            &[
                "--disk-id",
                ID,
                "--collector",
                &format!("127.0.0.1:{}", self.collector_port),
                "--token-file",
                s(&self.token),
                "--tls",
                s(&tls_identity(&self.dir, "agent", "b")),
            ],
        )
    }

    fn api(&self) -> String {
        format!("https://127.0.0.1:{}", self.api_port)
    }

    fn disk_status(&self) -> serde_json::Value {
        let out = run_ok(tidemark().args(["status", "--api", &self.api(), "--json"]), T);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        v["disks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["disk_id"] == ID)
            .cloned()
            .unwrap()
    }

    fn wait(&self) {
        let out = run(
            tidemark().args(["wait", "--api", &self.api(), ID, "--timeout", "120s"]),
            Duration::from_secs(150),
        );
        assert!(
            out.status.success(),
            "wait: {}{}\n--- collector2:\n{}\n--- target A:\n{}",
            stdout(&out),
            stderr(&out),
            tail(&self.collector.log_text(), 40),
            self.target
                .as_ref()
                .map(|t| tail(&t.log_text(), 40))
                .unwrap_or_default()
        );
    }
}

/// Forward protection A → B, some writes replicated; returns the site and
/// A's agent.
fn forward(d: &Path) -> (Site, Agent) {
    let site = Site::start(d, &[]);
    let a = agent(&site, d, ID, SIZE, &[]);
    write_pattern(&a.sock, 0, 8 * MIB, 0x11);
    write_pattern(&a.sock, 30 * MIB, MIB, 0x12);
    wait_and_compare(&site, ID, &a.disk, Duration::from_secs(180));
    (site, a)
}

fn failover_protect(d: &Path) -> (PathBuf, PathBuf, String) {
    let b_disk = d.join("b.raw");
    let b_state = d.join("b.state");
    let out = run_ok(
        tidemark().args([
            "failover",
            "--data",
            s(&d.join("data")),
            ID,
            "--at",
            "latest",
            "--no-drain",
            "--output",
            s(&b_disk),
            "--protect-state",
            s(&b_state),
        ]),
        T,
    );
    let text = stdout(&out);
    assert!(text.contains("prepared") && text.contains("forked at seq"), "{text}");
    (b_disk, b_state, text)
}

#[test]
fn failback_resyncs_only_what_the_copy_wrote() {
    need_tool("qemu-io");
    let dir = tmpdir("reprotect");
    let d = dir.path();
    let (site, a) = forward(d);
    let gen_a = a.status()["generation"].as_str().unwrap().to_string();
    let (a_disk, a_state) = (a.disk.clone(), a.state.clone());
    a.stop();

    // Site A is lost for a while: fail over on B, protected in reverse.
    let (b_disk, b_state, _) = failover_protect(d);
    assert_identical(&a_disk, &b_disk);
    // A VMDK output cannot be protected; an existing state directory is refused.
    for (extra, why) in [
        (vec!["--format", "vmdk-flat"], "needs --format raw"),
        (vec![], "already holds an agent state directory"),
    ] {
        let mut args = vec![
            "failover".to_string(),
            "--data".into(),
            s(&d.join("data")).into(),
            ID.into(),
            "--at".into(),
            "latest".into(),
            "--output".into(),
            s(&d.join("other.img")).into(),
            "--protect-state".into(),
            s(&b_state).into(),
        ];
        args.extend(extra.iter().map(|x| x.to_string()));
        let o = run(tidemark().args(&args), T);
        assert!(!o.status.success());
        assert!(stderr(&o).contains(why), "{}", stderr(&o));
    }

    let mut back = Back::start(d, &site.token_file);
    let b = back.agent(&b_disk, &b_state, &d.join("b.sock"));
    let st = b.status();
    let gen_b = st["generation"].as_str().unwrap().to_string();
    assert_ne!(gen_b, gen_a, "the copy holds a new generation");
    let p = st["next_seq"].as_u64().unwrap() - 1;
    write_pattern(&b.sock, 20 * MIB, 3 * MIB, 0x21);
    write_pattern(&b.sock, 40 * MIB, 64 << 10, 0x22);
    let written_b = 3 * MIB + (64 << 10);

    // Refused, each by name, with nothing adopted: the old disk still open
    // in another process, a disk of another size, another disk id.
    let mut holder = Command::new("sleep")
        .arg("60")
        .stdin(std::fs::File::open(&a_disk).unwrap())
        .spawn()
        .unwrap();
    let o = run(
        tidemark().args([
            "reprotect",
            "--data",
            s(&back.data()),
            ID,
            "--replica",
            s(&a_disk),
            "--agent-state",
            s(&a_state),
        ]),
        T,
    );
    let _ = holder.kill();
    let _ = holder.wait();
    assert!(
        !o.status.success() && stderr(&o).contains("is in use: sleep (pid"),
        "{}",
        stderr(&o)
    );
    let bigger = d.join("bigger.raw");
    sparse_file(&bigger, 2 * SIZE);
    for (disk, replica, why) in [(ID, &bigger, "state directory"), ("other", &a_disk, "not \"other\"")] {
        let o = run(
            tidemark().args([
                "reprotect",
                "--data",
                s(&back.data()),
                disk,
                "--replica",
                s(replica),
                "--agent-state",
                s(&a_state),
            ]),
            T,
        );
        assert!(!o.status.success() && stderr(&o).contains(why), "{why}: {}", stderr(&o));
    }
    assert!(
        !back.data().join(ID).exists() || std::fs::read_dir(back.data().join(ID)).unwrap().next().is_none(),
        "a refused reprotect adopts nothing"
    );

    // Site A is back: its disk becomes the copy's replica, in place.
    let text = reprotect(&back.data(), &a_disk, &a_state);
    assert!(text.contains(&format!("generation {}", &gen_a[..16])), "{text}");
    // Reprotect needs to know what the old source wrote.
    let o = run(
        tidemark().args(["reprotect", "--data", s(&d.join("data-x")), ID, "--replica", s(&a_disk)]),
        T,
    );
    assert!(stderr(&o).contains("--agent-state"), "{}", stderr(&o));

    back.start_target();
    back.wait();
    assert_identical(&a_disk, &b_disk);
    let c = back.disk_status();
    assert_eq!(
        (c["resync_regions"].as_u64(), c["target_pending_bytes"].as_u64()),
        (Some(0), Some(0)),
        "{c}"
    );
    let sent = c["payload_bytes"].as_u64().unwrap();
    assert!(
        sent <= written_b * 11 / 10,
        "only the copy's writes since the failover cross: {sent} bytes for {written_b} written: {c}"
    );
    let st = b.status();
    assert!(
        st["sync"].is_null() && st["full_resyncs"] == 0,
        "no whole-disk sync: {st}"
    );
    assert!(
        back.target
            .as_ref()
            .unwrap()
            .log_text()
            .contains("takes the replica over from the failover point"),
        "{}",
        back.target.as_ref().unwrap().log_text()
    );
    let rec = stdout(&run_ok(
        tidemark().args(["status", "--data", s(&back.data()), "--json"]),
        T,
    ));
    assert!(
        rec.contains(&gen_b),
        "the replica holds the copy's generation now: {rec}"
    );
    assert!(p > 0);

    // Protection goes on in the reverse direction.
    write_pattern(&b.sock, 50 * MIB, MIB, 0x23);
    back.wait();
    assert_identical(&a_disk, &b_disk);
    b.stop();
}

#[test]
fn a_divergent_old_source_is_refused_by_name_then_kept_and_overwritten() {
    need_tool("qemu-io");
    let dir = tmpdir("diverge");
    let d = dir.path();
    let (mut site, a) = forward(d);
    // The collector goes away: these writes never leave site A.
    site.collector.kill9();
    write_pattern(&a.sock, 10 * MIB, 2 * MIB, 0x31);
    let (a_disk, a_state) = (a.disk.clone(), a.state.clone());
    a.stop();
    let diverged = d.join("a-diverged.raw");
    copy_sparse(&a_disk, &diverged, T);

    let (b_disk, b_state, _) = failover_protect(d);
    let mut back = Back::start(d, &site.token_file);
    let b = back.agent(&b_disk, &b_state, &d.join("b.sock"));
    write_pattern(&b.sock, 20 * MIB, MIB, 0x41);

    reprotect(&back.data(), &a_disk, &a_state);
    back.start_target();
    let log = back.dir.join("target-a.log");
    poll_until("the divergence to be refused", T, || {
        std::fs::read_to_string(&log).unwrap_or_default().contains("diverged")
    });
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("--discard-divergent"), "{text}");
    // The refusal names both sides' generations and what each wrote since
    // the fork: the old source's 2 MiB (target), the copy's 1 MiB
    // (collector's status and table).
    assert!(text.contains("2.0 MiB in regions"), "{text}");
    let mut refusal = String::new();
    poll_until("the collector's status to show the refusal", T, || {
        refusal = back.disk_status()["target_refusal"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        !refusal.is_empty()
    });
    assert!(refusal.contains("diverged"), "{refusal}");
    assert!(refusal.contains("holds 1.0 MiB written up to seq"), "{refusal}");
    eprintln!("the collector's status: {refusal}");
    let table = stdout(&run(tidemark().args(["status", "--api", &back.api()]), T));
    assert!(table.contains("the target refuses this disk"), "{table}");
    // Nothing was applied: the old disk is as it was.
    assert_identical(&a_disk, &diverged);

    // Proceed: the divergent state is kept, then overwritten from the copy.
    if let Some(mut t) = back.target.take() {
        t.stop();
    }
    let text = reprotect_with(&back.data(), &a_disk, &a_state, &["--discard-divergent"]);
    assert!(text.contains("keeping the divergent state"), "{text}");
    // Kept as a disk of its own, which tidemark mount serves.
    let kept = kept_divergent(&back.data());
    assert_eq!(kept.len(), 1, "{kept:?}");
    assert_identical(&back.data().join(&kept[0]).join("replica.raw"), &diverged);
    let m = Mount::start(
        &["--data", s(&back.data()), &kept[0], "--at", "latest"],
        &d.join("div.sock"),
    );
    let o = run(
        Command::new("qemu-img")
            .args(["compare", "-f", "raw", "-F", "raw"])
            .arg(format!("nbd+unix:///?socket={}", m.sock.display()))
            .arg(&diverged),
        T,
    );
    assert!(
        o.status.success(),
        "the divergent point served by tidemark mount: {}{}",
        stdout(&o),
        stderr(&o)
    );
    drop(m);
    back.start_target();
    back.wait();
    assert_identical(&a_disk, &b_disk);
    let sent = back.disk_status()["payload_bytes"].as_u64().unwrap();
    assert!(
        sent < 8 * MIB,
        "the copy's writes and A's divergent regions only: {sent}"
    );
    b.stop();
}

/// The old disk is a block device (here a loop device over the file): it
/// is adopted where it is, resynced through the device, and failed over
/// in place, the device being the disk again.
#[test]
fn a_block_device_is_reprotected_in_place() {
    need_tool("qemu-io");
    need_tool("losetup");
    let dir = tmpdir("reprotect-blk");
    let d = dir.path();
    let (site, a) = forward(d);
    let (a_disk, a_state) = (a.disk.clone(), a.state.clone());
    a.stop();
    let (b_disk, b_state, _) = failover_protect(d);
    let mut back = Back::start(d, &site.token_file);
    let b = back.agent(&b_disk, &b_state, &d.join("b.sock"));
    write_pattern(&b.sock, 20 * MIB, 2 * MIB, 0x61);
    let mut undo = Undo::default();
    let dev = undo.losetup(&a_disk);
    let text = reprotect(&back.data(), Path::new(&dev), &a_state);
    assert!(
        text.contains(&format!("reprotected {ID}: {dev} is its replica")),
        "{text}"
    );
    back.start_target();
    back.wait();
    assert_identical(Path::new(&dev), &b_disk);
    let sent = back.disk_status()["payload_bytes"].as_u64().unwrap();
    assert!(sent <= 2 * MIB * 11 / 10, "only the copy's 2 MiB: {sent}");
    b.stop();
    let text = failover_in_place(&back.data(), &d.join("a2.state"));
    assert!(text.contains(&format!("{dev} is the disk again")), "{text}");
    undo.undo();
    assert_identical(&a_disk, &b_disk);
}

/// The old source's state directory is lost with site A: reprotect without
/// `--agent-state` is refused until `--discard-divergent` accepts that the
/// disk is made equal to the copy; then the whole disk is hash-compared
/// and only what differs crosses: the copy's writes and what A wrote that
/// the copy never got.
#[test]
fn reprotect_without_the_state_directory_hash_compares() {
    need_tool("qemu-io");
    let dir = tmpdir("untracked");
    let d = dir.path();
    let (mut site, a) = forward(d);
    site.collector.kill9();
    // Over data the copy holds (0x11), so the compare must send it back.
    write_pattern(&a.sock, 2 * MIB, 2 * MIB, 0x31);
    let (a_disk, a_state) = (a.disk.clone(), a.state.clone());
    a.stop();
    std::fs::remove_dir_all(&a_state).unwrap();

    let (b_disk, b_state, _) = failover_protect(d);
    let mut back = Back::start(d, &site.token_file);
    let b = back.agent(&b_disk, &b_state, &d.join("b.sock"));
    write_pattern(&b.sock, 20 * MIB, MIB, 0x41);
    write_pattern(&b.sock, 50 * MIB, 64 << 10, 0x42);
    let differ = 2 * MIB + MIB + (64 << 10);

    let data_a = back.data();
    let base = ["reprotect", "--data", s(&data_a), ID, "--replica", s(&a_disk)];
    let o = run(tidemark().args(base), T);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("--discard-divergent") && stderr(&o).contains("hash-compared"),
        "{}",
        stderr(&o)
    );
    let o = run_ok(tidemark().args(base).arg("--discard-divergent"), T);
    let text = stdout(&o);
    assert!(
        text.contains("history unknown") && text.contains("hash-compared"),
        "{text}"
    );
    let kept = kept_divergent(&back.data());
    assert!(
        kept.len() == 1 && kept[0].starts_with("vm.divergent-untracked-"),
        "the old disk's state is kept before the resync: {kept:?}"
    );

    back.start_target();
    back.wait();
    assert_identical(&a_disk, &b_disk);
    let sent = back.disk_status()["payload_bytes"].as_u64().unwrap();
    let st = b.status();
    assert_eq!(st["compare_bytes"].as_u64(), Some(SIZE), "{st}");
    assert!(
        sent * 10 <= differ * 11,
        "the copy's writes and A's divergent regions only: {sent} bytes for {differ} that differ: {st}"
    );
    b.stop();
}

/// A failover at an earlier point than the replica had reached: the old
/// source stopped tracking what the target applied after that point, so
/// its state cannot say what it wrote since. The target then hash-compares
/// the whole disk instead of refusing, and the old disk comes back equal
/// to the copy (the writes after the point undone).
#[test]
fn a_failover_at_an_earlier_point_hash_compares_on_the_way_back() {
    need_tool("qemu-io");
    let dir = tmpdir("earlier");
    let d = dir.path();
    let site = Site::start(d, &[]);
    // A small journal, so that it recycles what the target acknowledged.
    let a = agent(&site, d, ID, SIZE, &["--journal-cap", "16M"]);
    write_pattern(&a.sock, 0, 8 * MIB, 0x11);
    wait_and_compare(&site, ID, &a.disk, T);
    let p = tag(&a.state, "before", &[]);
    for pat in 0x13..0x18 {
        write_pattern(&a.sock, 12 * MIB, 4 * MIB, pat);
    }
    site.wait(ID, T);
    // The target's applied seq reaches the agent, which then lets the
    // regions it covers go untracked past the journal.
    poll_until("the agent to stop tracking applied regions past the point", T, || {
        a.status()["unapplied"]["applied_upto"].as_u64().unwrap_or(0) > p
    });
    let (a_disk, a_state) = (a.disk.clone(), a.state.clone());
    a.stop();

    let b_disk = d.join("b.raw");
    let b_state = d.join("b.state");
    run_ok(
        tidemark().args([
            "failover",
            "--data",
            s(&d.join("data")),
            ID,
            "--at",
            "tag:before",
            "--output",
            s(&b_disk),
            "--protect-state",
            s(&b_state),
        ]),
        T,
    );
    let mut back = Back::start(d, &site.token_file);
    let b = back.agent(&b_disk, &b_state, &d.join("b.sock"));
    write_pattern(&b.sock, 40 * MIB, MIB, 0x21);
    // A wrote after the point the copy holds: it diverged, by an amount
    // its state cannot tell; the operator accepts losing those writes.
    reprotect(&back.data(), &a_disk, &a_state);
    back.start_target();
    let log = back.dir.join("target-a.log");
    poll_until("the divergence to be refused", T, || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("an amount not known")
    });
    if let Some(mut t) = back.target.take() {
        t.stop();
    }
    reprotect_with(&back.data(), &a_disk, &a_state, &["--discard-divergent"]);
    back.start_target();
    back.wait();
    assert_identical(&a_disk, &b_disk);
    let st = b.status();
    assert_eq!(
        st["compare_bytes"].as_u64(),
        Some(SIZE),
        "the whole disk compared: {st}"
    );
    let sent = back.disk_status()["payload_bytes"].as_u64().unwrap();
    // The copy's 1 MiB, and the 4 MiB A wrote after the point (zeros on
    // the copy: no payload).
    assert!(sent <= 2 * MIB, "only what differs: {sent}");
    let log = back.target.as_ref().unwrap().log_text();
    assert!(log.contains("hash-compared"), "{}", tail(&log, 30));
    b.stop();
}

/// The disks `--discard-divergent` kept in data directory `data`.
fn kept_divergent(data: &Path) -> Vec<String> {
    std::fs::read_dir(data)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .filter(|n| n.starts_with(&format!("{ID}.divergent-")))
        .collect()
}

/// `tidemark reprotect` (with `extra` flags); its stdout and stderr.
fn reprotect_with(data: &Path, replica: &Path, state: &Path, extra: &[&str]) -> String {
    let o = run_ok(
        tidemark()
            .args([
                "reprotect",
                "--data",
                s(data),
                ID,
                "--replica",
                s(replica),
                "--agent-state",
                s(state),
            ])
            .args(extra),
        T,
    );
    format!("{}{}", stdout(&o), stderr(&o))
}

fn reprotect(data: &Path, replica: &Path, state: &Path) -> String {
    reprotect_with(data, replica, state, &[])
}

/// Fail over in place onto `data`'s adopted replica, preparing `state`.
fn failover_in_place(data: &Path, state: &Path) -> String {
    failover_in_place_with(data, state, &[])
}

/// [`failover_in_place`] with `extra` flags; its stdout.
fn failover_in_place_with(data: &Path, state: &Path, extra: &[&str]) -> String {
    let o = run_ok(
        tidemark()
            .args([
                "failover",
                "--data",
                s(data),
                ID,
                "--at",
                "latest",
                "--in-place",
                "--protect-state",
                s(state),
            ])
            .args(extra),
        T,
    );
    let text = stdout(&o);
    assert!(
        text.contains("in place") && text.contains("is the disk again"),
        "{text}"
    );
    text
}

fn payload(v: &serde_json::Value) -> u64 {
    v["payload_bytes"].as_u64().unwrap()
}

#[test]
fn two_full_cycles_come_home_without_resending_the_disk() {
    need_tool("qemu-io");
    let dir = tmpdir("cycles");
    let d = dir.path();
    let data_b = d.join("data");
    // Cycle 1, out: A → B, failover on B, the copy protected back to A.
    let (mut site, a) = forward(d);
    let (a_disk, a_state) = (a.disk.clone(), a.state.clone());
    a.stop();
    let (b_disk, b_state, _) = failover_protect(d);
    let mut back = Back::start(d, &site.token_file);
    let b = back.agent(&b_disk, &b_state, &d.join("b.sock"));
    write_pattern(&b.sock, 20 * MIB, 2 * MIB, 0x51);
    fio_write(&b.sock, 48 * MIB, "cycle1");
    reprotect(&back.data(), &a_disk, &a_state);
    back.start_target();
    back.wait();
    assert_identical(&a_disk, &b_disk);

    // Cycle 1, home: a planned failover in place on A while B is written:
    // B's agent is quiesced through its collector (it refuses writes from
    // then on), the replica drained to its final tag and failed over at it.
    let a2_state = d.join("a2.state");
    let api = back.api();
    let planned = ["--planned", "--api", &api, "--token-file", s(&site.token_file)];
    // The collector's API wants its token.
    let wrong = d.join("wrong.token");
    write_secret(&wrong, "not-the-token");
    let o = run(
        tidemark().args([
            "failover",
            "--data",
            s(&back.data()),
            ID,
            "--at",
            "latest",
            "--in-place",
            "--planned",
            "--api",
            &api,
            "--token-file",
            s(&wrong),
        ]),
        T,
    );
    assert!(!o.status.success() && stderr(&o).contains("HTTP 401"), "{}", stderr(&o));
    assert!(
        b.status()["quiesced_at_seq"].is_null(),
        "a refused quiesce quiesces nothing"
    );
    let load = Load::start(&b.sock, 32 * MIB, seed());
    std::thread::sleep(Duration::from_secs(2));
    failover_in_place_with(&back.data(), &a2_state, &planned);
    let bursts = load.finish();
    assert!(bursts > 0, "the load wrote before the quiesce");
    let q = b.status()["quiesced_at_seq"].as_u64().expect("B's agent is quiesced");
    assert!(q > 0);
    // B says so to its clients: a write is refused.
    let o = run(
        Command::new("qemu-io")
            .args(["-f", "raw"])
            .arg(format!("nbd+unix:///?socket={}", b.sock.display()))
            .args(["-c", "write -P 9 0 4096"]),
        T,
    );
    let said = format!("{}{}", stdout(&o), stderr(&o));
    assert!(
        said.contains("Operation not permitted") || said.contains("Read-only"),
        "{said}"
    );
    assert_identical(&a_disk, &b_disk);
    poll_until("the copy's agent to be fenced", T, || b.status()["fenced"].is_string());
    b.stop();
    // Site B takes the copy back as the replica: its old replica is kept.
    site.target.stop();
    let text = reprotect(&data_b, &b_disk, &b_state);
    assert!(text.contains("kept as disk vm.retired-"), "{text}");
    site.target.restart();
    let before = payload(&site.disk_status(ID));
    let a = Agent::start(
        &a_disk,
        &a2_state,
        &d.join("a2.sock"),
        &{
            let mut f = vec!["--disk-id".to_string(), ID.into()];
            f.extend(site.agent_flags());
            f
        }
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>(),
    );
    site.wait(ID, Duration::from_secs(120));
    let st = a.status();
    assert!(
        st["sync"].is_null() && st["full_resyncs"] == 0,
        "no sync on the way home: {st}"
    );
    assert_eq!(payload(&site.disk_status(ID)), before, "0 data bytes on the way home");
    assert_identical(&a_disk, &b_disk);
    fio_verify(&a_disk, 48 * MIB, "cycle1");
    // Forward again: A's writes reach the copy on B.
    write_pattern(&a.sock, 33 * MIB, MIB, 0x52);
    site.wait(ID, Duration::from_secs(120));
    assert_identical(&a_disk, &b_disk);
    // The replica B held before the way back is kept, failover record and all.
    let rec: serde_json::Value = serde_json::from_str(&stdout(&run_ok(
        tidemark().args(["status", "--data", s(&data_b), "--json"]),
        T,
    )))
    .unwrap();
    let retired = rec["disks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["disk_id"].as_str().unwrap().starts_with("vm.retired-"))
        .unwrap_or_else(|| panic!("no retired disk: {rec}"));
    assert_eq!(retired["recovery"]["failed_over"], true, "{retired}");

    // Cycle 2: fail over onto B in place, protect back to A, come home.
    let b2_state = d.join("b2.state");
    failover_in_place(&data_b, &b2_state);
    poll_until("A's agent to be fenced", T, || a.status()["fenced"].is_string());
    a.stop();
    let b = back.agent(&b_disk, &b2_state, &d.join("b2.sock"));
    write_pattern(&b.sock, 44 * MIB, MIB, 0x53);
    fio_write(&b.sock, 8 * MIB, "cycle2");
    if let Some(mut t) = back.target.take() {
        t.stop();
    }
    let text = reprotect(&back.data(), &a_disk, &a2_state);
    assert!(text.contains("kept as disk vm.retired-"), "{text}");
    let before = payload(&back.disk_status());
    back.start_target();
    back.wait();
    assert_identical(&a_disk, &b_disk);
    let sent = payload(&back.disk_status()) - before;
    let fio_bytes = 16 * MIB;
    assert!(
        sent <= (MIB + fio_bytes) * 11 / 10,
        "only the copy's 17 MiB since the failover: {sent}"
    );
    fio_verify(&a_disk, 48 * MIB, "cycle1");
    fio_verify(&a_disk, 8 * MIB, "cycle2");
    b.stop();
}

/// fio writes `16 MiB` at `offset` of the disk served at `sock` (random
/// 4 KiB blocks, crc32c verify headers) and verifies them there.
fn fio_write(sock: &Path, offset: u64, job: &str) {
    fio_run(&[
        "--ioengine=nbd".into(),
        format!("--uri=nbd+unix:///?socket={}", sock.display()),
        format!("--name={job}"),
        "--rw=randwrite".into(),
        "--iodepth=8".into(),
        "--do_verify=1".into(),
        format!("--offset={offset}"),
    ]);
}

/// fio verifies, without writing, what [`fio_write`] wrote as `job` at
/// `offset`, reading the raw file `img`: the data came home whole.
fn fio_verify(img: &Path, offset: u64, job: &str) {
    fio_run(&[
        "--ioengine=psync".into(),
        format!("--filename={}", img.display()),
        format!("--name={job}"),
        "--rw=randwrite".into(),
        "--verify_only".into(),
        format!("--offset={offset}"),
    ]);
}

fn fio_run(args: &[String]) {
    let out = run(
        Command::new("fio").args(args).args([
            "--bs=4k",
            "--size=16M",
            "--verify=crc32c",
            "--verify_fatal=1",
            "--verify_state_save=0",
            "--randseed=1313",
        ]),
        T,
    );
    let text = format!("{}{}", stdout(&out), stderr(&out));
    assert!(
        out.status.success() && !text.contains("verify: bad"),
        "fio {args:?}:\n{text}"
    );
}

/// Write files on the ext4 filesystem of the disk served at `sock`
/// (nbdfuse + loop + mount), flushed by the unmount.
fn ext4_write(d: &Path, sock: &Path, tag: &str, files: &[(&str, usize, u8)], mkfs: bool) {
    let mut undo = Undo::default();
    let nbd = undo.nbdfuse(&d.join(format!("fuse-{tag}")), sock);
    let lo = undo.losetup(&nbd);
    if mkfs {
        run_ok(Command::new("mkfs.ext4").args(["-q", "-F", &lo]), T);
    }
    let mnt = d.join(format!("mnt-{tag}"));
    undo.mount(&lo, &mnt, &[]);
    for (name, len, byte) in files {
        std::fs::write(mnt.join(name), vec![*byte; *len]).unwrap();
    }
    run_ok(Command::new("sync").arg("-f").arg(mnt.join(files[0].0)), T);
    undo.undo();
}

/// The files of the ext4 image `img` (read-only, no journal replay), after
/// a clean `e2fsck -fn`.
fn ext4_files(d: &Path, img: &Path, tag: &str) -> Vec<String> {
    let o = run(Command::new("e2fsck").args(["-fn", s(img)]), T);
    assert!(
        o.status.success(),
        "e2fsck {}: {}{}",
        img.display(),
        stdout(&o),
        stderr(&o)
    );
    let mut undo = Undo::default();
    let lo = undo.losetup(img);
    let mnt = d.join(format!("check-{tag}"));
    undo.mount(&lo, &mnt, &["-o", "ro,noload"]);
    let mut names: Vec<String> = std::fs::read_dir(&mnt)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n != "lost+found")
        .collect();
    names.sort();
    undo.undo();
    names
}

/// The unplanned case with a real filesystem: ext4 on the primary;
/// the collector cut, writes that never leave the site, kill -9 of the
/// agent; failover at latest with --protect-state; files written on the
/// copy; reprotect (refused as divergent, then with --discard-divergent:
/// the divergent state mounts and holds the lost files); failback compare,
/// fsck clean, the copy's files there; bytes sent near what both sides
/// wrote since the failover point, not the disk.
#[test]
fn ext4_unplanned_failover_and_way_back() {
    for t in ["mkfs.ext4", "nbdfuse", "losetup", "qemu-io", "e2fsck"] {
        need_tool(t);
    }
    let dir = tmpdir("ext4back");
    let d = dir.path();
    let mut site = Site::start(d, &[]);
    let a = agent(&site, d, ID, SIZE, &[]);
    ext4_write(
        d,
        &a.sock,
        "a1",
        &[("one.bin", 3 << 20, 1), ("two.bin", 1 << 20, 2)],
        true,
    );
    wait_and_compare(&site, ID, &a.disk, Duration::from_secs(180));
    // The site's link goes; the primary writes on, then dies.
    site.collector.kill9();
    let before = a.status()["write_bytes"].as_u64().unwrap();
    ext4_write(d, &a.sock, "a2", &[("lost.bin", 1 << 20, 3)], false);
    let a_div = a.status()["write_bytes"].as_u64().unwrap() - before;
    let (a_disk, a_state) = (a.disk.clone(), a.state.clone());
    a.kill9();

    let (b_disk, b_state, _) = failover_protect(d);
    assert_eq!(ext4_files(d, &b_disk, "b0"), vec!["one.bin", "two.bin"]);
    let mut back = Back::start(d, &site.token_file);
    let b = back.agent(&b_disk, &b_state, &d.join("b.sock"));
    ext4_write(d, &b.sock, "b1", &[("three.bin", 2 << 20, 4)], false);
    let b_written = b.status()["write_bytes"].as_u64().unwrap();

    // Reprotect: the agent died, so its journal is re-applied first; the
    // old disk wrote past the failover point: refused by name.
    let text = reprotect(&back.data(), &a_disk, &a_state);
    assert!(text.contains("re-applied"), "{text}");
    back.start_target();
    let log = back.dir.join("target-a.log");
    poll_until("the divergence to be refused", T, || {
        std::fs::read_to_string(&log).unwrap_or_default().contains("diverged")
    });
    if let Some(mut t) = back.target.take() {
        t.stop();
    }
    let text = reprotect_with(&back.data(), &a_disk, &a_state, &["--discard-divergent"]);
    assert!(text.contains("keeping the divergent state"), "{text}");
    let kept = kept_divergent(&back.data());
    assert_eq!(kept.len(), 1, "the divergent state is kept: {kept:?}");
    let kept = back.data().join(&kept[0]).join("replica.raw");
    assert_eq!(ext4_files(d, &kept, "kept"), vec!["lost.bin", "one.bin", "two.bin"]);
    back.start_target();
    back.wait();
    assert_identical(&a_disk, &b_disk);
    assert_eq!(ext4_files(d, &a_disk, "home"), vec!["one.bin", "three.bin", "two.bin"]);
    let sent = back.disk_status()["payload_bytes"].as_u64().unwrap();
    let both = b_written + a_div;
    assert!(
        sent <= both * 11 / 10 + (1 << 20),
        "sent {sent} bytes for {b_written} written on the copy and {a_div} on the old disk"
    );
    assert!(sent < SIZE / 4, "not the disk: {sent}");
    b.stop();
}

/// kill -9 of the copy's agent, the reverse collector and site A's target
/// while the reverse resync runs (the copy's writes and the old source's
/// divergent regions in flight): each resumes, and the disks end identical.
#[test]
fn kill9_of_every_process_during_the_reverse_resync_resumes() {
    need_tool("qemu-io");
    let dir = tmpdir("revkill");
    let d = dir.path();
    let (mut site, a) = forward(d);
    site.collector.kill9();
    for (i, pat) in (0..8u64).zip(0x60u8..) {
        write_pattern(&a.sock, (34 + 3 * i) * MIB, 2 * MIB, pat);
    }
    let (a_disk, a_state) = (a.disk.clone(), a.state.clone());
    a.kill9();
    let (b_disk, b_state, _) = failover_protect(d);
    let mut back = Back::start(d, &site.token_file);
    let b = back.agent(&b_disk, &b_state, &d.join("b.sock"));
    for (i, pat) in (0..8u64).zip(0x70u8..) {
        write_pattern(&b.sock, (2 + 3 * i) * MIB, 2 * MIB, pat);
    }
    let text = reprotect_with(&back.data(), &a_disk, &a_state, &["--discard-divergent"]);
    assert!(text.contains("keeping the divergent state"), "{text}");
    back.start_target();
    // Each process dies once while the resync runs, and comes back.
    b.kill9();
    let b = back.agent(&b_disk, &b_state, &d.join("b.sock"));
    back.collector.restart();
    if let Some(t) = back.target.as_mut() {
        t.restart();
    }
    b.kill9();
    let b = back.agent(&b_disk, &b_state, &d.join("b.sock"));
    back.wait();
    assert_identical(&a_disk, &b_disk);
    // And replication goes on.
    write_pattern(&b.sock, 60 * MIB, MIB, 0x7f);
    back.wait();
    assert_identical(&a_disk, &b_disk);
    b.stop();
}

/// `POST /api/v1/disks/{id}/quiesce` with a bearer token (what `failover
/// --planned` sends); returns the HTTP status line and the body.
fn quiesce_through_api(site: &Site, token: &str) -> String {
    raw_api(
        site.api_port,
        true,
        &format!(
            "POST /api/v1/disks/{ID}/quiesce HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n\
             Content-Length: 0\r\nConnection: close\r\n\r\n"
        ),
    )
}

/// A write through qemu-io; returns what it said (empty stderr and
/// "wrote" on success).
fn try_write(sock: &Path, pattern: u8, offset: u64) -> String {
    let o = run(
        Command::new("qemu-io")
            .args(["-f", "raw"])
            .arg(format!("nbd+unix:///?socket={}", sock.display()))
            .args(["-c", &format!("write -P {pattern} {offset} 4096")]),
        T,
    );
    format!("{}{}", stdout(&o), stderr(&o))
}

/// A planned failback that does not go ahead: the quiesced agent keeps
/// refusing writes over a restart (STATE/quiesced), and `tidemark resume`
/// lifts the quiesce; the writes after it replicate.
#[test]
fn a_quiesce_survives_a_restart_and_resume_lifts_it() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (site, a) = forward(d);
    let token = std::fs::read_to_string(&site.token_file).unwrap();
    let text = quiesce_through_api(&site, "not-the-token");
    assert!(text.starts_with("HTTP/1.1 401"), "{text}");
    assert!(
        try_write(&a.sock, 7, 0).contains("wrote"),
        "a refused quiesce quiesces nothing"
    );
    let text = quiesce_through_api(&site, token.trim());
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    let q = a.status()["quiesced_at_seq"].as_u64().expect("quiesced");
    let refused = |said: &str| said.contains("Operation not permitted") || said.contains("Read-only");
    let said = try_write(&a.sock, 8, 4096);
    assert!(refused(&said), "{said}");
    // Its final tag is a point of the disk.
    site.wait(ID, T);
    let pts = stdout(&run_ok(
        tidemark().args(["points", "--data", s(&d.join("data")), ID]),
        T,
    ));
    assert!(pts.contains("failback-"), "{pts}");

    // Over a restart the agent stays quiesced.
    let (disk, state) = (a.disk.clone(), a.state.clone());
    a.stop();
    let a = agent(&site, d, ID, SIZE, &[]);
    assert_eq!(a.status()["quiesced_at_seq"].as_u64(), Some(q), "{}", a.status());
    let said = try_write(&a.sock, 9, 8192);
    assert!(refused(&said), "after a restart: {said}");

    // tidemark resume lifts it; writes replicate again.
    let out = run(tidemark().args(["resume", "--agent", s(&state), "other-disk"]), T);
    assert!(!out.status.success(), "resume checks the disk id");
    run_ok(tidemark().args(["resume", "--agent", s(&state), ID]), T);
    assert!(a.status()["quiesced_at_seq"].is_null(), "{}", a.status());
    assert!(try_write(&a.sock, 10, 12288).contains("wrote"));
    write_pattern(&a.sock, 40 * MIB, MIB, 0x61);
    wait_and_compare(&site, ID, &disk, Duration::from_secs(120));
    // And it does not come back over a restart.
    a.stop();
    let a = agent(&site, d, ID, SIZE, &[]);
    assert!(a.status()["quiesced_at_seq"].is_null(), "{}", a.status());
    assert!(try_write(&a.sock, 11, 16384).contains("wrote"));
    a.stop();
}
