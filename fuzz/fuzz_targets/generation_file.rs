//! The generations file (`tidemark_formats::generation`): `data` is the
//! file's bytes. Nothing may panic; a file that decodes is canonical (it
//! encodes back to the same bytes), and relating a history to itself, to
//! its own fork and to its own parent gives the answers the model says.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use tidemark_formats::generation::{relate, GenerationId, History, Position, Relation};

fuzz_target!(|data: &[u8]| {
    let Ok(h) = History::decode(data, Path::new("generations")) else {
        return;
    };
    assert_eq!(h.encode(), data, "a decoded file encodes back to the same bytes");
    let seq = h.current().fork_seq.wrapping_add(7);
    let pos = |history, seq| Position { history, seq };
    assert_eq!(relate(pos(&h, seq), pos(&h, seq)), Relation::Equal);
    // A fork of it at `seq`: the original at that seq is behind it, one
    // seq further has diverged.
    let mut id = h.current().id.0;
    id[0] = id[0].wrapping_add(1) | 1;
    if h.entries().iter().any(|e| e.id.0 == id) {
        return;
    }
    let Ok(f) = h.fork(GenerationId(id), seq, 0) else {
        return;
    };
    assert_eq!(relate(pos(&h, seq), pos(&f, 0)), Relation::Behind { from: seq });
    if let Some(next) = seq.checked_add(1) {
        assert_eq!(
            relate(pos(&h, next), pos(&f, 0)),
            Relation::Diverged {
                common: h.current().id,
                at: seq
            }
        );
    }
});
