//! What a [`Frame::Call`](crate::frame::Frame::Call) asks, as JSON: the
//! configuration server's questions down the line (`docs/pipeline.md`,
//! "Calls"). The receiver answers with a `Reply`: the JSON named at each
//! variant, or (`ok` false) a JSON string saying why it refused. A Call
//! the receiver does not know is refused, never fatal to the connection.

use serde::{Deserialize, Serialize};

/// One call; `{"op": "<name>", …}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Call {
    /// Target: the disk's newest `limit` points, each with its drill
    /// result → `{"points":[{seq,time_ns,kind,tag,latest,verified}],
    /// "last_verified":Drill|null}`.
    Points { limit: u32 },
    /// Target: the disk's newest `limit` drills →
    /// `{"drills":[Drill], "last_verified":Drill|null}`.
    Drills { limit: u32 },
    /// Target: drill the disk's newest point now (`trigger`: who asked)
    /// → the recorded `Drill` once it has finished.
    Drill { trigger: String },
    /// Target: change the disk's retention → `{"retention": Retention}`
    /// as now in force.
    SetRetention(Retention),
    /// Target: the disk's retention → `{"retention": Retention}`.
    GetRetention,
    /// Target: fail the disk over at the point `at` names (`tidemark
    /// failover`'s `--at`) to the image `name` (a file name) in its
    /// failovers folder, in `format` → `{"output","log","point",…}` once
    /// written. Replication to the disk stops for good.
    Failover { at: String, name: String, format: String },
    /// Agent: journal a tag and make it durable → `{"seq": N}`.
    Tag { name: String, app_consistent: bool },
}

/// A disk's retention, as the target applies it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Retention {
    /// Points older than this expire (0: retention off).
    pub window_s: u64,
    /// Cap on the disk's undo data (None: no cap).
    pub max_bytes: Option<u64>,
    /// `prune` or `stop` when the cap is reached.
    pub on_full: String,
    /// At most one crash-consistent point per this much source time.
    pub point_interval_ms: u64,
}

impl Call {
    /// The JSON body of the frame.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    /// Parse a frame's body; the error says what was wrong.
    pub fn parse(body: &str) -> Result<Call, String> {
        serde_json::from_str(body).map_err(|e| format!("bad call: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calls_round_trip_and_unknown_ones_are_named() {
        let calls = [
            Call::Points { limit: 5 },
            Call::Drill { trigger: "api".into() },
            Call::SetRetention(Retention {
                window_s: 3600,
                max_bytes: None,
                on_full: "prune".into(),
                point_interval_ms: 1000,
            }),
            Call::Tag {
                name: "t".into(),
                app_consistent: false,
            },
        ];
        for c in calls {
            assert_eq!(Call::parse(&c.to_json()).unwrap(), c);
        }
        assert!(Call::parse(r#"{"op":"format_disk"}"#)
            .unwrap_err()
            .contains("format_disk"));
        assert!(Call::parse(r#"{"op":"points","limit":1,"x":2}"#)
            .unwrap_err()
            .contains('x'));
    }
}
