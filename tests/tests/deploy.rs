//! What `deploy/` ships works with what the binaries do (issue 15): the
//! example configurations start a real target, collector and agent that
//! replicate a disk; the systemd units pass `systemd-analyze verify`
//! without a warning; every metric the Prometheus rules and the Grafana
//! dashboard name is one the services export, and both files parse.
//!
//! Real processes (`cargo build --bins` first); qemu-io, systemd-analyze,
//! python3 with PyYAML.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use tidemark_tests::pipe::{s, tmpdir};
use tidemark_tests::{
    bin, free_port, need_tool, raw_api, run, run_ok, sparse_file, tls_identity, write_secret, Agent, Service,
};

const T: Duration = Duration::from_secs(60);

fn deploy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

/// An example configuration with its host paths and addresses replaced.
fn example(name: &str, swaps: &[(&str, String)], out: &Path) -> PathBuf {
    let mut text = std::fs::read_to_string(deploy().join("examples").join(name)).unwrap();
    for (from, to) in swaps {
        assert!(text.contains(from), "{name} no longer holds {from:?}");
        text = text.replace(from, to);
    }
    let p = out.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

#[test]
fn the_example_configurations_replicate_a_disk_and_the_monitoring_files_name_real_metrics() {
    need_tool("qemu-io");
    need_tool("python3");
    let dir = tmpdir("deploy");
    let d = dir.path();
    let token = d.join("token");
    write_secret(&token, "deploy-test-token\n");
    let ids = [
        tls_identity(d, "target", "dr-target"),
        tls_identity(d, "collector", "dr-collector"),
        tls_identity(d, "agent", "db"),
    ];
    let (tport, mport, cport, aport) = (free_port(), free_port(), free_port(), free_port());
    let target_cfg = example(
        "target.toml",
        &[
            ("0.0.0.0:7800", format!("127.0.0.1:{tport}")),
            ("/var/lib/tidemark/data", s(&d.join("data")).to_string()),
            ("/etc/tidemark/token", s(&token).to_string()),
            ("/etc/tidemark/tls-target", s(&ids[0]).to_string()),
            ("127.0.0.1:7881", format!("127.0.0.1:{mport}")),
        ],
        d,
    );
    let _target = Service::start(
        "tidemark-target",
        &["--config".into(), s(&target_cfg).into()],
        &d.join("target.log"),
        tport,
    );
    let collector_cfg = example(
        "collector.toml",
        &[
            ("0.0.0.0:7700", format!("127.0.0.1:{cport}")),
            ("/var/lib/tidemark/spool", s(&d.join("spool")).to_string()),
            ("dr-target.example:7800", format!("127.0.0.1:{tport}")),
            ("0.0.0.0:7702", format!("127.0.0.1:{aport}")),
            ("/etc/tidemark/token", s(&token).to_string()),
            ("/etc/tidemark/tls-collector", s(&ids[1]).to_string()),
            ("/etc/tidemark/api-tokens", s(&d.join("api-tokens")).to_string()),
        ],
        d,
    );
    run_ok(
        Command::new(bin("tidemark"))
            .args(["api-token", "add", "--file"])
            .arg(d.join("api-tokens"))
            .args(["monitoring", "--role", "viewer", "--out", s(&d.join("viewer.secret"))]),
        T,
    );
    let _collector = Service::start(
        "tidemark-collector",
        &["--config".into(), s(&collector_cfg).into()],
        &d.join("collector.log"),
        cport,
    );
    let disk = d.join("db.img");
    sparse_file(&disk, 32 << 20);
    let sock = d.join("db.sock");
    let agent_cfg = example(
        "agent-db.toml",
        &[
            ("/dev/vdb", s(&disk).to_string()),
            ("/var/lib/tidemark/agent-db", s(&d.join("db.state")).to_string()),
            ("unix:/run/tidemark-agent-db/nbd.sock", format!("unix:{}", s(&sock))),
            ("dr-collector.example:7700", format!("127.0.0.1:{cport}")),
            ("/etc/tidemark/token", s(&token).to_string()),
            ("/etc/tidemark/tls-db", s(&ids[2]).to_string()),
        ],
        d,
    );
    let a = Agent::start_env(&disk, &d.join("db.state"), &sock, &["--config", s(&agent_cfg)], &[]);
    let qemu = run(
        Command::new("qemu-io")
            .args(["-f", "raw", "-t", "none", "-c", "write -P 7 1M 1M"])
            .arg(format!("nbd+unix:///?socket={}", s(&sock))),
        T,
    );
    assert!(qemu.status.success(), "{}", String::from_utf8_lossy(&qemu.stderr));
    let api = format!("https://127.0.0.1:{aport}");
    run_ok(
        Command::new(bin("tidemark")).args(["wait", "--api", &api, "db", "--timeout", "60s"]),
        T + T,
    );
    tidemark_tests::assert_identical(&disk, &d.join("data").join("db").join("replica.raw"));

    // The monitoring files name only metrics the services export.
    let scrape = |port: u16, tls: bool| {
        raw_api(
            port,
            tls,
            "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
    };
    let exported = format!("{}\n{}", scrape(aport, true), scrape(mport, false));
    let families: Vec<&str> = exported
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split(' ').next())
        .collect();
    assert!(families.len() > 20, "{exported}");
    for f in ["prometheus/tidemark-alerts.yml", "grafana/tidemark.json"] {
        let text = std::fs::read_to_string(deploy().join(f)).unwrap();
        let mut named: Vec<&str> = text
            .match_indices("tidemark_")
            .map(|(i, _)| {
                let rest = &text[i..];
                let end = rest
                    .find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'))
                    .unwrap_or(rest.len());
                &rest[..end]
            })
            .collect();
        named.sort_unstable();
        named.dedup();
        assert!(named.len() >= 5, "{f} names too few metrics: {named:?}");
        for m in named {
            assert!(families.contains(&m), "{f} names {m}, which no service exports");
        }
    }
    let yaml = run(
        Command::new("python3")
            .args([
                "-c",
                "import sys, yaml; d = yaml.safe_load(open(sys.argv[1])); assert d['groups'][0]['rules']",
            ])
            .arg(deploy().join("prometheus/tidemark-alerts.yml")),
        T,
    );
    assert!(yaml.status.success(), "{}", String::from_utf8_lossy(&yaml.stderr));
    let dash: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(deploy().join("grafana/tidemark.json")).unwrap()).unwrap();
    assert!(dash["panels"].as_array().is_some_and(|p| p.len() >= 8), "{dash}");
    drop(a);
}

#[test]
fn the_systemd_units_verify_without_a_warning() {
    need_tool("systemd-analyze");
    let dir = tmpdir("deploy-units");
    let d = dir.path();
    let mut names = Vec::new();
    for u in [
        "tidemark-agent@.service",
        "tidemark-collector.service",
        "tidemark-target.service",
    ] {
        let text = std::fs::read_to_string(deploy().join("systemd").join(u)).unwrap();
        // The binaries as built here instead of /usr/local/bin.
        let text = text.replace("/usr/local/bin/", &format!("{}/", tidemark_tests::bin_dir().display()));
        std::fs::write(d.join(u), text).unwrap();
        names.push(if u.ends_with("@.service") {
            std::os::unix::fs::symlink(d.join(u), d.join("tidemark-agent@db.service")).unwrap();
            d.join("tidemark-agent@db.service")
        } else {
            d.join(u)
        });
    }
    let out = run(Command::new("systemd-analyze").arg("verify").args(&names), T);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && err.trim().is_empty(),
        "systemd-analyze verify: {err}"
    );
}
