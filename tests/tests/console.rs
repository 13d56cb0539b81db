//! The web console in a real browser (issue 15): headless Chromium
//! (Debian's) loads the collector's `/` over HTTPS, runs its script and
//! shows the disks table, a disk page whose RPO chart has data, the
//! alerts and the events; nothing is written to the browser's console
//! (no script error, no refused resource). Screenshots are kept in
//! `build/test-artifacts/console/`.
//!
//! Real processes (`cargo build --bins` first); qemu-io, chromium.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use tidemark_tests::pipe::{agent, s, tmpdir};
use tidemark_tests::{bin_dir, need_tool, raw_api, run, Site};

const T: Duration = Duration::from_secs(90);

/// Chromium's DOM of `url` once its scripts ran, and its log.
fn browse(url: &str, profile: &Path, screenshot: Option<&Path>) -> (String, String) {
    let mut c = Command::new("chromium");
    c.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        // The test's CA is not the browser's; TLS itself is tested elsewhere.
        "--ignore-certificate-errors",
        "--enable-logging=stderr",
        "--v=0",
        "--virtual-time-budget=8000",
        "--window-size=1280,900",
    ])
    .arg(format!("--user-data-dir={}", profile.display()));
    match screenshot {
        Some(p) => c.arg(format!("--screenshot={}", p.display())),
        None => c.arg("--dump-dom"),
    };
    let out = run(c.arg(url), T);
    let log = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "chromium {url}: {log}");
    (String::from_utf8_lossy(&out.stdout).into_owned(), log)
}

/// What the page said to the browser's console, or resources it refused.
fn complaints(log: &str) -> Vec<&str> {
    log.lines()
        .filter(|l| l.contains(":CONSOLE(") || l.contains("Refused to") || l.contains("Uncaught"))
        .collect()
}

#[test]
fn the_console_shows_disks_a_chart_alerts_and_events_in_a_real_browser() {
    need_tool("chromium");
    need_tool("qemu-io");
    let dir = tmpdir("console");
    let d = dir.path();
    let site = Site::start(d, &[]);
    let a = agent(&site, d, "db", 32 << 20, &[]);
    let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(3);
    assert!(tidemark_tests::pipe::write_burst(&a.sock, 32 << 20, &mut rng, 16));
    site.wait("db", T);
    // A few seconds of history for the chart.
    let start = Instant::now();
    loop {
        let r = raw_api(
            site.api_port,
            true,
            "GET /api/v1/disks/db/history HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        );
        if r.matches("\"lag_s\"").count() >= 3 {
            break;
        }
        assert!(start.elapsed() < T, "no history: {r}");
        std::thread::sleep(Duration::from_millis(300));
    }
    // The assets come with headers that keep the page to itself.
    let page = raw_api(
        site.api_port,
        true,
        "GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    let head = page.split("\r\n\r\n").next().unwrap_or_default().to_ascii_lowercase();
    assert!(head.contains("content-security-policy: default-src 'none'"), "{head}");
    assert!(head.contains("x-frame-options: deny"), "{head}");
    assert!(
        !page.contains("src=\"http") && !page.contains("href=\"http"),
        "an external resource: {page}"
    );

    let shots = bin_dir().join("../test-artifacts/console");
    std::fs::create_dir_all(&shots).unwrap();
    let base = format!("https://127.0.0.1:{}", site.api_port);
    let profile = d.join("chromium");

    let (dom, log) = browse(&format!("{base}/"), &profile, None);
    assert!(
        complaints(&log).is_empty(),
        "the browser's console: {:?}",
        complaints(&log)
    );
    assert!(dom.contains("href=\"#disk/db\""), "no row for disk db:\n{dom}");
    assert!(dom.contains("1 disk(s), 1 agent(s) connected"), "{dom}");
    assert!(dom.contains("connected to the target"), "no events:\n{dom}");
    browse(&format!("{base}/"), &profile, Some(&shots.join("overview.png")));

    let (dom, log) = browse(&format!("{base}/#disk/db"), &profile, None);
    assert!(
        complaints(&log).is_empty(),
        "the browser's console: {:?}",
        complaints(&log)
    );
    assert!(dom.contains("Disk db") && dom.contains("1 disk(s)"), "{dom}");
    let points = dom
        .split("<polyline points=\"")
        .nth(1)
        .and_then(|r| r.split('"').next())
        .unwrap_or_else(|| panic!("no chart line:\n{dom}"));
    assert!(points.split(' ').count() >= 3, "a chart of {points:?}");
    assert!(dom.contains("samples from"), "{dom}");
    browse(&format!("{base}/#disk/db"), &profile, Some(&shots.join("disk.png")));
    for shot in ["overview.png", "disk.png"] {
        let len = std::fs::metadata(shots.join(shot)).map(|m| m.len()).unwrap_or(0);
        assert!(len > 10_000, "screenshot {shot} of {len} bytes in {}", s(&shots));
    }
    drop(a);
}
