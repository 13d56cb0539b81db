//! The collector's REST API as an operator's tools use it (issue 15): the
//! disk list, the event log (what happened, and every operator action,
//! kept across a restart), and every error as JSON
//! `{"error":{"code","message"}}`.
//!
//! The OpenAPI document the collector serves is checked against its real
//! answers, both ways: every field answered is documented with its type,
//! every required field is answered.
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

    // The site, by the host's name unless --site says otherwise.
    let (_, v) = call(&site, "GET", "/api/v1/status", None);
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    assert_eq!(v["collector"]["site"], host.trim(), "{v}");

    // The protected servers: the agent identity the disk is bound to.
    let (s, v) = call(&site, "GET", "/api/v1/agents", None);
    assert_eq!(s, 200, "{v}");
    let a0 = &v["agents"][0];
    assert!(a0["agent"].as_str().is_some_and(|n| n.starts_with("agent ")), "{v}");
    assert_eq!(
        (a0["disks"].clone(), a0["connected"].clone()),
        (serde_json::json!(["db"]), serde_json::json!(["db"])),
        "{v}"
    );

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
    for (path, status, code, needle) in [
        ("/api/v1/disks/nope", 404, "not_found", "\"nope\""),
        ("/api/v1/events?disk=nope", 404, "not_found", "\"nope\""),
        ("/api/v1/events?limit=abc", 400, "bad_request", "limit=\"abc\""),
        ("/api/v1/events?limit=5000", 400, "bad_request", "0 to 1000"),
        ("/api/v1/events?after=-1", 400, "bad_request", "after"),
        ("/api/v1/events?bogus=1", 400, "bad_request", "\"bogus\""),
    ] {
        refused(call(&site, "GET", path, None), status, code, needle);
    }

    // The chart's history: a sample a second.
    until("three seconds of history", || {
        let (s, v) = call(&site, "GET", "/api/v1/disks/db/history", None);
        assert_eq!(s, 200, "{v}");
        assert_eq!(v["resolution"], "1s", "{v}");
        let n = v["samples"].as_array().map_or(0, Vec::len);
        n >= 3 && v["samples"][n - 1]["t"].as_i64() > v["samples"][0]["t"].as_i64()
    });

    openapi_matches_the_answers(&site, admin);

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

/// The schema keywords [`check`] understands; any other in the document
/// fails the test rather than pass unchecked.
const KNOWN: &[&str] = &[
    "$ref",
    "type",
    "properties",
    "required",
    "items",
    "oneOf",
    "enum",
    "minimum",
    "maximum",
    "format",
    "description",
    "title",
    "additionalProperties",
];

/// Check `v` against `schema` (JSON Schema as OpenAPI 3.1 uses it),
/// resolving `$ref`s in `doc`; what does not match goes to `errs`.
fn check(doc: &Value, schema: &Value, v: &Value, at: &str, errs: &mut Vec<String>) {
    let obj = schema
        .as_object()
        .unwrap_or_else(|| panic!("{at}: a schema that is not an object: {schema}"));
    for k in obj.keys() {
        assert!(
            KNOWN.contains(&k.as_str()),
            "{at}: schema keyword {k:?} unknown to the checker"
        );
    }
    if let Some(r) = obj.get("$ref") {
        let name = r
            .as_str()
            .and_then(|r| r.strip_prefix("#/components/schemas/"))
            .unwrap_or_else(|| panic!("{at}: a $ref that is not local: {r}"));
        let target = &doc["components"]["schemas"][name];
        assert!(target.is_object(), "{at}: $ref to a missing schema {name}");
        return check(doc, target, v, at, errs);
    }
    if let Some(alts) = obj.get("oneOf").and_then(Value::as_array) {
        let n = alts
            .iter()
            .filter(|a| {
                let mut e = Vec::new();
                check(doc, a, v, at, &mut e);
                e.is_empty()
            })
            .count();
        if n != 1 {
            errs.push(format!("{at}: {v} matches {n} of the oneOf alternatives"));
        }
        // The alternative that matched checked the value's keys.
        return;
    }
    if let Some(t) = obj.get("type") {
        let types: Vec<&str> = match t {
            Value::String(t) => vec![t.as_str()],
            Value::Array(a) => a.iter().filter_map(Value::as_str).collect(),
            _ => panic!("{at}: type {t}"),
        };
        let fits = types.iter().any(|t| match *t {
            "null" => v.is_null(),
            "boolean" => v.is_boolean(),
            "string" => v.is_string(),
            "integer" => v.is_i64() || v.is_u64(),
            "number" => v.is_number(),
            "array" => v.is_array(),
            "object" => v.is_object(),
            other => panic!("{at}: type {other:?}"),
        });
        if !fits {
            errs.push(format!("{at}: {v} is not of type {types:?}"));
            return;
        }
    }
    if let Some(e) = obj.get("enum").and_then(Value::as_array) {
        if !e.contains(v) {
            errs.push(format!("{at}: {v} is not one of {e:?}"));
        }
    }
    if let (Some(min), Some(x)) = (obj.get("minimum").and_then(Value::as_f64), v.as_f64()) {
        if x < min {
            errs.push(format!("{at}: {x} is below the minimum {min}"));
        }
    }
    if let (Some(max), Some(x)) = (obj.get("maximum").and_then(Value::as_f64), v.as_f64()) {
        if x > max {
            errs.push(format!("{at}: {x} is above the maximum {max}"));
        }
    }
    if let Some(o) = v.as_object() {
        let props = obj.get("properties").and_then(Value::as_object);
        let open = obj
            .get("additionalProperties")
            .is_some_and(|a| a != &Value::Bool(false));
        for (k, x) in o {
            match props.and_then(|p| p.get(k)) {
                Some(s) => check(doc, s, x, &format!("{at}.{k}"), errs),
                None if open => {}
                None => errs.push(format!("{at}: key {k:?} answered but not documented")),
            }
        }
        for k in obj.get("required").and_then(Value::as_array).into_iter().flatten() {
            let k = k.as_str().unwrap_or_default();
            if !o.contains_key(k) {
                errs.push(format!("{at}: required key {k:?} missing"));
            }
        }
    }
    if let (Some(items), Some(a)) = (obj.get("items"), v.as_array()) {
        for (i, x) in a.iter().enumerate() {
            check(doc, items, x, &format!("{at}[{i}]"), errs);
        }
    }
}

/// The document is OpenAPI 3.1, names every route, and the answers of
/// each (successes and errors) match the schemas it gives for them.
fn openapi_matches_the_answers(site: &Site, admin: &str) {
    let (s, doc) = call(site, "GET", "/api/v1/openapi.json", None);
    assert_eq!(s, 200, "{doc}");
    assert!(
        doc["openapi"].as_str().is_some_and(|v| v.starts_with("3.1")),
        "{}",
        doc["openapi"]
    );
    let methods = [
        ("/api/v1/status", "get"),
        ("/api/v1/disks", "get"),
        ("/api/v1/disks/{id}", "get"),
        ("/api/v1/disks/{id}/history", "get"),
        ("/api/v1/events", "get"),
        ("/api/v1/alerts", "get"),
        ("/api/v1/disks/{id}/refresh", "post"),
        ("/api/v1/disks/{id}/quiesce", "post"),
        ("/api/v1/disks/{id}/rebind", "post"),
        ("/api/v1/openapi.json", "get"),
        ("/metrics", "get"),
        ("/api/v1/disks/{id}/points", "get"),
        ("/api/v1/disks/{id}/tags", "post"),
        ("/api/v1/disks/{id}/drills", "get"),
        ("/api/v1/disks/{id}/drills", "post"),
        ("/api/v1/disks/{id}/policy", "get"),
        ("/api/v1/disks/{id}/policy", "put"),
        ("/api/v1/disks/{id}/failover", "post"),
        ("/api/v1/agents", "get"),
    ];
    for (p, m) in methods {
        assert!(doc["paths"][p][m].is_object(), "{m} {p} is not in the document");
    }
    let documented: usize = doc["paths"]
        .as_object()
        .map(|p| p.values().map(|ms| ms.as_object().map_or(0, |o| o.len())).sum())
        .unwrap_or(0);
    assert_eq!(
        documented,
        methods.len(),
        "the document names a route the test does not know"
    );
    let cases: &[(&str, &str, &str, u16, Option<&str>)] = &[
        ("GET", "/api/v1/status", "/api/v1/status", 200, None),
        ("GET", "/api/v1/status", "/api/v1/status", 200, Some(admin)),
        ("GET", "/api/v1/disks", "/api/v1/disks", 200, None),
        ("GET", "/api/v1/disks/db", "/api/v1/disks/{id}", 200, Some(admin)),
        ("GET", "/api/v1/disks/nope", "/api/v1/disks/{id}", 404, None),
        ("GET", "/api/v1/events?limit=1000", "/api/v1/events", 200, None),
        ("GET", "/api/v1/events?limit=x", "/api/v1/events", 400, None),
        ("GET", "/api/v1/events?disk=nope", "/api/v1/events", 404, None),
        ("GET", "/api/v1/alerts", "/api/v1/alerts", 200, None),
        ("GET", "/api/v1/agents", "/api/v1/agents", 200, None),
        (
            "GET",
            "/api/v1/disks/db/history",
            "/api/v1/disks/{id}/history",
            200,
            None,
        ),
        (
            "GET",
            "/api/v1/disks/db/history?resolution=1m",
            "/api/v1/disks/{id}/history",
            200,
            None,
        ),
        (
            "GET",
            "/api/v1/disks/db/history?resolution=5s",
            "/api/v1/disks/{id}/history",
            400,
            None,
        ),
        (
            "GET",
            "/api/v1/disks/nope/history",
            "/api/v1/disks/{id}/history",
            404,
            None,
        ),
        (
            "POST",
            "/api/v1/disks/db/refresh",
            "/api/v1/disks/{id}/refresh",
            200,
            None,
        ),
        (
            "POST",
            "/api/v1/disks/nope/refresh",
            "/api/v1/disks/{id}/refresh",
            404,
            None,
        ),
        (
            "POST",
            "/api/v1/disks/db/rebind",
            "/api/v1/disks/{id}/rebind",
            401,
            None,
        ),
        (
            "POST",
            "/api/v1/disks/db/rebind?x=1",
            "/api/v1/disks/{id}/rebind",
            400,
            Some(admin),
        ),
        (
            "POST",
            "/api/v1/disks/db/rebind",
            "/api/v1/disks/{id}/rebind",
            200,
            Some(admin),
        ),
        (
            "POST",
            "/api/v1/disks/db/quiesce",
            "/api/v1/disks/{id}/quiesce",
            401,
            None,
        ),
        ("GET", "/api/v1/disks/db/points", "/api/v1/disks/{id}/points", 200, None),
        (
            "GET",
            "/api/v1/disks/db/points?limit=0",
            "/api/v1/disks/{id}/points",
            400,
            None,
        ),
        (
            "GET",
            "/api/v1/disks/nope/points",
            "/api/v1/disks/{id}/points",
            404,
            None,
        ),
        ("GET", "/api/v1/disks/db/drills", "/api/v1/disks/{id}/drills", 200, None),
        (
            "POST",
            "/api/v1/disks/db/drills",
            "/api/v1/disks/{id}/drills",
            401,
            None,
        ),
        ("GET", "/api/v1/disks/db/policy", "/api/v1/disks/{id}/policy", 200, None),
        (
            "GET",
            "/api/v1/disks/nope/policy",
            "/api/v1/disks/{id}/policy",
            404,
            None,
        ),
        ("PUT", "/api/v1/disks/db/policy", "/api/v1/disks/{id}/policy", 401, None),
        ("POST", "/api/v1/disks/db/tags", "/api/v1/disks/{id}/tags", 401, None),
        (
            "POST",
            "/api/v1/disks/db/failover",
            "/api/v1/disks/{id}/failover",
            401,
            None,
        ),
        (
            "POST",
            "/api/v1/disks/db/failover",
            "/api/v1/disks/{id}/failover",
            400,
            Some(admin),
        ),
        (
            "POST",
            "/api/v1/disks/db/tags",
            "/api/v1/disks/{id}/tags",
            400,
            Some(admin),
        ),
    ];
    for &(method, path, documented, status, token) in cases {
        let (got, v) = call(site, method, path, token);
        assert_eq!(got, status, "{method} {path}: {v}");
        let schema = &doc["paths"][documented][method.to_lowercase()]["responses"][status.to_string()]["content"]
            ["application/json"]["schema"];
        assert!(
            schema.is_object(),
            "{method} {documented}: answer {status} not documented"
        );
        let mut errs = Vec::new();
        check(&doc, schema, &v, &format!("{method} {path}"), &mut errs);
        assert!(
            errs.is_empty(),
            "{method} {path} does not match the document:\n{}",
            errs.join("\n")
        );
    }
}

/// A CA (its PEM) and a server certificate for 127.0.0.1 it issued.
fn webhook_tls() -> (String, std::sync::Arc<rustls::ServerConfig>) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.subject_alt_names = vec![rcgen::SanType::IpAddress(std::net::IpAddr::V4(
        std::net::Ipv4Addr::LOCALHOST,
    ))];
    let cert = params.signed_by(&key, &ca, &ca_key).unwrap();
    let config = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
        .unwrap();
    (ca.pem(), std::sync::Arc::new(config))
}

/// A webhook receiver on loopback (HTTPS with `tls`): every POSTed JSON
/// body, in order.
fn webhook(
    tls: Option<std::sync::Arc<rustls::ServerConfig>>,
) -> (String, std::sync::Arc<std::sync::Mutex<Vec<Value>>>) {
    use std::io::{BufRead, BufReader, Read, Write};
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let scheme = if tls.is_some() { "https" } else { "http" };
    let url = format!("{scheme}://{}/hook", l.local_addr().unwrap());
    let got = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let keep = got.clone();
    trait Io: Read + Write + Send {}
    impl<T: Read + Write + Send> Io for T {}
    std::thread::spawn(move || {
        for c in l.incoming().flatten() {
            c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let c: Box<dyn Io> = match &tls {
                Some(cfg) => Box::new(rustls::StreamOwned::new(
                    rustls::ServerConnection::new(cfg.clone()).unwrap(),
                    c,
                )),
                None => Box::new(c),
            };
            let mut r = BufReader::new(c);
            let (mut len, mut chunked) = (0usize, false);
            loop {
                let mut line = String::new();
                if r.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
                let l = line.to_ascii_lowercase();
                if let Some(v) = l.strip_prefix("content-length:") {
                    len = v.trim().parse().unwrap_or(0);
                }
                chunked |= l.starts_with("transfer-encoding:") && l.contains("chunked");
            }
            let mut body = Vec::new();
            if chunked {
                loop {
                    let mut size = String::new();
                    r.read_line(&mut size).unwrap();
                    let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
                    let mut chunk = vec![0; n + 2];
                    r.read_exact(&mut chunk).unwrap();
                    if n == 0 {
                        break;
                    }
                    body.extend_from_slice(&chunk[..n]);
                }
            } else {
                body.resize(len, 0);
                r.read_exact(&mut body).unwrap();
            }
            if let Ok(v) = serde_json::from_slice(&body) {
                keep.lock().unwrap().push(v);
            }
            let c = r.get_mut();
            let _ = c.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
            let _ = c.flush();
        }
    });
    (url, got)
}

/// Poll `f` until it holds (within a minute), saying what was awaited.
fn until(what: &str, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

#[test]
fn an_rpo_alert_is_raised_while_the_target_is_away_and_cleared_when_caught_up() {
    need_tool("qemu-io");
    let dir = tmpdir("api-alerts");
    let d = dir.path();
    // An https receiver, trusted through --alert-webhook-ca.
    let (ca_pem, tls) = webhook_tls();
    let ca = d.join("webhook-ca.pem");
    std::fs::write(&ca, ca_pem).unwrap();
    let (url, hooked) = webhook(Some(tls));
    let mut site = Site::start(
        d,
        &[
            "--alert-rpo",
            "2s",
            "--alert-webhook",
            &url,
            "--alert-webhook-ca",
            ca.to_str().unwrap(),
        ],
    );
    let a = agent(&site, d, "rp", 16 << 20, &[]);
    site.wait("rp", T);
    let rpo_alert = |site: &Site| -> Option<Value> {
        let (s, v) = call(site, "GET", "/api/v1/alerts", None);
        assert_eq!(s, 200, "{v}");
        v["alerts"]
            .as_array()
            .and_then(|a| a.iter().find(|x| x["alert"] == "rpo" && x["disk_id"] == "rp").cloned())
    };
    assert!(rpo_alert(&site).is_none(), "an RPO alert with the target there");

    // The target goes away while the disk takes writes: the oldest write
    // not yet applied ages past the threshold.
    site.target.stop();
    let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(7);
    assert!(tidemark_tests::pipe::write_burst(&a.sock, 16 << 20, &mut rng, 32));
    until("the rpo alert", || rpo_alert(&site).is_some());
    let alert = rpo_alert(&site).unwrap();
    assert!(
        matches!(alert["severity"].as_str(), Some("warning" | "critical")),
        "{alert}"
    );
    assert!(
        alert["message"].as_str().unwrap().contains("RPO threshold 2s"),
        "{alert}"
    );
    let metrics = raw_api(
        site.api_port,
        true,
        "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    assert!(
        metrics.contains("tidemark_collector_disk_alert_level{disk=\"rp\"} 1")
            || metrics.contains("tidemark_collector_disk_alert_level{disk=\"rp\"} 2"),
        "{metrics}"
    );
    until("the webhook's raised delivery", || {
        hooked
            .lock()
            .unwrap()
            .iter()
            .any(|v| v["status"] == "raised" && v["alert"] == "rpo" && v["disk_id"] == "rp")
    });
    wait_event(&site, "rp", "alert", "alert rpo raised");

    // Back, and caught up: cleared everywhere.
    site.target.restart();
    site.wait("rp", T);
    until("the rpo alert to clear", || rpo_alert(&site).is_none());
    until("the webhook's cleared delivery", || {
        hooked
            .lock()
            .unwrap()
            .iter()
            .any(|v| v["status"] == "cleared" && v["alert"] == "rpo" && v["disk_id"] == "rp")
    });
    wait_event(&site, "rp", "alert", "alert rpo cleared");
    drop(a);
}

#[test]
fn bad_alert_settings_are_refused_by_name() {
    let dir = tmpdir("api-alert-flags");
    let d = dir.path();
    let token = d.join("token");
    tidemark_tests::write_secret(&token, "t\n");
    let none = d.join("no-such-ca.pem");
    let none = none.to_str().unwrap();
    for (args, needle) in [
        (vec!["--alert-rpo", "0s"], "--alert-rpo must be more than 0"),
        (vec!["--alert-rpo", "soon"], "--alert-rpo \"soon\""),
        (vec!["--alert-webhook", "ftp://x"], "give an http:// or https:// URL"),
        (
            vec!["--alert-webhook", "https://127.0.0.1:9/x", "--alert-webhook-ca", none],
            "--alert-webhook-ca: ",
        ),
        (
            vec!["--alert-webhook", "http://127.0.0.1:9/x", "--alert-webhook-ca", none],
            "--alert-webhook-ca is for an https:// --alert-webhook",
        ),
    ] {
        let (flag, value) = (args[0], args[1]);
        let out = tidemark_tests::run(
            Command::new(bin("tidemark-collector"))
                .args(["--listen", "127.0.0.1:0", "--spool"])
                .arg(d.join("spool"))
                .args(["--target", "127.0.0.1:9", "--api", "127.0.0.1:0", "--token-file"])
                .arg(&token)
                .arg("--insecure-plaintext")
                .args(&args),
            T,
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains(needle), "{flag} {value}: {err}");
        assert!(
            !d.join("spool").exists(),
            "{flag} {value}: a refused start left a spool"
        );
    }
}
