//! The web console in a real browser (issue 15): headless Chromium
//! (Debian's) loads the collector's `/` over HTTPS, runs its script and
//! shows the disks table (with each disk's last verified point), a disk
//! page whose RPO chart has data, its recovery points (table and
//! timeline), drills and policy, the alerts and the events; nothing is
//! written to the browser's console (no script error, no refused
//! resource). Then, driven over the DevTools protocol like a keyboard
//! user: the operator token typed into its field (kept in session storage
//! only), a tag taken with "Take tag…" and its confirmation (Escape
//! cancels, Enter confirms) whose point then appears in the points table,
//! and a drill of a real ext4 (written through the shim by nbdcopy) run
//! with "Run drill…" that passes, its checker output viewable; last, a
//! failover to the tag with "Fail over…", whose confirmation is enabled
//! only once the disk id is typed: the status line says where the image
//! is on the target's host and, once the failover is recorded, that it is
//! done; the image passes e2fsck and holds the files. Screenshots are kept
//! in `build/test-artifacts/console/`.
//!
//! Real processes (`cargo build --bins` first); qemu-io, nbdcopy,
//! mkfs.ext4, e2fsck, debugfs, chromium; FUSE (`/dev/fuse`, root) for the
//! drill.

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tidemark_tests::pipe::{agent, s, tmpdir};
use tidemark_tests::{bin_dir, need_tool, raw_api, run, run_ok, tail, Site};

const T: Duration = Duration::from_secs(90);

/// Chromium's flags for a page of the test's site.
const FLAGS: [&str; 8] = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    // The test's CA is not the browser's; TLS itself is tested elsewhere.
    "--ignore-certificate-errors",
    "--enable-logging=stderr",
    "--v=0",
    "--window-size=1280,900",
];

/// Chromium's DOM of `url` once its scripts ran, and its log.
fn browse(url: &str, profile: &Path, screenshot: Option<&Path>) -> (String, String) {
    let mut c = Command::new("chromium");
    c.args(FLAGS)
        .arg("--virtual-time-budget=8000")
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

/// Base64 (a screenshot over the DevTools protocol).
fn unbase64(text: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(text.len() / 4 * 3);
    let (mut acc, mut bits) = (0u32, 0u32);
    for c in text.bytes().filter(|&c| c != b'=') {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => panic!("not base64: {c:#x}"),
        };
        acc = (acc << 6 | u32::from(v)) & 0xff_ffff;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push(u8::try_from((acc >> bits) & 0xff).unwrap());
        }
    }
    out
}

/// Chromium driven over the DevTools protocol on a pipe
/// (`--remote-debugging-pipe`: NUL-terminated JSON, commands on its fd 3,
/// answers and events on its fd 4), for a page that is typed into. What the
/// page says to its console (and errors the browser logs for it) is kept.
struct Browser {
    child: Child,
    to: ChildStdin,
    from: mpsc::Receiver<Value>,
    next: u64,
    session: Option<String>,
    log: PathBuf,
    said: Vec<String>,
}

impl Browser {
    fn start(profile: &Path, log: &Path) -> Browser {
        let mut c = Command::new("sh");
        // fd 3 and 4 are the protocol's: the shell gives them the pipes.
        c.arg("-c")
            .arg(r#"exec "$0" "$@" 3<&0 4>&1 </dev/null >/dev/null"#)
            .arg("chromium")
            .args(FLAGS)
            .arg("--remote-debugging-pipe")
            .arg(format!("--user-data-dir={}", profile.display()))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(log).unwrap());
        let mut child = c.spawn().unwrap_or_else(|e| panic!("chromium: {e}"));
        let to = child.stdin.take().unwrap();
        let out = child.stdout.take().unwrap();
        let (tx, from) = mpsc::channel();
        std::thread::spawn(move || {
            let mut r = std::io::BufReader::new(out);
            let mut msg = Vec::new();
            while r.read_until(0, &mut msg).is_ok_and(|n| n > 0) {
                if msg.last() == Some(&0) {
                    msg.pop();
                }
                let v: Value = serde_json::from_slice(&msg)
                    .unwrap_or_else(|e| panic!("chromium's protocol: {e}: {}", String::from_utf8_lossy(&msg)));
                if tx.send(v).is_err() {
                    break;
                }
                msg.clear();
            }
        });
        let mut b = Browser {
            child,
            to,
            from,
            next: 0,
            session: None,
            log: log.to_path_buf(),
            said: Vec::new(),
        };
        let target = b.call("Target.createTarget", json!({"url": "about:blank"}))["targetId"].clone();
        let session = b.call("Target.attachToTarget", json!({"targetId": target, "flatten": true}))["sessionId"]
            .as_str()
            .expect("a session")
            .to_string();
        b.session = Some(session);
        for m in ["Page.enable", "Runtime.enable", "Log.enable"] {
            b.call(m, json!({}));
        }
        b.call("Emulation.setFocusEmulationEnabled", json!({"enabled": true}));
        b
    }

    /// Send a command (to the page, once attached) and wait for its answer.
    fn call(&mut self, method: &str, params: Value) -> Value {
        self.next += 1;
        let id = self.next;
        let mut msg = json!({"id": id, "method": method, "params": params});
        if let Some(s) = &self.session {
            msg["sessionId"] = json!(s);
        }
        let mut bytes = serde_json::to_vec(&msg).unwrap();
        bytes.push(0);
        if let Err(e) = self.to.write_all(&bytes).and_then(|()| self.to.flush()) {
            panic!("{method} to chromium: {e}; its log:\n{}", self.log_tail());
        }
        let until = Instant::now() + T;
        loop {
            let left = until.saturating_duration_since(Instant::now());
            let m = match self.from.recv_timeout(left) {
                Ok(m) => m,
                Err(e) => panic!("no answer to {method} ({e}); chromium's log:\n{}", self.log_tail()),
            };
            if m["id"] == id {
                assert!(m.get("error").is_none(), "{method} {msg}: {m}");
                return m["result"].clone();
            }
            self.note(&m);
        }
    }

    /// Keep what the page said to its console.
    fn note(&mut self, m: &Value) {
        let p = &m["params"];
        match m["method"].as_str() {
            Some("Runtime.consoleAPICalled") => self.said.push(format!("console.{}: {}", p["type"], p["args"])),
            Some("Runtime.exceptionThrown") => self.said.push(format!("exception: {}", p["exceptionDetails"])),
            // The browser's own favicon request (the console has none) is
            // not the page's.
            Some("Log.entryAdded")
                if matches!(p["entry"]["level"].as_str(), Some("error" | "warning"))
                    && !p["entry"]["url"].as_str().is_some_and(|u| u.ends_with("/favicon.ico")) =>
            {
                self.said.push(format!(
                    "{} {}: {}",
                    p["entry"]["level"], p["entry"]["source"], p["entry"]["text"]
                ))
            }
            _ => {}
        }
    }

    fn log_tail(&self) -> String {
        tail(&std::fs::read_to_string(&self.log).unwrap_or_default(), 40)
    }

    fn goto(&mut self, url: &str) {
        self.call("Page.navigate", json!({"url": url}));
    }

    /// The value of `js` in the page (a promise's result).
    fn eval(&mut self, js: &str) -> Value {
        let r = self.call(
            "Runtime.evaluate",
            json!({"expression": js, "returnByValue": true, "awaitPromise": true}),
        );
        assert!(r.get("exceptionDetails").is_none(), "{js}: {r}");
        r["result"]["value"].clone()
    }

    /// Wait until `js` is truthy in the page (an exception counts as not
    /// yet: the page may still be loading): its value.
    fn wait_for(&mut self, what: &str, js: &str, timeout: Duration) -> Value {
        let start = Instant::now();
        let guarded = format!("(() => {{ try {{ return ({js}); }} catch (e) {{ return null; }} }})()");
        loop {
            let v = self.eval(&guarded);
            if !matches!(&v, Value::Null | Value::Bool(false)) && v != json!("") && v != json!(0) {
                return v;
            }
            if start.elapsed() > timeout {
                let page = self.eval("document.body.innerText");
                panic!(
                    "timed out waiting for {what} ({js}); the page:\n{}",
                    page.as_str().unwrap_or("")
                );
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// The id of the focused element.
    fn focused(&mut self) -> String {
        self.eval("document.activeElement ? document.activeElement.id : ''")
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    /// Press and release a key (Enter, Tab or Escape), as a keyboard does.
    fn key(&mut self, key: &str) {
        let (vk, text) = match key {
            "Enter" => (13, "\r"),
            "Tab" => (9, ""),
            "Escape" => (27, ""),
            _ => panic!("no key {key}"),
        };
        let mut down = json!({"type": "rawKeyDown", "key": key, "code": key,
            "windowsVirtualKeyCode": vk, "nativeVirtualKeyCode": vk});
        if !text.is_empty() {
            down["type"] = json!("keyDown");
            down["text"] = json!(text);
            down["unmodifiedText"] = json!(text);
        }
        self.call("Input.dispatchKeyEvent", down);
        self.call(
            "Input.dispatchKeyEvent",
            json!({"type": "keyUp", "key": key, "code": key, "windowsVirtualKeyCode": vk, "nativeVirtualKeyCode": vk}),
        );
    }

    /// Type `text` into the focused element.
    fn type_text(&mut self, text: &str) {
        self.call("Input.insertText", json!({ "text": text }));
    }

    /// The whole page as a PNG.
    fn screenshot(&mut self, path: &Path) {
        let m = self.call("Page.getLayoutMetrics", json!({}));
        let size = &m["cssContentSize"];
        let r = self.call(
            "Page.captureScreenshot",
            json!({"format": "png", "captureBeyondViewport": true,
                "clip": {"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1}}),
        );
        std::fs::write(path, unbase64(r["data"].as_str().expect("a screenshot"))).unwrap();
    }

    /// Everything the page said to its console so far.
    fn complaints(&mut self) -> Vec<String> {
        while let Ok(m) = self.from.try_recv() {
            self.note(&m);
        }
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let mut all = self.said.clone();
        all.extend(complaints(&log).into_iter().map(String::from));
        all
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `document.getElementById(id)` in the page's scripts.
fn js_text(id: &str) -> String {
    format!("document.getElementById({id:?}).textContent")
}

#[test]
fn the_console_shows_disks_a_chart_alerts_and_events_in_a_real_browser() {
    for t in ["chromium", "qemu-io", "nbdcopy", "mkfs.ext4", "e2fsck", "debugfs"] {
        need_tool(t);
    }
    assert!(
        Path::new("/dev/fuse").exists()
            && std::os::unix::fs::MetadataExt::uid(&std::fs::metadata("/proc/self").unwrap()) == 0,
        "drills serve the point's view as a FUSE file: this test needs /dev/fuse and root"
    );
    let dir = tmpdir("console");
    let d = dir.path();
    let site = Site::start(d, &[]);
    let token = std::fs::read_to_string(&site.token_file).unwrap().trim().to_string();
    let a = agent(&site, d, "db", 32 << 20, &[]);
    let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(3);
    assert!(tidemark_tests::pipe::write_burst(&a.sock, 32 << 20, &mut rng, 16));
    // Then a real ext4 with files over the whole disk, through the shim by
    // a real client: what the drill checks.
    tidemark_tests::pipe::write_ext4(d, &a, 32 << 20);
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
    assert!(
        !page.contains("<script>") && !page.contains("style="),
        "inline script or style: {page}"
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
    assert!(
        dom.contains(": 1 disk(s), 1 agent(s) connected") && dom.contains("site "),
        "{dom}"
    );
    assert!(dom.contains("connected to the target"), "no events:\n{dom}");
    assert!(dom.contains(">Last verified</th>"), "no Last verified column:\n{dom}");
    assert!(dom.contains(">Last point</th>"), "no Last point column:\n{dom}");
    let db_row = dom
        .split("<tr>")
        .find(|r| r.contains("href=\"#disk/db\""))
        .unwrap_or_default();
    assert!(db_row.contains(">never</td>"), "not verified yet: {db_row}");
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
    // The points (table and timeline), drills and policy, from the target.
    assert!(
        dom.contains("(replica now)"),
        "no latest point in the points table:\n{dom}"
    );
    assert!(dom.contains("<g class=\"pt "), "no point on the timeline:\n{dom}");
    assert!(dom.contains("No drill yet."), "{dom}");
    assert!(
        dom.contains("<dt>Retention window</dt><dd>1 d 0 h</dd>") && dom.contains("<dt>Point interval</dt>"),
        "no policy:\n{dom}"
    );
    browse(&format!("{base}/#disk/db"), &profile, Some(&shots.join("disk.png")));
    for shot in ["overview.png", "disk.png"] {
        let len = std::fs::metadata(shots.join(shot)).map(|m| m.len()).unwrap_or(0);
        assert!(len > 10_000, "screenshot {shot} of {len} bytes in {}", s(&shots));
    }

    // The actions, as a keyboard user takes them.
    let mut b = Browser::start(&d.join("chromium-actions"), &d.join("chromium-actions.log"));
    b.goto(&format!("{base}/#disk/db"));
    b.wait_for(
        "the disk page with its points and policy",
        "document.getElementById('disk-h').textContent === 'Disk db' \
         && document.querySelectorAll('#points tbody tr').length > 0 \
         && document.querySelectorAll('#policy dt').length > 0",
        T,
    );
    // The token: a password field, kept in this tab's session storage only.
    b.eval("document.getElementById('token').focus()");
    assert_eq!(b.eval("document.activeElement.type"), "password");
    b.type_text(&token);
    assert_eq!(b.eval("sessionStorage.getItem('tidemark.token')"), json!(token));
    assert_eq!(b.eval("localStorage.length"), 0);
    b.key("Tab");
    assert_eq!(b.focused(), "act-tag");
    // Escape cancels the confirmation: nothing done, the focus back.
    b.key("Enter");
    assert_eq!(b.eval("document.getElementById('confirm').open"), true);
    assert_eq!(b.focused(), "tag-name");
    b.key("Escape");
    assert_eq!(b.eval("document.getElementById('confirm').open"), false);
    b.wait_for(
        "the cancel",
        &format!("{}.startsWith('Cancelled')", js_text("action-status")),
        T,
    );
    assert_eq!(b.focused(), "act-tag");
    // Enter confirms: the tag is taken and its point appears.
    b.key("Enter");
    assert_eq!(b.focused(), "tag-name");
    b.type_text("before-upgrade");
    b.key("Enter");
    let said = b.wait_for(
        "the tag's point",
        &format!("{0}.includes('is recovery point seq') && {0}", js_text("action-status")),
        T,
    );
    assert_eq!(b.eval("document.getElementById('confirm').open"), false);
    let row = b.wait_for(
        "the tag in the points table",
        "Array.from(document.querySelectorAll('#points tbody tr')).map((r) => \
         Array.from(r.cells).map((c) => c.textContent).join('|')).find((r) => r.includes('|before-upgrade|'))",
        T,
    );
    let row = row.as_str().unwrap_or_default().to_string();
    assert!(row.contains("|tag|"), "{row}");
    let seq = row.split('|').nth(1).unwrap_or_default().to_string();
    assert!(
        said.as_str().unwrap_or_default().contains(&format!("seq {seq} ")),
        "{said} vs {row}"
    );
    assert!(
        b.eval("document.querySelectorAll('#timeline .pt.tag').length").as_u64() >= Some(1),
        "no tag on the timeline"
    );
    b.screenshot(&shots.join("disk-after-tag.png"));

    // A drill: Tab to its button, Enter, Enter.
    assert_eq!(b.focused(), "act-tag");
    b.key("Tab");
    assert_eq!(b.focused(), "act-drill");
    b.key("Enter");
    assert_eq!(b.eval("document.getElementById('confirm').open"), true);
    assert_eq!(b.eval("document.getElementById('tag-fields').hidden"), true);
    assert_eq!(b.focused(), "confirm-ok");
    b.key("Enter");
    let said = b.wait_for(
        "the drill's result",
        &format!(
            "{0}.startsWith('Drill ') && !{0}.includes('running') && {0}",
            js_text("action-status")
        ),
        Duration::from_secs(240),
    );
    let said = said.as_str().unwrap_or_default().to_string();
    assert!(said.contains(" passed in "), "the drill: {said}\n{}", b.log_tail());
    b.wait_for(
        "the drill in the drills table",
        "(document.querySelector('#drills tbody tr') || {cells: []}).cells.length > 2 \
         && document.querySelector('#drills tbody tr').cells[2].textContent === 'passed'",
        T,
    );
    b.wait_for(
        "the verified point in the points table",
        "Array.from(document.querySelectorAll('#points tbody tr')).some((r) => r.cells[4].textContent === 'passed') \
         && document.querySelectorAll('#timeline .pt.passed').length > 0",
        T,
    );
    b.wait_for(
        "the drill in the disk's facts",
        "document.getElementById('disk-facts').textContent.includes('Last drillpassed at') \
         && !document.getElementById('disk-facts').textContent.includes('Last verifiednever')",
        T,
    );
    // The checker's output, opened from the keyboard.
    b.eval("document.querySelector('#drills tbody tr details summary').focus()");
    b.key("Enter");
    assert_eq!(b.eval("document.querySelector('#drills tbody tr details').open"), true);
    let output = b.eval("document.querySelector('#drills tbody tr details pre').textContent");
    assert!(output.as_str().unwrap_or_default().contains("e2fsck -fn"), "{output}");
    b.screenshot(&shots.join("disk-after-drill.png"));
    // The collector knows the point verified; the disks table says so.
    let st = site.disk_status("db");
    assert_eq!(st["last_drill"]["result"], "passed", "{st}");
    b.goto(&format!("{base}/"));
    let cell = b.wait_for(
        "a last verified age in the disks table",
        "(() => { const r = document.querySelector('#disks tbody tr'); \
         return r && r.cells.length > 7 && r.cells[7].textContent.endsWith(' ago') && r.cells[7].textContent; })()",
        T,
    );
    assert!(cell.as_str().is_some_and(|c| !c.contains("never")), "{cell}");
    assert_eq!(b.eval("sessionStorage.getItem('tidemark.token')"), json!(token));

    // A failover to the tag, from the keyboard: "Fail over…" opens a
    // confirmation that says what is lost and is enabled only once the
    // disk id is typed; the image is written on the target's host.
    b.goto(&format!("{base}/#disk/db"));
    b.wait_for(
        "the disk page with the tag's point",
        "document.getElementById('disk-h').textContent === 'Disk db' \
         && Array.from(document.querySelectorAll('#points tbody tr')).some((r) => r.cells[3].textContent === 'before-upgrade')",
        T,
    );
    b.eval("document.getElementById('token').focus()");
    for _ in 0..3 {
        b.key("Tab");
    }
    assert_eq!(b.focused(), "act-failover");
    b.key("Enter");
    assert_eq!(b.eval("document.getElementById('confirm').open"), true);
    assert_eq!(b.eval("document.getElementById('failover-fields').hidden"), false);
    assert_eq!(b.eval("document.getElementById('tag-fields').hidden"), true);
    let danger = b.eval(&format!(
        "{} + ' ' + {}",
        js_text("confirm-text"),
        js_text("failover-danger")
    ));
    let danger = danger.as_str().unwrap_or_default().to_string();
    assert!(
        danger.contains("stops for good") && danger.contains("target's host"),
        "the danger unsaid: {danger}"
    );
    assert_eq!(b.focused(), "fo-point");
    assert_eq!(b.eval("document.getElementById('fo-point').value"), "latest");
    assert_eq!(b.eval("document.getElementById('confirm-ok').disabled"), true);
    let offered = b.eval("Array.from(document.querySelectorAll('#fo-points option')).map((o) => o.value)");
    assert!(
        offered
            .as_array()
            .is_some_and(|o| o.contains(&json!("tag:before-upgrade"))),
        "the tag not offered: {offered}"
    );
    // The prefilled "latest" is selected: typing replaces it.
    b.type_text("tag:before-upgrade");
    assert_eq!(
        b.eval("document.getElementById('fo-point').value"),
        "tag:before-upgrade"
    );
    b.key("Tab");
    assert_eq!(b.focused(), "fo-name");
    let name = b.eval("document.getElementById('fo-name').value");
    let name = name.as_str().unwrap_or_default().to_string();
    assert!(
        name.starts_with("db-failover-") && name.ends_with(".raw"),
        "the image's name: {name}"
    );
    b.key("Tab");
    assert_eq!(b.focused(), "fo-format");
    assert_eq!(b.eval("document.getElementById('fo-format').value"), "raw");
    b.key("Tab");
    assert_eq!(b.focused(), "fo-confirm");
    // Half the disk id: still disabled, and Enter does nothing.
    b.type_text("d");
    assert_eq!(b.eval("document.getElementById('confirm-ok').disabled"), true);
    b.key("Enter");
    assert_eq!(b.eval("document.getElementById('confirm').open"), true);
    b.type_text("b");
    assert_eq!(b.eval("document.getElementById('confirm-ok').disabled"), false);
    b.key("Enter");
    assert_eq!(b.eval("document.getElementById('confirm').open"), false);
    assert_eq!(b.focused(), "act-failover");
    let said = b.wait_for(
        "the failover to be done",
        &format!(
            "{0}.startsWith('Failover of disk db done') && {0}",
            js_text("action-status")
        ),
        Duration::from_secs(240),
    );
    let said = said.as_str().unwrap_or_default().to_string();
    eprintln!("the console's status: {said}");
    assert!(said.contains("stopped for good"), "{said}");
    // The image and its log, where the status line says.
    let image = said
        .split("the image is at ")
        .nth(1)
        .and_then(|r| r.split(" (log: ").next())
        .unwrap_or_else(|| panic!("no image in the status: {said}"));
    let log = said
        .split(" (log: ")
        .nth(1)
        .and_then(|r| r.split(") on the target's host").next())
        .unwrap_or_else(|| panic!("no log in the status: {said}"));
    let expected = site.dir.join("data/db/failovers").join(&name);
    assert_eq!(Path::new(image), expected, "{said}");
    assert_eq!(
        Path::new(log),
        site.dir.join("data/db/failovers").join(format!("{name}.log"))
    );
    assert!(Path::new(log).is_file(), "no log at {log}");
    // At the tag's point.
    assert!(
        said.contains(&format!("at seq {seq} (")),
        "not at the tag's seq {seq}: {said}"
    );
    assert!(said.contains("before-upgrade"), "{said}");
    assert!(
        std::fs::metadata(image).is_ok_and(|m| m.len() == 32 << 20),
        "the image {image}: {:?}\nits log:\n{}",
        std::fs::metadata(image),
        std::fs::read_to_string(log).unwrap_or_default()
    );
    run_ok(Command::new("e2fsck").arg("-fn").arg(image), T);
    let hostname = run_ok(Command::new("debugfs").args(["-R", "cat /etc/hostname"]).arg(image), T);
    assert_eq!(String::from_utf8_lossy(&hostname.stdout), "db1\n");
    b.wait_for(
        "the failover in the disk's facts",
        "document.getElementById('disk-facts').textContent.includes('failed over')",
        T,
    );
    b.screenshot(&shots.join("disk-after-failover.png"));

    let said = b.complaints();
    assert!(said.is_empty(), "the browser's console: {said:#?}");
    for shot in ["disk-after-tag.png", "disk-after-drill.png", "disk-after-failover.png"] {
        let len = std::fs::metadata(shots.join(shot)).map(|m| m.len()).unwrap_or(0);
        assert!(len > 10_000, "screenshot {shot} of {len} bytes in {}", s(&shots));
    }
    drop(b);
    drop(a);
}
