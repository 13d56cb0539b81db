//! Tracking until applied (issue 13, part 2; docs/failback.md, section 2),
//! the way a disaster tests it: the target is down, the collector
//! acknowledges the agent's writes and the agent recycles its journal; then
//! the agent is killed. Its state directory alone must still name every
//! region written beyond what the target applied (`tidemark journal
//! unapplied`), and once the target is back and has applied them, nothing
//! is kept past the journal any more.

use std::time::Duration;

use tidemark_tests::pipe::*;
use tidemark_tests::recovery::*;
use tidemark_tests::*;

const SIZE: u64 = 64 * MIB;
const T: Duration = Duration::from_secs(120);

fn write(a: &Agent, at: u64, len: u64, pat: u8) {
    write_pattern(&a.sock, at, len, pat);
}

/// `tidemark journal unapplied --json` on a state directory.
fn unapplied(state: &std::path::Path) -> serde_json::Value {
    let o = run_ok(
        tidemark().args(["journal", "unapplied", "--state", s(state), "--json"]),
        T,
    );
    serde_json::from_str(&stdout(&o)).expect("JSON")
}

fn covers(v: &serde_json::Value, at: u64, len: u64) -> bool {
    v["regions"].as_array().unwrap().iter().any(|r| {
        let (o, l) = (r[0].as_u64().unwrap(), r[1].as_u64().unwrap());
        o <= at && at + len <= o + l
    })
}

#[test]
fn the_state_directory_names_what_the_target_never_applied() {
    need_tool("qemu-io");
    let dir = tmpdir("tracking");
    let d = dir.path();
    let mut site = Site::start(d, &[]);
    // A small journal: its segments recycle as soon as they are acknowledged.
    let a = agent(&site, d, "vm", SIZE, &["--journal-cap", "16M"]);
    write(&a, 0, 2 * MIB, 0x11);
    wait_and_compare(&site, "vm", &a.disk, Duration::from_secs(180));
    poll_until("the target's applied seq to reach the agent", T, || {
        a.status()["target_applied_seq"].as_u64().unwrap_or(0) > 0
    });

    // The target goes away; the collector keeps acknowledging.
    site.target.kill9();
    let written = [
        (20 * MIB, 6 * MIB, 0x21u8),
        (50 * MIB, MIB, 0x22),
        (7 * MIB + 4096, 8192, 0x23),
    ];
    for (at, len, pat) in written {
        write(&a, at, len, pat);
    }
    poll_until("the journal to be consumed up to the last write", T, || {
        let st = a.status();
        st["consumed_seq"] == st["last_seq"] && st["acked_seq"] == st["last_seq"]
    });
    let st = a.status();
    assert!(
        st["unapplied"]["bytes"].as_u64().unwrap() >= 7 * MIB,
        "kept past the journal: {}",
        st["unapplied"]
    );
    let text = stdout(&run_ok(tidemark().args(["agent-status", "--agent", s(&a.state)]), T));
    assert!(text.contains("not applied, past journal"), "{text}");

    // A disaster: the agent dies; only its state directory is left.
    let state = a.state.clone();
    let disk = a.disk.clone();
    a.kill9();
    let v = unapplied(&state);
    for (at, len, _) in written {
        assert!(covers(&v, at, len), "{at}+{len} not named: {v}");
    }
    assert!(v["past_journal_bytes"].as_u64().unwrap() >= 7 * MIB, "{v}");
    // Not the whole disk: only what was written.
    assert!(v["bytes"].as_u64().unwrap() < SIZE / 2, "{v}");
    let text = stdout(&run_ok(
        tidemark().args(["journal", "unapplied", "--state", s(&state)]),
        T,
    ));
    assert!(text.contains("kept past the journal"), "{text}");

    // The target comes back, the agent restarts: everything is applied and
    // nothing is kept past the journal any more.
    site.target.restart();
    let mut flags: Vec<String> = vec!["--disk-id".into(), "vm".into(), "--journal-cap".into(), "16M".into()];
    flags.extend(site.agent_flags());
    let refs: Vec<&str> = flags.iter().map(String::as_str).collect();
    let a = Agent::start(&disk, &state, &d.join("vm2.sock"), &refs);
    wait_and_compare(&site, "vm", &a.disk, Duration::from_secs(180));
    poll_until("the kept regions to be dropped", T, || {
        a.status()["unapplied"]["epochs"] == 0
    });
    a.stop();
    assert_eq!(unapplied(&state)["past_journal_bytes"], 0);
}
