//! Nothing is destroyed by a typo: each daemon owns its directory (a
//! `TIDEMARK-DIR` marker and a lock), refuses another daemon's directory,
//! a directory holding foreign files and a directory in use, deletes no
//! socket it did not create, and a refused start leaves nothing behind.
//!
//! Real processes only (`cargo build --bins` first); no external tools.

use std::fs;
use std::net::TcpListener;
use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use tidemark_tests::pipe::{s, tmpdir};
use tidemark_tests::{bin, free_port, run, run_ok, sparse_file, wait_for_path, write_secret, Agent, Service, Site};

const T: Duration = Duration::from_secs(30);

fn daemon(name: &str, args: &[&str]) -> Output {
    run(Command::new(bin(name)).args(args), T)
}

/// Non-zero exit, every needle in stderr, and the error in the operator's
/// words: no cause said twice, no Rust value printed with Debug.
fn refused(out: &Output, needles: &[&str], what: &str) -> String {
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "{what}: exited {}; stderr:\n{err}", out.status);
    for n in needles {
        assert!(err.contains(n), "{what}: stderr lacks {n:?}:\n{err}");
    }
    for bad in ["Some(", "None", "Unix(", "Tcp {", "panicked", "Os {"] {
        assert!(!err.contains(bad), "{what}: stderr shows {bad:?}:\n{err}");
    }
    if let Some(i) = err.find("(os error") {
        let tail = &err[i..];
        let code = &tail[..tail.find(')').map_or(tail.len(), |j| j + 1)];
        assert_eq!(err.matches(code).count(), 1, "{what}: {code} said twice:\n{err}");
    }
    err
}

fn target_args<'a>(port: &'a str, data: &'a str, token: &'a str) -> Vec<&'a str> {
    vec![
        "--listen",
        port,
        "--data",
        data,
        "--token-file",
        token,
        "--insecure-plaintext",
    ]
}

fn collector_args<'a>(listen: &'a str, spool: &'a str, api: &'a str, token: &'a str) -> Vec<&'a str> {
    vec![
        "--listen",
        listen,
        "--spool",
        spool,
        "--target",
        "127.0.0.1:9",
        "--api",
        api,
        "--token-file",
        token,
        "--insecure-plaintext",
    ]
}

fn listing(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .map(|rd| {
            rd.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

fn token(d: &Path) -> String {
    let p = d.join("token");
    write_secret(&p, "secret\n");
    p.display().to_string()
}

fn loopback(port: u16) -> String {
    format!("127.0.0.1:{port}")
}

/// The typo of issue 11: `tidemark-target --data` at a running agent's
/// state directory. Refused, naming what it found; the agent's control
/// socket is still there and answers. The collector refuses it too.
#[test]
fn a_target_or_collector_pointed_at_an_agent_state_dir_is_refused() {
    let dir = tmpdir("own-typo");
    let d = dir.path();
    let tok = token(d);
    let disk = d.join("disk.img");
    let state = d.join("state");
    sparse_file(&disk, 8 << 20);
    let agent = Agent::start(&disk, &state, &d.join("nbd.sock"), &[]);
    let marker = fs::read_to_string(state.join("TIDEMARK-DIR")).expect("the agent marks its state directory");
    assert_eq!(marker, "tidemark-dir 1\nkind agent-state\n");
    let before = listing(&state);

    let port = loopback(free_port());
    let out = daemon("tidemark-target", &target_args(&port, s(&state), &tok));
    let want = format!(
        "{} is a tidemark-agent state directory, not a tidemark-target data directory",
        state.display()
    );
    refused(&out, &[&want], "target on the agent's state dir");
    let (listen, api) = (loopback(free_port()), loopback(free_port()));
    let out = daemon("tidemark-collector", &collector_args(&listen, s(&state), &api, &tok));
    refused(
        &out,
        &["is a tidemark-agent state directory, not a tidemark-collector spool directory"],
        "collector on the agent's state dir",
    );

    assert_eq!(
        listing(&state),
        before,
        "the refused daemons changed the state directory"
    );
    assert!(
        state.join("control.sock").exists(),
        "the agent's control socket was deleted"
    );
    let out = run_ok(
        Command::new(bin("tidemark")).args(["agent-status", "--agent", s(&state)]),
        T,
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("disk.img"));
    agent.stop();
}

/// A second collector on a live spool, a second target on a data directory
/// a running target holds: refused, naming the holder; the first ones keep
/// working.
#[test]
fn a_second_collector_or_target_on_a_live_directory_is_refused() {
    let dir = tmpdir("own-second");
    let d = dir.path();
    let mut site = Site::start(d, &[]);
    let tok = site.token_file.display().to_string();
    let (spool, data) = (d.join("spool"), d.join("data"));
    // The ports are bound before the directories are claimed.
    wait_for_path(&spool.join("TIDEMARK-DIR"), T);
    wait_for_path(&data.join("TIDEMARK-DIR"), T);
    assert!(fs::read_to_string(spool.join("TIDEMARK-DIR"))
        .unwrap()
        .contains("kind collector-spool"));
    assert!(fs::read_to_string(data.join("TIDEMARK-DIR"))
        .unwrap()
        .contains("kind target-data"));

    let (listen, api) = (loopback(free_port()), loopback(free_port()));
    let out = daemon("tidemark-collector", &collector_args(&listen, s(&spool), &api, &tok));
    let holder = format!("(process {} holds its lock)", site.collector.child.id());
    refused(
        &out,
        &[
            &format!(
                "spool directory {} is in use by another tidemark-collector",
                spool.display()
            ),
            &holder,
        ],
        "second collector",
    );
    assert!(
        TcpListener::bind(&listen).is_ok(),
        "the refused collector still holds its port"
    );

    let port = loopback(free_port());
    let out = daemon("tidemark-target", &target_args(&port, s(&data), &tok));
    let holder = format!("(process {} holds its lock)", site.target.child.id());
    refused(
        &out,
        &[
            &format!("data directory {} is in use by another tidemark-target", data.display()),
            &holder,
        ],
        "second target",
    );
    assert!(site.collector.alive() && site.target.alive());
    assert!(
        data.join("control.sock").exists(),
        "the second target removed the first one's control socket"
    );
    // The site still answers.
    let _ = site.status();
    site.collector.stop();
    site.target.stop();
}

/// A start refused for a port in use changes nothing on disk: no disk file
/// (`--create-size`), no state, spool or data directory; the next correct
/// start is a first start, not a crash.
#[test]
fn refused_starts_leave_nothing_behind() {
    let dir = tmpdir("own-refused");
    let d = dir.path();
    let tok = token(d);
    let busy = TcpListener::bind("127.0.0.1:0").unwrap();
    let busy_addr = loopback(busy.local_addr().unwrap().port());

    // Agent: NBD over TCP without --insecure-tcp (no authentication, no
    // encryption: an explicit choice), then the listen port in use.
    let (disk, state) = (d.join("new.img"), d.join("new.state"));
    let listen = format!("tcp:{busy_addr}");
    let protect = |extra: &[&str]| {
        let mut args = vec![
            "protect",
            "--disk",
            s(&disk),
            "--create-size",
            "8M",
            "--state",
            s(&state),
        ];
        args.extend(["--listen", listen.as_str()]);
        args.extend(extra);
        daemon("tidemark-agent", &args)
    };
    let out = protect(&[]);
    refused(&out, &["--insecure-tcp", "no authentication"], "agent, NBD over TCP");
    assert!(!disk.exists() && !state.exists());
    let out = protect(&["--insecure-tcp"]);
    refused(&out, &["Address already in use", &busy_addr], "agent, port in use");
    assert!(!disk.exists(), "the refused agent created the disk");
    assert!(!state.exists(), "the refused agent created its state directory");
    let agent = Agent::start(&disk, &state, &d.join("new.sock"), &["--create-size", "8M"]);
    assert!(agent.log_text().contains("last_stop=FirstRun"), "{}", agent.log_text());
    agent.stop();

    // Collector: agent port in use, then API port in use.
    let spool = d.join("spool");
    let free = loopback(free_port());
    for (listen, api, what) in [
        (busy_addr.as_str(), free.as_str(), "collector, --listen in use"),
        (free.as_str(), busy_addr.as_str(), "collector, --api in use"),
    ] {
        let out = daemon("tidemark-collector", &collector_args(listen, s(&spool), api, &tok));
        refused(&out, &["Address already in use", &busy_addr], what);
        assert!(!spool.exists(), "{what}: the spool directory was created");
    }

    // Target: port in use; an existing empty directory stays empty.
    let data = d.join("data");
    let out = daemon("tidemark-target", &target_args(&busy_addr, s(&data), &tok));
    refused(&out, &["Address already in use", &busy_addr], "target, port in use");
    assert!(!data.exists(), "the refused target created its data directory");
    fs::create_dir(&data).unwrap();
    let out = daemon("tidemark-target", &target_args(&busy_addr, s(&data), &tok));
    refused(&out, &["Address already in use"], "target, port in use, empty dir");
    assert!(
        listing(&data).is_empty(),
        "the refused target wrote {:?}",
        listing(&data)
    );

    // A start that fails after claiming its directory takes back what it
    // made: a data directory whose control socket path is too long for a
    // unix socket (the catalog was already created when that fails).
    let long = d.join("x".repeat(110));
    let port = loopback(free_port());
    let out = daemon("tidemark-target", &target_args(&port, s(&long), &tok));
    refused(&out, &["control socket"], "target, control socket path too long");
    assert!(!long.exists(), "the failed target left {:?}", listing(&long));
}

/// Directories that are not the daemon's own are refused, untouched: a
/// folder of someone's files, a spool of a collector given to the target.
/// A start that fails after adopting takes only its marker back.
#[test]
fn foreign_directories_are_refused_untouched() {
    let dir = tmpdir("own-foreign");
    let d = dir.path();
    let tok = token(d);
    let home = d.join("home");
    fs::create_dir(&home).unwrap();
    fs::write(home.join("thesis.tex"), "months of work").unwrap();
    let (listen, api, port) = (loopback(free_port()), loopback(free_port()), loopback(free_port()));
    let out = daemon("tidemark-target", &target_args(&port, s(&home), &tok));
    refused(
        &out,
        &["is not empty and is not a tidemark-target data directory", "thesis.tex"],
        "target",
    );
    let out = daemon("tidemark-collector", &collector_args(&listen, s(&home), &api, &tok));
    refused(
        &out,
        &["is not a tidemark-collector spool directory", "thesis.tex"],
        "collector",
    );
    let out = daemon(
        "tidemark-agent",
        &[
            "protect",
            "--disk",
            s(&d.join("a.img")),
            "--create-size",
            "1M",
            "--state",
            s(&home),
            "--listen",
            "tcp:127.0.0.1:0",
            "--insecure-tcp",
        ],
    );
    refused(
        &out,
        &["is not a tidemark-agent state directory", "thesis.tex"],
        "agent",
    );
    assert!(!d.join("a.img").exists());
    assert_eq!(listing(&home), ["thesis.tex"]);

    // A collector's spool given to a target.
    let spool = d.join("spool");
    let c = Service::start(
        "tidemark-collector",
        &collector_args(&listen, s(&spool), &api, &tok)
            .iter()
            .map(|a| a.to_string())
            .collect::<Vec<_>>(),
        &d.join("collector.log"),
        api.rsplit(':').next().unwrap().parse().unwrap(),
    );
    wait_for_path(&spool.join("TIDEMARK-DIR"), T);
    let out = daemon("tidemark-target", &target_args(&port, s(&spool), &tok));
    refused(
        &out,
        &["is a tidemark-collector spool directory, not a tidemark-target data directory"],
        "target on a spool",
    );
    drop(c);

    // An unmarked spool whose catalog cannot be opened: the collector
    // adopts it, fails, and takes back the marker and lock it added.
    let odd = d.join("odd");
    fs::create_dir_all(odd.join("catalog.db")).unwrap();
    let (listen, api) = (loopback(free_port()), loopback(free_port()));
    let out = daemon("tidemark-collector", &collector_args(&listen, s(&odd), &api, &tok));
    refused(&out, &["catalog.db"], "collector, catalog is a folder");
    assert_eq!(listing(&odd), ["catalog.db"]);
}

/// Directories of an earlier version (the daemon's own files, no marker)
/// are adopted: the marker is written, and the agent sees a clean stop.
#[test]
fn unmarked_directories_of_earlier_versions_are_adopted() {
    let dir = tmpdir("own-adopt");
    let d = dir.path();
    let mut site = Site::start(d, &[]);
    let disk = d.join("d1.img");
    sparse_file(&disk, 4 << 20);
    let state = d.join("d1.state");
    let mut flags = vec!["--disk-id".to_string(), "d1".into()];
    flags.extend(site.agent_flags());
    let refs: Vec<&str> = flags.iter().map(String::as_str).collect();
    let sock = d.join("d1.sock");
    let agent = Agent::start(&disk, &state, &sock, &refs);
    site.wait("d1", Duration::from_secs(60));
    agent.stop();
    site.collector.stop();
    site.target.stop();
    // As an earlier version left them.
    for sub in ["d1.state", "spool", "data"] {
        fs::remove_file(d.join(sub).join("TIDEMARK-DIR")).unwrap();
    }
    site.target.restart();
    site.collector.restart();
    let agent = Agent::start(&disk, &state, &sock, &refs);
    wait_for_path(&d.join("spool").join("TIDEMARK-DIR"), T);
    wait_for_path(&d.join("data").join("TIDEMARK-DIR"), T);
    for (sub, kind) in [
        ("d1.state", "agent-state"),
        ("spool", "collector-spool"),
        ("data", "target-data"),
    ] {
        let m = fs::read_to_string(d.join(sub).join("TIDEMARK-DIR")).unwrap_or_default();
        assert!(m.contains(&format!("kind {kind}")), "{sub}: marker {m:?}");
    }
    let log = agent.log_text();
    assert!(log.contains("adopted a state directory"), "{log}");
    assert!(log.contains("last_stop=Clean"), "{log}");
    assert!(site.target.log_text().contains("adopted a data directory"));
    assert!(site.collector.log_text().contains("adopted a spool directory"));
    site.wait("d1", Duration::from_secs(60));
    agent.stop();
}

/// `tidemark-collector --config`: keys like the flags, flags override,
/// unknown keys refused naming them (and nothing created).
#[test]
fn collector_config_file() {
    let dir = tmpdir("own-config");
    let d = dir.path();
    let tok = token(d);
    let spool = d.join("spool");
    let (listen, api) = (free_port(), free_port());
    let conf = d.join("collector.toml");
    let text = format!(
        "listen = \"127.0.0.1:{listen}\"\nspool = \"{}\"\ntarget = \"127.0.0.1:9\"\napi = \"127.0.0.1:1\"\n\
         token_file = \"{tok}\"\nspool_cap = \"1G\"\ninsecure_plaintext = true\n",
        spool.display()
    );
    fs::write(&conf, format!("{text}spool_capp = \"2G\"\n")).unwrap();
    let out = daemon("tidemark-collector", &["--config", s(&conf)]);
    refused(&out, &["spool_capp", "collector.toml"], "unknown key");
    assert!(!spool.exists());
    fs::write(&conf, &text).unwrap();
    // --api overrides the file's (unusable) port 1.
    let mut c = Service::start(
        "tidemark-collector",
        &[
            "--config".into(),
            s(&conf).into(),
            "--api".into(),
            format!("127.0.0.1:{api}"),
        ],
        &d.join("c.log"),
        api,
    );
    wait_for_path(&spool.join("TIDEMARK-DIR"), T);
    assert!(fs::read_to_string(spool.join("TIDEMARK-DIR"))
        .unwrap()
        .contains("kind collector-spool"));
    c.stop();
}

/// Every daemon's help shows the required flags in its usage line and
/// has an example.
#[test]
fn daemon_help_shows_required_flags_and_examples() {
    for (args, usage) in [
        (
            &["protect", "--help"][..],
            "Usage: tidemark-agent protect --disk PATH --state DIR",
        ),
        (
            &["--help"][..],
            "Usage: tidemark-collector --listen HOST:PORT --spool DIR --target HOST:PORT",
        ),
        (
            &["--help"][..],
            "Usage: tidemark-target --listen HOST:PORT --data DIR --token-file FILE",
        ),
    ] {
        let name = usage.split_whitespace().nth(1).unwrap();
        let out = run_ok(Command::new(bin(name)).args(args), T);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains(usage), "{name}:\n{text}");
        assert!(text.contains("Example"), "{name} has no example:\n{text}");
    }
    let out = run_ok(Command::new(bin("tidemark-agent")).arg("--help"), T);
    assert!(String::from_utf8_lossy(&out.stdout).contains("Example"));
}
