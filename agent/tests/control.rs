//! The control socket's requests (`tidemark_agent::control::handle`) on a
//! disk opened as `protect` opens it: status, metrics (every declared one
//! exported), tags (journaled, unique, bounded), bad requests refused.

use std::path::Path;

use tidemark_agent::config::{ListenAddr, ProtectConfig};
use tidemark_agent::control::{self, read_tags};
use tidemark_agent::run;
use tidemark_agent::shim::Shim;

fn open(d: &Path, id: &str) -> run::Opened {
    let cfg = ProtectConfig {
        disk: d.join("d.img"),
        state: d.join("st"),
        listen: Some(ListenAddr::Unix(d.join("s"))),
        ublk: None,
        disk_id: id.parse().unwrap(),
        create_size: Some(1 << 20),
        journal_cap: None,
        bench_consume: false,
        ship: None,
    };
    run::open(&cfg).unwrap()
}

async fn ask(shim: &Shim, req: &str) -> serde_json::Value {
    serde_json::from_str(&control::handle(shim, req).await).unwrap()
}

#[tokio::test]
async fn answers_status_metrics_and_refuses_garbage() {
    let d = tempfile::tempdir().unwrap();
    let o = open(d.path(), "ctl");
    let v = ask(&o.shim, r#"{"cmd":"status"}"#).await;
    assert_eq!(v["status"]["disk_id"], "ctl");
    assert_eq!(v["status"]["mode"], "journal");
    let v = ask(&o.shim, r#"{"cmd":"metrics"}"#).await;
    assert!(v["metrics"]
        .as_str()
        .unwrap()
        .contains("tidemark_agent_writes_total{disk=\"ctl\"} 0"));
    let text = v["metrics"].as_str().unwrap();
    assert_eq!(
        tidemark_agent::metrics::REGISTRY.missing(text),
        Vec::<String>::new(),
        "{text}"
    );
    let v = ask(&o.shim, r#"{"cmd":"launch"}"#).await;
    assert!(v["error"].as_str().unwrap().contains("unknown command"));
    let v = ask(&o.shim, "not json").await;
    assert!(v["error"].as_str().unwrap().contains("malformed request"));
}

#[tokio::test]
async fn tags_are_journaled_unique_and_bounded() {
    let d = tempfile::tempdir().unwrap();
    let o = open(d.path(), "tags");
    let v = ask(
        &o.shim,
        r#"{"cmd":"tag","name":"before-upgrade","app_consistent":true}"#,
    )
    .await;
    assert_eq!(v["ok"], true, "{v}");
    let seq = v["seq"].as_u64().unwrap();
    let v = ask(&o.shim, r#"{"cmd":"tag","name":"before-upgrade"}"#).await;
    assert!(v["error"].as_str().unwrap().contains("already used"), "{v}");
    assert_eq!(v["existing"]["app_consistent"], true, "{v}");
    assert!(v["existing"]["seq"].as_u64().is_some(), "{v}");
    let v = ask(&o.shim, r#"{"cmd":"tag","name":""}"#).await;
    assert!(v["error"].as_str().unwrap().contains("empty"), "{v}");
    let long = "é".repeat(128); // 256 bytes
    let v = ask(&o.shim, &serde_json::json!({"cmd":"tag","name":long}).to_string()).await;
    assert!(v["error"].as_str().unwrap().contains("at most 255 bytes"), "{v}");
    let ok255 = format!("{}x", "é".repeat(127));
    let v = ask(&o.shim, &serde_json::json!({"cmd":"tag","name":ok255}).to_string()).await;
    assert_eq!(v["ok"], true, "{v}");
    assert_eq!(v["seq"].as_u64().unwrap(), seq + 1);
    let v = ask(&o.shim, r#"{"cmd":"tag"}"#).await;
    assert!(v["error"].as_str().unwrap().contains("needs a"), "{v}");
    let v = ask(&o.shim, r#"{"cmd":"tag","name":"late","deadline_ns":1}"#).await;
    assert!(v["error"].as_str().unwrap().contains("deadline"), "{v}");

    let tags = read_tags(&d.path().join("st")).unwrap();
    assert_eq!(tags.len(), 2);
    assert_eq!(
        (tags[0].name.as_str(), tags[0].seq, tags[0].app_consistent),
        ("before-upgrade", seq, true)
    );
    assert!(!tags[1].app_consistent);
    // The journal holds exactly the two tags, with the app flag on the first.
    let reader = tidemark_formats::journal::JournalReader::open(&d.path().join("st").join("journal")).unwrap();
    let recs: Vec<_> = reader
        .records_from(0)
        .map(|r| r.unwrap())
        .filter(|r| r.header.kind == tidemark_wire::record::RecordKind::Tag)
        .collect();
    assert_eq!(recs.len(), 2);
    assert_eq!(recs[0].tag_name(), Some("before-upgrade"));
    assert!(recs[0].header.app_consistent());
    assert!(!recs[1].header.app_consistent());
}
