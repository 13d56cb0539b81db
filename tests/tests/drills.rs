//! The configuration server's operator actions, end to end (issue 15):
//! recovery points listed from the target through the API, tags taken
//! through the agent, per-disk policy (its retention reaching the target
//! without a restart), and drills: a real ext4, written through the shim
//! by nbdcopy, passes `e2fsck -fn` in a drill of its newest point; its
//! superblock zeroed through the shim (so replicated), the next drill
//! fails, names the point and keeps the checker's output, and an alert is
//! raised. A drill never changes the replica; a partition table is
//! followed; a schedule drills on its own; a failover through the API
//! writes a clean image at a tag before the damage. Bad input gets a 4xx naming
//! what was wrong, and nothing is half applied.
//!
//! Real processes over HTTPS (`cargo build --bins` first); qemu-io,
//! nbdcopy, mkfs.ext4, e2fsck; FUSE (`/dev/fuse`, root) for the drill.

use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tidemark_tests::pipe::{agent, tmpdir};
use tidemark_tests::recovery::{stdout, tidemark};
use tidemark_tests::{need_tool, raw_api, run, run_ok, Site};

const T: Duration = Duration::from_secs(90);

/// `METHOD path` with an optional bearer token and JSON body: (status, JSON).
fn call(site: &Site, method: &str, path: &str, token: Option<&str>, body: Option<&str>) -> (u16, Value) {
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let body = body.unwrap_or("");
    let r = raw_api(
        site.api_port,
        !site.plaintext,
        &format!(
            "{method} {path} HTTP/1.1\r\nHost: x\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        ),
    );
    let code = r
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no HTTP status in {r:?}"));
    let text = r.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    let json = serde_json::from_str(text).unwrap_or_else(|e| panic!("{method} {path}: not JSON ({e}): {r}"));
    (code, json)
}

/// The answer is an error of `status` whose message holds `needle`.
fn refused(got: (u16, Value), status: u16, needle: &str) {
    let (s, v) = got;
    assert_eq!(s, status, "{v}");
    let m = v["error"]["message"].as_str().unwrap_or_default();
    assert!(m.contains(needle), "message {m:?} lacks {needle:?}");
}

fn sha(path: &std::path::Path) -> String {
    let o = run_ok(Command::new("sha256sum").arg(path), T);
    stdout(&o).split_whitespace().next().unwrap_or_default().to_string()
}

fn poll<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(start.elapsed() < T, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(300));
    }
}

#[test]
fn points_tags_policy_and_drills_through_the_api() {
    for t in ["qemu-io", "nbdcopy", "mkfs.ext4", "e2fsck"] {
        need_tool(t);
    }
    assert!(
        std::path::Path::new("/dev/fuse").exists()
            && std::os::unix::fs::MetadataExt::uid(&std::fs::metadata("/proc/self").unwrap()) == 0,
        "drills serve the point's view as a FUSE file: this test needs /dev/fuse and root"
    );
    let dir = tmpdir("drills");
    let d = dir.path();
    let site = Site::start(d, &[]);
    let own = std::fs::read_to_string(&site.token_file).unwrap();
    let tok = Some(own.trim());
    let a = agent(&site, d, "db", 64 << 20, &[]);
    site.wait("db", T);

    // A real ext4 with files, written through the shim by a real client.
    let content = tidemark_tests::pipe::write_ext4(d, &a, 64 << 20);
    site.wait("db", T);

    // Points, from the target.
    let (s, v) = call(&site, "GET", "/api/v1/disks/db/points", None, None);
    assert_eq!(s, 200, "{v}");
    let pts = v["points"].as_array().unwrap();
    assert!(pts.iter().any(|p| p["latest"] == true), "{v}");
    assert!(
        pts.iter()
            .all(|p| p["time"].as_str().is_some_and(|t| t.starts_with("20"))),
        "{v}"
    );
    refused(call(&site, "GET", "/api/v1/disks/nope/points", None, None), 404, "nope");
    refused(
        call(&site, "GET", "/api/v1/disks/db/points?limit=0", None, None),
        400,
        "limit",
    );

    // Tags, through the agent: bad names refused before anything is
    // journaled, a good one journaled, its point at the target.
    let path = "/api/v1/disks/db/tags";
    refused(call(&site, "POST", path, None, Some(r#"{"name":"x"}"#)), 401, "Bearer");
    refused(
        call(&site, "POST", path, tok, Some(r#"{"name":"bad\u0007name"}"#)),
        400,
        "control characters",
    );
    refused(call(&site, "POST", path, tok, Some(r#"{"name":""}"#)), 400, "empty");
    refused(
        call(&site, "POST", path, tok, Some(r#"{"name":"latest"}"#)),
        400,
        "reads as a point spec",
    );
    refused(
        call(&site, "POST", path, tok, Some(r#"{"name":"x","colour":"red"}"#)),
        400,
        "colour",
    );
    refused(call(&site, "POST", path, tok, Some(r#"{"name":"#)), 400, "not valid");
    refused(
        call(&site, "POST", "/api/v1/disks/nope/tags", tok, Some(r#"{"name":"x"}"#)),
        404,
        "nope",
    );
    let (s, v) = call(&site, "POST", path, tok, Some(r#"{"name":"before-upgrade"}"#));
    assert_eq!(s, 201, "{v}");
    let tag_seq = v["seq"].as_u64().unwrap();
    refused(
        call(&site, "POST", path, tok, Some(r#"{"name":"before-upgrade"}"#)),
        409,
        "already used",
    );
    poll("the tag's point at the target", || {
        let (_, v) = call(&site, "GET", "/api/v1/disks/db/points", None, None);
        v["points"]
            .as_array()?
            .iter()
            .find(|p| p["tag"] == "before-upgrade")
            .map(|p| assert_eq!(p["seq"], tag_seq, "{p}"))
    });

    // The policy: the target's retention, changed without a restart.
    let (s, v) = call(&site, "GET", "/api/v1/disks/db/policy", None, None);
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["retention_source"], "target", "{v}");
    assert_eq!(v["retention_window_s"], 86400, "{v}");
    let ppath = "/api/v1/disks/db/policy";
    let (s, v) = call(
        &site,
        "PUT",
        ppath,
        tok,
        Some(r#"{"retention_window_s":7200,"point_interval_ms":2000,"rpo_s":60}"#),
    );
    assert_eq!(s, 200, "{v}");
    assert_eq!(
        (v["retention_window_s"].clone(), v["point_interval_ms"].clone()),
        (json!(7200), json!(2000))
    );
    assert_eq!(v["rpo_s"], 60, "{v}");
    // Bad input: 4xx naming the problem, nothing half applied.
    refused(call(&site, "PUT", ppath, None, Some(r#"{"rpo_s":30}"#)), 401, "Bearer");
    refused(call(&site, "PUT", ppath, tok, Some(r#"{"rpo_s":30"#)), 400, "not valid");
    refused(
        call(&site, "PUT", ppath, tok, Some(r#"{"rpo_s":30,"retention":1}"#)),
        400,
        "retention",
    );
    refused(
        call(&site, "PUT", ppath, tok, Some(r#"{"rpo_s":30,"retention_window_s":5}"#)),
        400,
        "retention_window_s 5 is out of range",
    );
    refused(
        call(&site, "PUT", ppath, tok, Some(r#"{"on_full":"maybe"}"#)),
        400,
        "on_full",
    );
    refused(call(&site, "PUT", ppath, tok, Some(r#"{"rpo_s":-1}"#)), 400, "rpo_s");
    refused(
        call(&site, "PUT", "/api/v1/disks/nope/policy", tok, Some("{}")),
        404,
        "nope",
    );
    let (_, v) = call(&site, "GET", ppath, None, None);
    assert_eq!(
        (v["rpo_s"].clone(), v["retention_window_s"].clone()),
        (json!(60), json!(7200)),
        "{v}"
    );

    // A drill of the newest point: the filesystem is clean; the replica
    // is not touched.
    let before = sha(&site.replica("db"));
    refused(
        call(&site, "POST", "/api/v1/disks/db/drills", None, None),
        401,
        "Bearer",
    );
    refused(
        call(&site, "POST", "/api/v1/disks/db/drills?wait=x", tok, None),
        400,
        "wait",
    );
    let (s, v) = call(&site, "POST", "/api/v1/disks/db/drills", tok, None);
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["result"], "passed", "{}", serde_json::to_string_pretty(&v).unwrap());
    assert!(v["output"].as_str().unwrap().contains("e2fsck -fn"), "{v}");
    let passed_seq = v["seq"].as_u64().unwrap();
    assert!(passed_seq >= tag_seq, "{v}");
    assert_eq!(sha(&site.replica("db")), before, "a drill changed the replica");
    let (_, v) = call(&site, "GET", "/api/v1/disks/db/points", None, None);
    let p = v["points"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["seq"] == passed_seq)
        .cloned();
    assert_eq!(p.unwrap_or_default()["verified"], "passed", "{v}");
    assert_eq!(v["last_verified"]["seq"], passed_seq, "{v}");
    let st = site.disk_status("db");
    assert_eq!(st["last_verified"]["seq"], passed_seq, "{st}");
    // The newest point, as the collector last asked (every ~10 s).
    let lp = poll("the disk's last point", || {
        let st = site.disk_status("db");
        st["last_point"]["seq"]
            .as_u64()
            .filter(|s| *s >= passed_seq)
            .map(|_| st["last_point"].clone())
    });
    assert!(
        lp["time"].as_str().is_some_and(|t| t.starts_with("20")) && lp["age_s"].is_number(),
        "{lp}"
    );
    // The same through the tools on the target's host.
    let data = d.join("data");
    let o = run(tidemark().args(["drill", "--data"]).arg(&data).arg("db"), T);
    assert!(
        o.status.success(),
        "{}{}",
        stdout(&o),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(stdout(&o).contains("PASSED"), "{}", stdout(&o));
    let o = run_ok(tidemark().args(["points", "--data"]).arg(&data).arg("db"), T);
    assert!(
        stdout(&o).contains("DRILL") && stdout(&o).contains("passed"),
        "{}",
        stdout(&o)
    );
    assert!(
        stdout(&o).contains("last verified recoverable point: seq"),
        "{}",
        stdout(&o)
    );

    // The superblock zeroed through the shim: the next drill fails, names
    // the point and keeps e2fsck's words; an alert is raised.
    run_ok(
        Command::new("qemu-io")
            .args(["-f", "raw", "-c", "write -z 0 8192"])
            .arg(a.uri()),
        T,
    );
    site.wait("db", T);
    let (s, v) = call(&site, "POST", "/api/v1/disks/db/drills", tok, None);
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["result"], "failed", "{}", serde_json::to_string_pretty(&v).unwrap());
    let failed_seq = v["seq"].as_u64().unwrap();
    assert!(failed_seq > passed_seq, "{v}");
    assert!(
        v["summary"].as_str().unwrap().contains(&format!("seq {failed_seq}")),
        "{v}"
    );
    assert!(v["output"].as_str().unwrap().contains("superblock"), "{v}");
    let alert = poll("the drill_failed alert", || {
        let (_, v) = call(&site, "GET", "/api/v1/alerts", None, None);
        v["alerts"]
            .as_array()?
            .iter()
            .find(|a| a["alert"] == "drill_failed")
            .cloned()
    });
    assert_eq!(alert["severity"], "critical", "{alert}");
    let (_, v) = call(&site, "GET", "/api/v1/disks/db/drills", None, None);
    let drills = v["drills"].as_array().unwrap();
    assert!(drills.len() >= 3, "{v}");
    assert_eq!(drills[0]["result"], "failed", "{v}");
    // The last verified point stays the one that passed.
    assert_eq!(v["last_verified"]["seq"], passed_seq, "{v}");
    let o = run(tidemark().args(["drill", "--data"]).arg(&data).arg("db"), T);
    assert!(
        !o.status.success(),
        "a failed drill must fail the command: {}",
        stdout(&o)
    );
    let o = run_ok(
        tidemark().args(["drill", "--history", "--data"]).arg(&data).arg("db"),
        T,
    );
    assert!(
        stdout(&o).contains("failed") && stdout(&o).contains("passed"),
        "{}",
        stdout(&o)
    );
    let o = run_ok(tidemark().args(["status", "--api", &site.api()]), T);
    let want = format!("seq {passed_seq}, ");
    assert!(
        stdout(&o).contains("VERIFIED") && stdout(&o).contains(&want) && stdout(&o).contains("(last drill failed)"),
        "{}",
        stdout(&o)
    );

    // A schedule: a partitioned disk (an MBR: an ext4 in partition 1,
    // nothing in partition 2) is drilled on its own within seconds of the
    // policy asking for it; the partition table is followed.
    let parted = d.join("logs.img");
    tidemark_tests::sparse_file(&parted, 32 << 20);
    let mut mbr = vec![0u8; 512];
    for (i, (start, count)) in [(2048u32, 16384u32), (18432, 16384)].into_iter().enumerate() {
        let e = 446 + 16 * i;
        mbr[e + 4] = 0x83;
        mbr[e + 8..e + 12].copy_from_slice(&start.to_le_bytes());
        mbr[e + 12..e + 16].copy_from_slice(&count.to_le_bytes());
    }
    mbr[510] = 0x55;
    mbr[511] = 0xAA;
    std::fs::write(d.join("mbr.bin"), &mbr).unwrap();
    run_ok(
        Command::new("dd")
            .arg(format!("if={}", d.join("mbr.bin").display()))
            .arg(format!("of={}", parted.display()))
            .args(["conv=notrunc", "status=none"]),
        T,
    );
    run_ok(
        Command::new("mkfs.ext4")
            .args(["-q", "-F", "-E", "offset=1048576", "-d"])
            .arg(&content)
            .arg(&parted)
            .arg("8M"),
        T,
    );
    let b = agent(&site, d, "logs", 32 << 20, &[]);
    site.wait("logs", T);
    refused(
        call(
            &site,
            "PUT",
            "/api/v1/disks/logs/policy",
            tok,
            Some(r#"{"drill_interval_s":30}"#),
        ),
        400,
        "drill_interval_s 30 is out of range: 0, or 60",
    );
    let (s, v) = call(
        &site,
        "PUT",
        "/api/v1/disks/logs/policy",
        tok,
        Some(r#"{"drill_interval_s":3600}"#),
    );
    assert_eq!(s, 200, "{v}");
    let drill = poll("a scheduled drill", || {
        let (_, v) = call(&site, "GET", "/api/v1/disks/logs/drills", None, None);
        v["drills"].as_array()?.first().cloned()
    });
    assert_eq!(
        (drill["trigger"].as_str(), drill["result"].as_str()),
        (Some("schedule"), Some("passed")),
        "{}",
        serde_json::to_string_pretty(&drill).unwrap()
    );
    let summary = drill["summary"].as_str().unwrap();
    assert!(
        summary.contains("part1 (ext) clean") && summary.contains("part2"),
        "{drill}"
    );
    b.stop();

    // Nothing checkable (an empty disk): skipped with the reason, and with
    // nothing verified, the verified_age alert.
    let c = agent(&site, d, "scratch", 16 << 20, &[]);
    site.wait("scratch", T);
    let (s, v) = call(
        &site,
        "PUT",
        "/api/v1/disks/scratch/policy",
        tok,
        Some(r#"{"drill_interval_s":3600,"verified_max_age_s":600}"#),
    );
    assert_eq!(s, 200, "{v}");
    let drill = poll("a scheduled drill of the empty disk", || {
        let (_, v) = call(&site, "GET", "/api/v1/disks/scratch/drills", None, None);
        v["drills"].as_array()?.first().cloned()
    });
    assert_eq!(drill["result"], "skipped", "{drill}");
    assert!(
        drill["summary"].as_str().unwrap().contains("nothing checked"),
        "{drill}"
    );
    let alert = poll("the verified_age alert", || {
        let (_, v) = call(&site, "GET", "/api/v1/alerts", None, None);
        v["alerts"]
            .as_array()?
            .iter()
            .find(|a| a["alert"] == "verified_age" && a["disk_id"] == "scratch")
            .cloned()
    });
    assert!(alert["message"].as_str().unwrap().contains("no point"), "{alert}");
    c.stop();

    // A failover through the API (an admin's), at the tag taken before
    // the damage: the image is written on the target's host, is that
    // clean filesystem, and replication to the disk stops.
    let fpath = "/api/v1/disks/db/failover";
    refused(
        call(&site, "POST", fpath, None, Some(r#"{"at":"latest","name":"x"}"#)),
        401,
        "Bearer",
    );
    refused(call(&site, "POST", fpath, tok, Some(r#"{"at":"latest"}"#)), 400, "name");
    refused(
        call(
            &site,
            "POST",
            fpath,
            tok,
            Some(r#"{"at":"latest","name":"../etc/passwd"}"#),
        ),
        409,
        "image name",
    );
    refused(
        call(
            &site,
            "POST",
            fpath,
            tok,
            Some(r#"{"at":"latest","name":"x.raw","format":"qcow2"}"#),
        ),
        409,
        "format",
    );
    let (s, v) = call(
        &site,
        "POST",
        fpath,
        tok,
        Some(r#"{"at":"tag:before-upgrade","name":"db-recovered.raw"}"#),
    );
    assert_eq!(s, 202, "{v}");
    let out = std::path::PathBuf::from(v["output"].as_str().unwrap());
    let log = std::path::PathBuf::from(v["log"].as_str().unwrap());
    poll("the failover's end", || {
        std::fs::read_to_string(&log)
            .ok()
            .filter(|l| l.contains("failed over db"))
            .map(drop)
    });
    let fsck = run(Command::new("e2fsck").arg("-fn").arg(&out), T);
    assert!(fsck.status.success(), "the failed-over image: {}", stdout(&fsck));
    poll("the disk fenced as failed over", || {
        // The target ends the disk's generation: the collector fences it.
        let st = site.disk_status("db");
        let reason = st["fenced"]["reason"].as_str().unwrap_or_default().to_string();
        (st["mode"] == "fenced" && reason.contains("failed over")).then_some(())
    });
    a.stop();
}
