//! A failover fences the old source at the first hop (issue 13, part 6;
//! docs/failback.md, section 5), tested the way an operator lives it: two
//! disks share a collector with a small spool; one is failed over at
//! `latest` while its agent keeps running and writing. Then:
//! - the old agent is refused with a named error (stale generation, which
//!   failover, what to do) and its status says `fenced`; its writes stay
//!   tracked in its journal;
//! - none of them is spooled or applied: the collector's spool stays empty
//!   for that disk (what was spooled before the fence is moved aside, kept),
//!   the failed-over replica and its points do not change;
//! - the other disk keeps streaming: its writes, several times the spool
//!   cap after the fence, reach its replica, and it never enters bitmap mode;
//! - the fence survives a collector restart, and neither `--force-resync`
//!   with a new state directory nor the old agent erases the failover record.

use std::time::Duration;

use tidemark_tests::pipe::*;
use tidemark_tests::recovery::*;
use tidemark_tests::*;

const SIZE: u64 = 64 * MIB;
const T: Duration = Duration::from_secs(120);

/// Write `mib` MiB of pattern `pat` at `at_mib` through the agent's shim.
fn write_mib(a: &Agent, at_mib: u64, mib: u64, pat: u8) {
    write_pattern(&a.sock, at_mib * MIB, mib * MIB, pat);
}

fn poll<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let mut got = None;
    poll_until(what, timeout, || {
        got = f();
        got.is_some()
    });
    got.expect("polled")
}

#[test]
fn a_failover_fences_the_old_source_and_spares_the_other_disks() {
    need_tool("qemu-io");
    let dir = tmpdir("fencing");
    let d = dir.path();
    let mut site = Site::start(d, &["--spool-cap", "8M"]);
    let data = d.join("data");
    let a1 = agent(&site, d, "d1", SIZE, &[]);
    let a2 = agent(&site, d, "d2", SIZE, &[]);
    write_mib(&a1, 0, 2, 0x11);
    write_mib(&a2, 0, 2, 0x22);
    wait_and_compare(&site, "d1", &a1.disk, Duration::from_secs(180));
    wait_and_compare(&site, "d2", &a2.disk, Duration::from_secs(180));
    let generation = a1.status()["generation"].as_str().unwrap().to_string();
    assert_eq!(generation.len(), 32, "a generation id: {generation}");

    // Fail d1 over at latest while its agent keeps running.
    let out = d.join("d1-failover.raw");
    run_ok(
        tidemark().args([
            "failover",
            "--data",
            s(&data),
            "d1",
            "--at",
            "latest",
            "--output",
            s(&out),
        ]),
        T,
    );
    assert_identical(&a1.disk, &out);
    let replica = d.join("d1-replica-at-failover.raw");
    copy_sparse(&site.replica("d1"), &replica, T);
    let points_before = points_json(&data, "d1");

    // The old agent is told, by name, and says so.
    let fenced = poll("the agent to be fenced", Duration::from_secs(60), || {
        a1.status()["fenced"].as_str().map(str::to_string)
    });
    assert!(fenced.contains("was failed over"), "{fenced}");
    assert!(fenced.contains(&generation[..16]), "names the generation: {fenced}");
    assert!(fenced.contains(s(&out)), "names the failover's output: {fenced}");
    let text = stdout(&run_ok(tidemark().args(["agent-status", "--agent", s(&a1.state)]), T));
    assert!(text.contains("fenced (a failover ended this generation"), "{text}");
    assert!(
        a1.log_text().contains("stale generation"),
        "{}",
        tail(&a1.log_text(), 20)
    );

    // Its writes go on, tracked, and nowhere else: three times the spool cap.
    let last_before = a1.status()["last_seq"].as_u64().unwrap();
    for (i, pat) in [0x40u8, 0x41, 0x42].into_iter().enumerate() {
        write_mib(&a1, 8 + 8 * i as u64, 8, pat);
    }
    let st1 = a1.status();
    assert!(st1["last_seq"].as_u64().unwrap() > last_before, "journaled: {st1}");
    assert!(st1["fenced"].is_string(), "{st1}");

    // The other disk streams through the same collector meanwhile.
    for (i, pat) in [0x60u8, 0x61, 0x62].into_iter().enumerate() {
        write_mib(&a2, 8 + 8 * i as u64, 8, pat);
        wait_and_compare(&site, "d2", &a2.disk, Duration::from_secs(180));
    }
    assert_eq!(a2.status()["mode"], "journal", "d2 never went to bitmap mode");
    let st = site.status();
    let c = &st["collector"];
    assert!(
        c["spool_bytes"].as_u64().unwrap() < 8 * MIB && c["spool_full"] == false,
        "the fenced disk takes no share of the spool: {c}"
    );
    let s1 = site.disk_status("d1");
    assert_eq!(s1["mode"], "fenced", "{s1}");
    assert_eq!(s1["spool_bytes"], 0, "{s1}");
    assert!(
        s1["fenced"]["reason"].as_str().unwrap().contains("was failed over"),
        "{s1}"
    );

    // The failed-over replica, its points and record did not move.
    assert_identical(&site.replica("d1"), &replica); // nothing applied after the failover
    assert_eq!(points_json(&data, "d1"), points_before);

    // `status --check` warns (not critical: fencing is how it should be).
    let o = run(
        tidemark().args(["status", "--api", &site.api(), "--data", s(&data), "--check"]),
        T,
    );
    let text = stdout(&o);
    assert_eq!(o.status.code(), Some(1), "a warning: {text}");
    assert!(
        text.contains("fenced: a failover ended this disk's generation"),
        "{text}"
    );

    // The fence is durable: a collector restart keeps refusing the agent.
    site.collector.kill9();
    site.collector.restart();
    write_mib(&a1, 40, 1, 0x7f);
    poll("the restarted collector to list d1 as fenced", T, || {
        (site.disk_status("d1")["mode"] == "fenced").then_some(())
    });
    assert!(a1.status()["fenced"].is_string());
    assert_eq!(site.disk_status("d1")["spool_bytes"], 0);
    assert_identical(&site.replica("d1"), &replica);

    // --force-resync with a new state directory does not erase the failover.
    let disk1 = a1.disk.clone();
    a1.stop();
    let state2 = d.join("d1.state2");
    let mut flags: Vec<String> = vec!["--disk-id".into(), "d1".into(), "--force-resync".into()];
    flags.extend(site.agent_flags());
    let refs: Vec<&str> = flags.iter().map(String::as_str).collect();
    let again = Agent::start(&disk1, &state2, &d.join("d1b.sock"), &refs);
    let why = poll("the forced agent to be refused", Duration::from_secs(60), || {
        again.status()["fenced"].as_str().map(str::to_string)
    });
    assert!(why.contains("fenced since"), "{why}");
    let rec = stdout(&run_ok(tidemark().args(["status", "--data", s(&data), "--json"]), T));
    let v: serde_json::Value = serde_json::from_str(&rec).unwrap();
    let r = v["disks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["disk_id"] == "d1")
        .unwrap();
    assert_eq!(r["recovery"]["failed_over"], true, "{r}");
    assert_eq!(r["recovery"]["generation"], generation.as_str(), "{r}");
    assert_eq!(points_json(&data, "d1"), points_before);
    assert_identical(&site.replica("d1"), &replica);
    again.stop();
    a2.stop();
}
