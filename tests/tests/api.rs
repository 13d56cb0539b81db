//! The collector's REST API as an operator's tools use it (issue 15): the
//! disk list, the event log (what happened, and every operator action,
//! kept across a restart), and every error as JSON
//! `{"error":{"code","message"}}`.
//!
//! Real processes over HTTPS (`cargo build --bins` first); qemu-io.

use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;
use tidemark_tests::pipe::{agent, tmpdir};
use tidemark_tests::{bin, need_tool, raw_api, run_ok, Site};

const T: Duration = Duration::from_secs(60);

/// `METHOD path` with an optional bearer token: (status, JSON body).
fn call(site: &Site, method: &str, path: &str, token: Option<&str>) -> (u16, Value) {
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let r = raw_api(
        site.api_port,
        !site.plaintext,
        &format!("{method} {path} HTTP/1.1\r\nHost: x\r\n{auth}Content-Length: 0\r\nConnection: close\r\n\r\n"),
    );
    let code = r
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no HTTP status in {r:?}"));
    let body = r.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    let json = serde_json::from_str(body).unwrap_or_else(|e| panic!("{method} {path}: not JSON ({e}): {r}"));
    (code, json)
}

/// The answer is an error of `status` whose code is `code` and whose
/// message holds `needle`.
fn refused(got: (u16, Value), status: u16, code: &str, needle: &str) {
    let (s, v) = got;
    assert_eq!(s, status, "{v}");
    assert_eq!(v["error"]["code"], code, "{v}");
    let m = v["error"]["message"].as_str().unwrap_or_default();
    assert!(m.contains(needle), "message {m:?} lacks {needle:?}");
}

fn events(site: &Site, query: &str) -> Vec<Value> {
    let (s, v) = call(site, "GET", &format!("/api/v1/events{query}"), None);
    assert_eq!(s, 200, "{v}");
    v["events"].as_array().cloned().unwrap_or_default()
}

/// Wait until an event of `disk` and `kind` whose message holds `needle`
/// is in the log.
fn wait_event(site: &Site, disk: &str, kind: &str, needle: &str) -> Value {
    let start = Instant::now();
    loop {
        let all = events(site, &format!("?disk={disk}&limit=1000"));
        if let Some(e) = all
            .iter()
            .find(|e| e["kind"] == kind && e["message"].as_str().is_some_and(|m| m.contains(needle)))
        {
            return e.clone();
        }
        assert!(
            start.elapsed() < T,
            "no {kind} event with {needle:?} for {disk} in {}",
            serde_json::to_string_pretty(&all).unwrap()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn the_api_lists_disks_keeps_an_event_log_and_answers_errors_in_json() {
    need_tool("qemu-io");
    let dir = tmpdir("api-events");
    let d = dir.path();
    let mut site = Site::start(d, &[]);
    let own = std::fs::read_to_string(&site.token_file).unwrap();
    let admin = own.trim();
    let a = agent(&site, d, "db", 64 << 20, &[]);
    site.wait("db", T);

    // The disk list: UUIDs only for an authenticated caller.
    let (s, v) = call(&site, "GET", "/api/v1/disks", None);
    assert_eq!(s, 200, "{v}");
    let db = v["disks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["disk_id"] == "db")
        .cloned();
    let db = db.unwrap_or_else(|| panic!("db not listed: {v}"));
    assert!(db.get("disk_uuid").is_none(), "{db}");
    let (_, v) = call(&site, "GET", "/api/v1/disks", Some(admin));
    assert!(v["disks"][0]["disk_uuid"].is_string(), "{v}");

    // What happened, in the log.
    let connected = wait_event(&site, "db", "agent", "connected");
    assert_eq!(connected["severity"], "info", "{connected}");
    assert!(
        connected["time"].as_str().is_some_and(|t| t.starts_with("20")),
        "{connected}"
    );
    wait_event(&site, "db", "target", "connected to the target");

    // An operator's action is in the log with who did it; a refused one too.
    let (s, v) = call(&site, "POST", "/api/v1/disks/db/rebind", Some(admin));
    assert_eq!(s, 200, "{v}");
    let e = wait_event(&site, "db", "operator", "rebind db: allowed");
    assert!(
        e["who"]
            .as_str()
            .is_some_and(|w| w.contains("token holder from 127.0.0.1")),
        "{e}"
    );
    refused(
        call(&site, "POST", "/api/v1/disks/db/quiesce", None),
        401,
        "unauthorized",
        "operator",
    );

    // The same log for people: `tidemark events`.
    let out = run_ok(
        Command::new(bin("tidemark")).args(["events", "db", "--api", &site.api(), "--limit", "1000"]),
        T,
    );
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.starts_with("TIME") && table.contains("MESSAGE"), "{table}");
    assert!(
        table
            .lines()
            .any(|l| l.contains("operator") && l.contains("rebind db: allowed") && l.contains("(by ")),
        "{table}"
    );

    // Errors: JSON with a code and a message naming what was wrong.
    refused(
        call(&site, "GET", "/api/v1/disks/nope", None),
        404,
        "not_found",
        "\"nope\"",
    );
    refused(
        call(&site, "GET", "/api/v1/events?disk=nope", None),
        404,
        "not_found",
        "\"nope\"",
    );
    refused(
        call(&site, "GET", "/api/v1/events?limit=abc", None),
        400,
        "bad_request",
        "limit=\"abc\"",
    );
    refused(
        call(&site, "GET", "/api/v1/events?limit=5000", None),
        400,
        "bad_request",
        "0 to 1000",
    );
    refused(
        call(&site, "GET", "/api/v1/events?after=-1", None),
        400,
        "bad_request",
        "after",
    );
    refused(
        call(&site, "GET", "/api/v1/events?bogus=1", None),
        400,
        "bad_request",
        "\"bogus\"",
    );

    // Following the log: after the newest id, nothing until something
    // happens; ids only grow.
    let all = events(&site, "?limit=1000");
    let ids: Vec<i64> = all.iter().map(|e| e["id"].as_i64().unwrap()).collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "{ids:?}");
    let last = *ids.last().unwrap();
    assert!(events(&site, &format!("?after={last}")).is_empty());
    assert_eq!(events(&site, "?limit=2").len(), 2);
    a.stop();
    let start = Instant::now();
    let left = loop {
        let new = events(&site, &format!("?after={last}"));
        if let Some(e) = new.iter().find(|e| e["kind"] == "agent" && e["disk_id"] == "db") {
            break e.clone();
        }
        assert!(start.elapsed() < T, "no event of the agent leaving: {new:?}");
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(left["message"].as_str().unwrap().contains("agent"), "{left}");

    // The log is the catalog's: it outlives a restart of the collector.
    site.collector.restart();
    let again = events(&site, "?limit=1000");
    assert!(
        again
            .iter()
            .any(|e| e["id"] == left["id"] && e["message"] == left["message"]),
        "{left} lost across a restart"
    );
}
