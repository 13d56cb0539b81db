//! The command line against a reader that goes away, retries and health
//! checks: every command of every binary, with real services, run with
//! its stdout a pipe whose reader is already gone (`cmd | head -0`, made
//! deterministic): no panic (exit 101), no "Broken pipe" error, the exit
//! code the command has anyway, and side effects reported truthfully.

use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use tidemark_tests::pipe::*;
use tidemark_tests::recovery::{stderr, stdout, tidemark};
use tidemark_tests::*;

const T: Duration = Duration::from_secs(120);

/// Run `cmd` with stdout a pipe whose read end is closed; its exit status
/// and stderr.
fn closed_stdout(cmd: &mut Command) -> (ExitStatus, String) {
    let (r, w) = std::io::pipe().expect("pipe");
    drop(r);
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(w)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    let mut err = child.stderr.take().expect("stderr");
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut err, &mut s);
        s
    });
    let start = Instant::now();
    let st = loop {
        if let Some(st) = child.try_wait().expect("try_wait") {
            break st;
        }
        if start.elapsed() > T {
            let _ = child.kill();
            panic!("{cmd:?} did not finish within {T:?} with a closed stdout");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    (st, reader.join().unwrap_or_default())
}

/// `cmd` with a closed stdout exits with `code`, no panic, no pipe error.
#[track_caller]
fn survives(cmd: &mut Command, code: i32) -> String {
    let (st, err) = closed_stdout(cmd);
    assert!(
        !err.contains("panicked") && !err.to_lowercase().contains("broken pipe"),
        "{cmd:?} with a closed stdout: {st}, stderr:\n{err}"
    );
    assert_eq!(st.code(), Some(code), "{cmd:?} with a closed stdout, stderr:\n{err}");
    err
}

fn tm(args: &[&str]) -> Command {
    let mut c = tidemark();
    c.args(args);
    c
}

/// Every subcommand, and every daemon's --help/--version, with a closed
/// stdout against a real pipeline; `tag` and `failover` do their work
/// (and a retried tag succeeds with the same seq).
#[test]
fn every_command_survives_a_closed_stdout() {
    let dir = tmpdir("cli-pipes");
    let d = dir.path();
    let site = Site::start(d, &[]);
    let a = agent(&site, d, "cp", 16 * MIB, &[]);
    let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(seed());
    assert!(write_burst(&a.sock, 16 * MIB, &mut rng, 64));
    site.wait("cp", T);
    let (api, data, state) = (site.api(), d.join("data"), d.join("cp.state"));
    let (data, state) = (s(&data), s(&state));

    // Help and version screens of every binary.
    for b in ["tidemark", "tidemark-agent", "tidemark-collector", "tidemark-target"] {
        survives(Command::new(bin(b)).arg("--help"), 0);
        survives(Command::new(bin(b)).arg("--version"), 0);
    }
    survives(Command::new(bin("tidemark-agent")).args(["protect", "--help"]), 0);
    survives(&mut tm(&["help"]), 0);
    survives(&mut tm(&["help", "status"]), 0);
    let subs: [&[&str]; 11] = [
        &["status"],
        &["events"],
        &["wait"],
        &["tag"],
        &["points"],
        &["mount"],
        &["failover"],
        &["agent-status"],
        &["journal"],
        &["journal", "dump"],
        &["journal", "replay"],
    ];
    for sub in subs {
        let mut args = sub.to_vec();
        args.push("--help");
        survives(&mut tm(&args), 0);
        if sub != ["journal"] {
            // A usage line that names what is required, and an example.
            let o = run_ok(&mut tm(&args), T);
            let h = stdout(&o);
            assert!(h.contains("Usage: tidemark "), "{sub:?}: {h}");
            assert!(h.contains("Example"), "{sub:?} --help has no example:\n{h}");
            assert!(
                !h.contains("[--data <DIR>]"),
                "{sub:?}: a required flag shown as optional:\n{h}"
            );
        }
    }

    // Reading commands.
    for args in [
        vec!["status", "--api", &api],
        vec!["status", "--api", &api, "--json"],
        vec!["status", "--data", data],
        vec!["status", "--data", data, "--json"],
        vec!["status", "--api", &api, "--data", data],
        vec!["status", "--api", &api, "--check"],
        vec!["status", "--api", &api, "--check", "--json"],
        vec!["agent-status", "--agent", state],
        vec!["agent-status", "--agent", state, "--json"],
        vec!["agent-status", "--agent", state, "--metrics"],
        vec!["journal", "dump", "--state", state],
        vec!["journal", "dump", "--state", state, "--json"],
        vec!["points", "--data", data, "cp"],
        vec!["points", "--data", data, "cp", "--json"],
        vec!["events", "--api", &api],
        vec!["events", "cp", "--api", &api, "--json"],
        vec!["wait", "--api", &api, "cp", "--timeout", "60s"],
    ] {
        survives(&mut tm(&args), 0);
        // And as an operator types it: piped into `head -1` under pipefail.
        let line = std::iter::once(bin("tidemark").display().to_string())
            .chain(args.iter().map(|a| format!("'{a}'")))
            .collect::<Vec<_>>()
            .join(" ");
        let o = run(
            Command::new("bash").args(["-o", "pipefail", "-c", &format!("{line} | head -1")]),
            T,
        );
        assert!(
            o.status.success() && !stderr(&o).contains("panicked"),
            "{line} | head -1: {}\n{}",
            o.status,
            stderr(&o)
        );
        assert_eq!(stdout(&o).lines().count(), 1, "{line} | head -1");
    }
    // A command that fails still fails with its own error, once.
    let err = survives(&mut tm(&["agent-status", "--agent", s(d)]), 1);
    assert_eq!(err.matches("tidemark: error:").count(), 1, "{err}");

    // tag: done despite the closed stdout; a retry reports the same seq.
    survives(&mut tm(&["tag", "--agent", state, "pipe-tag"]), 0);
    let o = run_ok(&mut tm(&["tag", "--agent", state, "pipe-tag"]), T);
    let seq: u64 = stdout(&o).parse().expect("tag prints its seq");
    assert!(stderr(&o).contains("not inserted again"), "{}", stderr(&o));
    let dump = stdout(&run_ok(&mut tm(&["journal", "dump", "--state", state, "--json"]), T));
    let tags: Vec<&str> = dump.lines().filter(|l| l.contains("\"tag\":\"pipe-tag\"")).collect();
    assert_eq!(tags.len(), 1, "one tag record:\n{dump}");
    assert!(tags[0].contains(&format!("\"seq\":{seq},")), "{}", tags[0]);

    // journal replay prints nothing on stdout; it must not care either.
    let copy = d.join("replay.img");
    sparse_file(&copy, 16 * MIB);
    let (st, _) = closed_stdout(&mut tm(&["journal", "replay", "--state", state, "--onto", s(&copy)]));
    assert_ne!(st.code(), Some(101));

    // mount: serves with a closed stdout until told to stop.
    let sock = d.join("view.sock");
    let mut m = tm(&["mount", "--data", data, "cp", "--at", "latest", "--listen"]);
    let mut child = m
        .arg(format!("unix:{}", sock.display()))
        .stdout({
            let (r, w) = std::io::pipe().expect("pipe");
            drop(r);
            w
        })
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn mount");
    wait_for_path(&sock, T);
    run_ok(
        Command::new("nbdinfo").arg(format!("nbd+unix:///?socket={}", sock.display())),
        T,
    );
    run_ok(Command::new("kill").arg("-TERM").arg(child.id().to_string()), T);
    let st = child.wait().expect("mount exit");
    assert!(st.success(), "mount with a closed stdout: {st}");

    // failover: recorded although its last line went nowhere.
    let out = d.join("failover.raw");
    survives(
        &mut tm(&[
            "failover",
            "--data",
            data,
            "cp",
            "--at",
            "latest",
            "--output",
            s(&out),
            "--no-drain",
        ]),
        0,
    );
    assert!(out.exists());
    let st: serde_json::Value =
        serde_json::from_str(&stdout(&run_ok(&mut tm(&["status", "--data", data, "--json"]), T))).expect("JSON");
    assert_eq!(st["disks"][0]["recovery"]["failed_over"], true, "{st}");
    // ... which `status --check --data` reports as a warning.
    survives(&mut tm(&["status", "--data", data, "--check"]), 1);
}

/// `status --check`: 0 for a healthy pipeline, critical (2) once the
/// target is gone; errors in the operator's words.
#[test]
fn status_check_and_errors() {
    let dir = tmpdir("cli-check");
    let d = dir.path();
    let mut site = Site::start(d, &[]);
    let a = agent(&site, d, "hc", 8 * MIB, &[]);
    let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(seed());
    assert!(write_burst(&a.sock, 8 * MIB, &mut rng, 16));
    site.wait("hc", T);
    let api = site.api();

    let o = run(&mut tm(&["status", "--api", &api, "--check"]), T);
    assert_eq!(o.status.code(), Some(0), "{}{}", stdout(&o), stderr(&o));
    assert!(stdout(&o).starts_with("OK: 1 disk"), "{}", stdout(&o));
    let o = run(&mut tm(&["status", "--api", &api, "--json"]), T);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("JSON");
    let disk = &v["disks"][0];
    assert!(disk["lag_s"].is_number(), "{disk}");
    assert!(disk.get("lag_seconds").is_none(), "{disk}");
    assert!(
        disk["sync_done_bytes"].is_null() && disk["sync_total_bytes"].is_null(),
        "{disk}"
    );
    assert!(v["collector"]["uptime_s"].is_number(), "{v}");
    let st = a.status();
    assert!(st["uptime_s"].is_number() && st["served_as"].is_string(), "{st}");

    // wait on a disk the collector does not know: it stops (not after its
    // 10 minute timeout), naming those it knows. A collector younger than
    // 30 s may still be waiting for its agents to reconnect, so wait gives
    // it until then (this collector was just started): at most 30 s, plus
    // slack for a loaded machine.
    let start = Instant::now();
    let o = run(&mut tm(&["wait", "--api", &api, "nosuch", "--timeout", "10m"]), T);
    assert_eq!(o.status.code(), Some(1));
    assert!(start.elapsed() < Duration::from_secs(50), "wait kept trying");
    assert!(stderr(&o).contains("knows no disk nosuch; known: hc"), "{}", stderr(&o));

    // The API address pointing at the agents' port: said so, no bytes.
    let wrong = format!("127.0.0.1:{}", site.collector_port);
    let o = run(&mut tm(&["status", "--api", &wrong]), T);
    assert_eq!(o.status.code(), Some(1));
    let e = stderr(&o);
    assert!(e.contains("--api"), "{e}");
    assert!(
        !e.contains("[") && !e.contains("Some(") && !e.contains("Error {"),
        "{e}"
    );
    assert_eq!(e.lines().count(), 1, "{e}");
    let o = run(&mut tm(&["status", "--api", &wrong, "--check"]), T);
    assert_eq!(o.status.code(), Some(2), "{}", stdout(&o));
    assert!(stdout(&o).starts_with("CRITICAL: "), "{}", stdout(&o));

    // The target goes away: critical.
    site.target.kill9();
    let start = Instant::now();
    loop {
        let o = run(&mut tm(&["status", "--api", &api, "--check"]), T);
        if o.status.code() == Some(2) {
            assert!(
                stdout(&o).contains("CRITICAL hc: target disconnected"),
                "{}",
                stdout(&o)
            );
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "status --check still says {:?}: {}",
            o.status.code(),
            stdout(&o)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    drop(a);
}

/// A tag whose answer comes after `--timeout` is reported with its seq,
/// not as timed out; a retry gives the same seq.
#[test]
fn a_late_tag_answer_is_not_a_timeout() {
    let dir = tmpdir("cli-tag");
    let d = dir.path();
    let disk = d.join("t.img");
    sparse_file(&disk, 8 * MIB);
    let state = d.join("t.state");
    let _a = Agent::start_env(
        &disk,
        &state,
        &d.join("t.sock"),
        &[] as &[&str],
        &[("FAILPOINTS", "agent-tag-slow-answer=return(2500)")],
    );
    let o = run(&mut tm(&["tag", "--agent", s(&state), "slow", "--timeout", "1s"]), T);
    assert!(o.status.success(), "{}", stderr(&o));
    let seq: u64 = stdout(&o).parse().expect("a seq");
    assert!(!stderr(&o).contains("timed out"), "{}", stderr(&o));
    let o = run_ok(&mut tm(&["tag", "--agent", s(&state), "slow"]), T);
    assert_eq!(stdout(&o), seq.to_string());
    assert_eq!(
        tidemark_dump_tags(&state),
        vec![("slow".to_string(), seq)],
        "one tag in the journal"
    );
}

/// (name, seq) of the tags in an agent's journal.
fn tidemark_dump_tags(state: &Path) -> Vec<(String, u64)> {
    let o = run_ok(&mut tm(&["journal", "dump", "--state", s(state), "--json"]), T);
    stdout(&o)
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("JSON line"))
        .filter(|v| v["kind"] == "tag")
        .map(|v| {
            (
                v["tag"].as_str().unwrap_or_default().to_string(),
                v["seq"].as_u64().unwrap_or(0),
            )
        })
        .collect()
}
