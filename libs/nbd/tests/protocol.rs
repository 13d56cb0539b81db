//! The server against a raw client: handshake options, every command, bad
//! input of every kind. After each bad input another client must still be
//! served.

// Test code: lengths and offsets here are small constants.
#![allow(clippy::cast_possible_truncation)]

mod common;

use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use tidemark_nbd::{Backend, ExportInfo, MemBackend, ZeroFlags};

const SIZE: u64 = 16 << 20;
const MAX_PAYLOAD: u32 = 1 << 20;

fn mem_info() -> ExportInfo {
    let mut info = ExportInfo::new("mem", SIZE);
    info.description = "test disk".into();
    info.max_payload = MAX_PAYLOAD;
    info.multi_conn = true;
    info
}

fn mem_server() -> (Server, Arc<MemBackend>) {
    let backend = Arc::new(MemBackend::with_info(mem_info()));
    (Server::start(Arc::clone(&backend)), backend)
}

#[test]
fn garbage_instead_of_handshake_closes_only_that_connection() {
    let (srv, _) = mem_server();
    // Unknown client flags.
    let mut c = srv.connect();
    c.greeting();
    c.send(&0xdead_beefu32.to_be_bytes());
    c.expect_closed();
    // Valid flags, then garbage where an option should be.
    let mut c = srv.connect();
    c.start();
    c.send(&pattern(1024, 1));
    c.expect_closed();
    // Garbage without even reading the greeting.
    let mut c = srv.connect();
    let _ = c.try_send(&pattern(100_000, 2));
    c.expect_closed();
    // A client that connects and leaves.
    drop(srv.connect());
    srv.assert_healthy();
}

#[test]
fn unknown_options_get_unsup_and_negotiation_goes_on() {
    let (srv, _) = mem_server();
    let mut c = srv.connect();
    c.start();
    c.option(0x1234, b"hello");
    assert_eq!(c.option_replies()[0].0, REP_ERR_UNSUP);
    c.option(OPT_STARTTLS, &[]);
    assert_eq!(c.option_replies()[0].0, REP_ERR_UNSUP);
    c.option(OPT_LIST, b"x");
    assert_eq!(c.option_replies()[0].0, REP_ERR_INVALID, "LIST takes no data");
    c.option(OPT_GO, &[0, 0, 0, 9, b'a']);
    assert_eq!(c.option_replies()[0].0, REP_ERR_INVALID, "malformed GO");
    c.option(OPT_GO, &Raw::info_data("", &[]));
    let r = c.option_replies();
    assert_eq!(r.last().unwrap().0, REP_ACK);
    c.request(0, CMD_READ, 1, 0, 512, &[]);
    assert_eq!(c.simple_reply(), (0, 1));
    assert_eq!(c.read_n(512), vec![0u8; 512]);
    c.disconnect();
}

#[test]
fn oversized_option_gets_too_big_then_close() {
    let (srv, _) = mem_server();
    let mut c = srv.connect();
    c.start();
    let mut b = Vec::new();
    b.extend_from_slice(&IHAVEOPT.to_be_bytes());
    b.extend_from_slice(&OPT_INFO.to_be_bytes());
    b.extend_from_slice(&(1u32 << 30).to_be_bytes());
    c.send(&b);
    let (opt, typ, _) = c.option_reply();
    assert_eq!((opt, typ), (OPT_INFO, REP_ERR_TOO_BIG));
    c.expect_closed();
    srv.assert_healthy();
}

#[test]
fn unknown_export_names() {
    let (srv, _) = mem_server();
    let mut c = srv.connect();
    c.start();
    c.option(OPT_GO, &Raw::info_data("nope", &[]));
    let r = c.option_replies();
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].0, REP_ERR_UNKNOWN);
    assert!(String::from_utf8_lossy(&r[0].1).contains("nope"));
    c.option(OPT_INFO, &Raw::info_data("nope", &[]));
    assert_eq!(c.option_replies()[0].0, REP_ERR_UNKNOWN);
    // EXPORT_NAME cannot answer with an error: the server hangs up.
    c.option(OPT_EXPORT_NAME, b"nope");
    c.expect_closed();
    srv.assert_healthy();
}

#[test]
fn list_info_and_names() {
    let (srv, _) = mem_server();
    let mut c = srv.connect();
    c.start();
    c.option(OPT_LIST, &[]);
    let r = c.option_replies();
    assert_eq!(r.len(), 2);
    assert_eq!(r[0].0, REP_SERVER);
    assert_eq!(&r[0].1[..4], &3u32.to_be_bytes());
    assert_eq!(&r[0].1[4..7], b"mem");
    assert_eq!(r[1].0, REP_ACK);

    for name in ["mem", ""] {
        c.option(
            OPT_INFO,
            &Raw::info_data(name, &[INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE]),
        );
        let r = c.option_replies();
        assert_eq!(r.last().unwrap().0, REP_ACK);
        let infos: Vec<_> = r[..r.len() - 1]
            .iter()
            .map(|(t, d)| (*t, u16::from_be_bytes([d[0], d[1]]), &d[2..]))
            .collect();
        assert!(infos.iter().all(|(t, _, _)| *t == REP_INFO));
        let get = |k| {
            infos
                .iter()
                .find(|(_, t, _)| *t == k)
                .map(|(_, _, d)| d.to_vec())
                .unwrap()
        };
        let export = get(INFO_EXPORT);
        assert_eq!(u64::from_be_bytes(export[..8].try_into().unwrap()), SIZE);
        let bs = get(INFO_BLOCK_SIZE);
        assert_eq!(bs, [0, 0, 0, 1, 0, 0, 0x10, 0, 0, 0x10, 0, 0]);
        assert_eq!(get(INFO_NAME), b"mem");
        assert_eq!(get(INFO_DESCRIPTION), b"test disk");
    }
    c.option(OPT_ABORT, &[]);
    assert_eq!(c.option_replies(), vec![(REP_ACK, vec![])]);
    c.expect_closed();
}

#[test]
fn meta_contexts() {
    let (srv, _) = mem_server();
    let mut c = srv.connect();
    c.start();
    // SET needs structured replies first.
    c.option(OPT_SET_META_CONTEXT, &Raw::meta_data("", &["base:allocation"]));
    assert_eq!(c.option_replies()[0].0, REP_ERR_INVALID);
    // LIST with no query lists everything; with "base:" too; unknown namespaces are ignored.
    for q in [&[][..], &["base:"][..], &["base:allocation", "x-foo:bar"][..]] {
        c.option(OPT_LIST_META_CONTEXT, &Raw::meta_data("", q));
        let r = c.option_replies();
        assert_eq!(r.len(), 2, "{q:?}: {r:?}");
        assert_eq!(r[0].0, REP_META_CONTEXT);
        assert_eq!(&r[0].1[4..], b"base:allocation");
    }
    c.option(OPT_LIST_META_CONTEXT, &Raw::meta_data("", &["x-foo:bar"]));
    assert_eq!(c.option_replies(), vec![(REP_ACK, vec![])]);
    c.option(OPT_LIST_META_CONTEXT, &Raw::meta_data("nope", &[]));
    assert_eq!(c.option_replies()[0].0, REP_ERR_UNKNOWN);
    c.option(OPT_LIST_META_CONTEXT, &[0, 0, 0, 0, 0, 0, 0, 5]);
    assert_eq!(c.option_replies()[0].0, REP_ERR_INVALID);
    c.option(OPT_STRUCTURED_REPLY, &[]);
    assert_eq!(c.option_replies()[0].0, REP_ACK);
    // SET with only "base:" selects nothing.
    c.option(OPT_SET_META_CONTEXT, &Raw::meta_data("", &["base:"]));
    assert_eq!(c.option_replies(), vec![(REP_ACK, vec![])]);
    c.option(OPT_GO, &Raw::info_data("", &[]));
    assert_eq!(c.option_replies().last().unwrap().0, REP_ACK);
    // Nothing selected: BLOCK_STATUS is refused.
    c.request(0, CMD_BLOCK_STATUS, 9, 0, 4096, &[]);
    let ch = c.chunk();
    assert_eq!((ch.cookie, ch.error()), (9, EINVAL));
    c.disconnect();
}

#[test]
fn export_name_honours_no_zeroes() {
    let (srv, _) = mem_server();
    for (client_flags, zeroes) in [(1u32, 124usize), (3, 0)] {
        let mut c = srv.connect();
        c.greeting();
        c.send(&client_flags.to_be_bytes());
        c.option(OPT_EXPORT_NAME, b"mem");
        assert_eq!(c.u64(), SIZE);
        let flags = c.u16();
        assert_eq!(flags & 1, 1, "HAS_FLAGS");
        assert_eq!(c.read_n(zeroes), vec![0u8; zeroes]);
        // The next bytes must be a reply to our first request, not padding.
        c.request(0, CMD_READ, 5, 0, 16, &[]);
        assert_eq!(c.simple_reply(), (0, 5));
        assert_eq!(c.read_n(16), vec![0u8; 16]);
        c.disconnect();
    }
}

#[test]
fn transmission_flags_follow_export_info() {
    let (srv, _) = mem_server();
    let mut c = srv.connect();
    let (size, flags) = c.go(false, false, "mem");
    assert_eq!(size, SIZE);
    let want = 1 | T_SEND_FLUSH | T_SEND_FUA | T_SEND_TRIM | T_SEND_WRITE_ZEROES | (1 << 8) | (1 << 10) | (1 << 11);
    assert_eq!(flags, want, "{flags:#x}");
    c.disconnect();

    let mut info = mem_info();
    info.read_only = true;
    info.can_fua = false;
    info.multi_conn = false;
    let ro = Server::start(Arc::new(MemBackend::with_info(info)));
    let mut c = ro.connect();
    let (_, flags) = c.go(false, false, "");
    assert_eq!(flags & T_READ_ONLY, T_READ_ONLY);
    assert_eq!(
        flags & (T_SEND_FUA | T_SEND_TRIM | T_SEND_WRITE_ZEROES | (1 << 8)),
        0,
        "{flags:#x}"
    );
    for (typ, payload) in [
        (CMD_WRITE, vec![1u8; 512]),
        (CMD_TRIM, vec![]),
        (CMD_WRITE_ZEROES, vec![]),
    ] {
        c.request(0, typ, 7, 0, 512, &payload);
        assert_eq!(c.simple_reply(), (EPERM, 7), "command {typ}");
    }
    c.request(0, CMD_READ, 8, 0, 512, &[]);
    assert_eq!(c.simple_reply(), (0, 8));
    c.read_n(512);
    c.disconnect();
}

#[test]
fn all_commands_work_with_simple_and_structured_replies() {
    let (srv, backend) = mem_server();
    for structured in [false, true] {
        let mut c = srv.connect();
        c.go(structured, structured, "mem");
        let data = pattern(64 << 10, 3);
        c.request(FLAG_FUA, CMD_WRITE, 1, 1 << 20, data.len() as u32, &data);
        assert_eq!(c.simple_reply(), (0, 1));
        c.request(0, CMD_READ, 2, 1 << 20, data.len() as u32, &[]);
        if structured {
            let ch = c.chunk();
            assert_eq!((ch.typ, ch.flags & 1, ch.cookie), (TYPE_OFFSET_DATA, 1, 2));
            assert_eq!(u64::from_be_bytes(ch.payload[..8].try_into().unwrap()), 1 << 20);
            assert_eq!(&ch.payload[8..], &data[..]);
        } else {
            assert_eq!(c.simple_reply(), (0, 2));
            assert_eq!(c.read_n(data.len()), data);
        }
        let flushes = backend.flush_count();
        c.request(0, CMD_FLUSH, 3, 0, 0, &[]);
        assert_eq!(c.simple_reply(), (0, 3));
        assert_eq!(backend.flush_count(), flushes + 1);
        c.request(0, CMD_TRIM, 4, 1 << 20, 4096, &[]);
        assert_eq!(c.simple_reply(), (0, 4));
        c.request(
            FLAG_NO_HOLE | FLAG_FUA | FLAG_FAST_ZERO,
            CMD_WRITE_ZEROES,
            5,
            (1 << 20) + 4096,
            4096,
            &[],
        );
        assert_eq!(c.simple_reply(), (0, 5));
        c.request(0, CMD_CACHE, 6, 0, 1 << 20, &[]);
        assert_eq!(c.simple_reply(), (0, 6));
        // TRIM and WRITE_ZEROES of any length inside the export, far beyond max_payload.
        c.request(0, CMD_WRITE_ZEROES, 7, 0, 8 << 20, &[]);
        assert_eq!(c.simple_reply(), (0, 7));
        c.request(0, CMD_TRIM, 8, 0, SIZE as u32, &[]);
        assert_eq!(c.simple_reply(), (0, 8));
        if structured {
            for (flags, cookie) in [(0u16, 9u64), (FLAG_REQ_ONE, 10)] {
                c.request(flags, CMD_BLOCK_STATUS, cookie, 4096, 1 << 20, &[]);
                let ch = c.chunk();
                assert_eq!((ch.typ, ch.flags & 1, ch.cookie), (TYPE_BLOCK_STATUS, 1, cookie));
                assert_eq!(ch.payload.len(), 12, "MemBackend reports one extent");
                assert_eq!(
                    u32::from_be_bytes(ch.payload[0..4].try_into().unwrap()),
                    1,
                    "context id from SET"
                );
                assert_eq!(u32::from_be_bytes(ch.payload[4..8].try_into().unwrap()), 1 << 20);
            }
        }
        c.disconnect();
        assert!(backend.snapshot().iter().all(|&b| b == 0));
    }
}

#[test]
fn invalid_requests_get_errors_and_the_connection_goes_on() {
    let (srv, backend) = mem_server();
    for structured in [false, true] {
        let mut c = srv.connect();
        c.go(structured, false, "");
        let check = |c: &mut Raw, flags, typ, offset, len, payload: &[u8], want: u32| {
            c.request(flags, typ, 77, offset, len, payload);
            let (err, cookie) = c.any_reply();
            assert_eq!(
                (err, cookie),
                (want, 77),
                "flags {flags:#x} command {typ} offset {offset} len {len}"
            );
        };
        check(&mut c, 0, 42, 0, 0, &[], EINVAL); // unknown command
        check(&mut c, 1 << 9, CMD_READ, 0, 512, &[], EINVAL); // unknown flag
        check(&mut c, FLAG_DF, CMD_READ, 0, 512, &[], EINVAL); // DF not offered
        check(&mut c, FLAG_REQ_ONE, CMD_WRITE, 0, 512, &[9u8; 512], EINVAL); // flag of another command
        check(&mut c, 0, CMD_READ, SIZE, 1, &[], EINVAL);
        check(&mut c, 0, CMD_READ, u64::MAX - 10, 512, &[], EINVAL);
        check(&mut c, 0, CMD_TRIM, SIZE - 512, 1024, &[], EINVAL);
        check(&mut c, 0, CMD_CACHE, SIZE, 1, &[], EINVAL);
        check(&mut c, 0, CMD_WRITE, SIZE - 256, 512, &[9u8; 512], ENOSPC);
        check(&mut c, 0, CMD_WRITE_ZEROES, SIZE, 1, &[], ENOSPC);
        check(&mut c, 0, CMD_FLUSH, 4096, 0, &[], EINVAL);
        check(&mut c, 0, CMD_BLOCK_STATUS, 0, 512, &[], EINVAL); // no context negotiated
        check(&mut c, 0, CMD_READ, 0, MAX_PAYLOAD + 1, &[], EINVAL);
        // Over max_payload but small enough to skip: the payload is consumed.
        check(
            &mut c,
            0,
            CMD_WRITE,
            0,
            2 * MAX_PAYLOAD,
            &vec![9u8; 2 * MAX_PAYLOAD as usize],
            EINVAL,
        );
        // Zero lengths succeed without touching anything.
        check(&mut c, 0, CMD_WRITE, 0, 0, &[], 0);
        check(&mut c, 0, CMD_TRIM, 0, 0, &[], 0);
        c.request(0, CMD_READ, 78, 4096, 0, &[]);
        if structured {
            let ch = c.chunk();
            assert_eq!((ch.typ, ch.flags, ch.cookie, ch.payload.len()), (TYPE_NONE, 1, 78, 0));
        } else {
            assert_eq!(c.simple_reply(), (0, 78));
        }
        // Structured errors carry a message for humans.
        if structured {
            c.request(0, CMD_READ, 79, SIZE, 512, &[]);
            let ch = c.chunk();
            assert_eq!(ch.error(), EINVAL);
            assert!(
                ch.error_message().contains("end of the export"),
                "{}",
                ch.error_message()
            );
        }
        // Still fine.
        c.request(0, CMD_READ, 80, 0, 4096, &[]);
        assert_eq!(c.any_reply(), (0, 80));
        if !structured {
            c.read_n(4096);
        }
        c.disconnect();
    }
    assert!(
        backend.snapshot().iter().all(|&b| b == 0),
        "no rejected write reached the disk"
    );
    srv.assert_healthy();
}

#[test]
fn huge_write_is_answered_then_the_connection_closes() {
    let (srv, _) = mem_server();
    let mut c = srv.connect();
    c.go(false, false, "");
    // A 1 GiB write header: too big to skip; EINVAL, then the server hangs up.
    c.request(0, CMD_WRITE, 5, 0, 1 << 30, &[]);
    assert_eq!(c.simple_reply(), (EINVAL, 5));
    c.expect_closed();
    srv.assert_healthy();
}

#[test]
fn bad_request_magic_closes_connection() {
    let (srv, _) = mem_server();
    let mut c = srv.connect();
    c.go(true, false, "");
    c.send(&pattern(28, 9));
    c.expect_closed();
    srv.assert_healthy();
}

#[test]
fn client_vanishing_mid_request() {
    let (srv, backend) = mem_server();
    // Mid header.
    let mut c = srv.connect();
    c.go(false, false, "");
    c.send(&REQUEST_MAGIC.to_be_bytes());
    drop(c);
    // Mid payload, right after a complete write that must still land.
    let mut c = srv.connect();
    c.go(false, false, "");
    c.request(0, CMD_WRITE, 1, 0, 4096, &[0x5a; 4096]);
    let mut b = Vec::new();
    b.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
    b.extend_from_slice(&0u16.to_be_bytes());
    b.extend_from_slice(&CMD_WRITE.to_be_bytes());
    b.extend_from_slice(&2u64.to_be_bytes());
    b.extend_from_slice(&4096u64.to_be_bytes());
    b.extend_from_slice(&4096u32.to_be_bytes());
    b.extend_from_slice(&[0x77; 100]);
    c.send(&b);
    drop(c);
    // Mid handshake.
    let mut c = srv.connect();
    c.start();
    c.send(&IHAVEOPT.to_be_bytes()[..5]);
    drop(c);

    let deadline = Instant::now() + STEP;
    while backend.snapshot()[..4096] != [0x5a; 4096][..] {
        assert!(
            Instant::now() < deadline,
            "the complete write before the disconnect was lost"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(
        backend.snapshot()[4096..8192].iter().all(|&b| b == 0),
        "partial write must not be applied"
    );
    srv.assert_healthy();
}

#[test]
fn minimum_block_size_is_enforced() {
    let mut info = mem_info();
    info.min_block = 512;
    let srv = Server::start(Arc::new(MemBackend::with_info(info)));
    let mut c = srv.connect();
    c.go(false, false, "");
    c.request(0, CMD_READ, 1, 100, 512, &[]);
    assert_eq!(c.simple_reply(), (EINVAL, 1));
    c.request(0, CMD_WRITE, 2, 0, 100, &[1u8; 100]);
    assert_eq!(c.simple_reply(), (EINVAL, 2));
    c.request(0, CMD_READ, 3, 512, 512, &[]);
    assert_eq!(c.simple_reply(), (0, 3));
    c.read_n(512);
    c.disconnect();
}

/// Wraps MemBackend, delaying operations at chosen offsets and failing others.
struct Slow {
    inner: MemBackend,
    delay_at: u64,
    fail_at: u64,
}

impl Backend for Slow {
    fn info(&self) -> ExportInfo {
        self.inner.info()
    }
    async fn read(&self, offset: u64, len: u32, buf: Vec<u8>) -> io::Result<Vec<u8>> {
        if offset == self.delay_at {
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        if offset == self.fail_at {
            return Err(io::Error::from_raw_os_error(libc::ENOSPC));
        }
        self.inner.read(offset, len, buf).await
    }
    async fn write(&self, offset: u64, data: Vec<u8>, fua: bool) -> io::Result<()> {
        if offset == self.delay_at {
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        if offset == self.fail_at {
            return Err(io::Error::from_raw_os_error(libc::ENOSPC));
        }
        self.inner.write(offset, data, fua).await
    }
    async fn flush(&self) -> io::Result<()> {
        self.inner.flush().await
    }
    async fn trim(&self, offset: u64, len: u64, fua: bool) -> io::Result<()> {
        self.inner.trim(offset, len, fua).await
    }
    async fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> io::Result<()> {
        if offset == self.fail_at {
            return Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP));
        }
        self.inner.write_zeroes(offset, len, flags).await
    }
}

fn slow_server() -> (Server, Arc<Slow>) {
    let backend = Arc::new(Slow {
        inner: MemBackend::with_info(mem_info()),
        delay_at: 0,
        fail_at: 1 << 20,
    });
    (Server::start(Arc::clone(&backend)), backend)
}

#[test]
fn requests_run_concurrently_and_replies_come_out_of_order() {
    let (srv, _) = slow_server();
    let mut c = srv.connect();
    c.go(true, false, "");
    c.request(0, CMD_READ, 1, 0, 4096, &[]); // slow
    c.request(0, CMD_READ, 2, 8192, 4096, &[]); // fast
    c.request(0, CMD_WRITE, 3, 16384, 4096, &[1u8; 4096]); // fast
    let first = c.any_reply();
    let second = c.any_reply();
    let third = c.any_reply();
    assert_eq!(
        [first.1, second.1]
            .iter()
            .copied()
            .collect::<std::collections::BTreeSet<_>>(),
        [2, 3].into()
    );
    assert_eq!(third, (0, 1), "the slow read is answered last");
    c.disconnect();
}

#[test]
fn backend_errors_are_mapped() {
    let (srv, _) = slow_server();
    for structured in [false, true] {
        let mut c = srv.connect();
        c.go(structured, false, "");
        c.request(0, CMD_READ, 1, 1 << 20, 4096, &[]);
        if structured {
            let ch = c.chunk();
            assert_eq!(ch.error(), ENOSPC);
            assert!(!ch.error_message().is_empty());
        } else {
            // A failed simple READ carries no data: the next reply follows directly.
            assert_eq!(c.simple_reply(), (ENOSPC, 1));
        }
        c.request(0, CMD_WRITE, 2, 1 << 20, 512, &[1u8; 512]);
        assert_eq!(c.any_reply(), (ENOSPC, 2));
        c.request(FLAG_FAST_ZERO, CMD_WRITE_ZEROES, 3, 1 << 20, 512, &[]);
        assert_eq!(c.any_reply(), (95, 3), "ENOTSUP");
        c.request(0, CMD_READ, 4, 0, 512, &[]);
        assert_eq!(c.any_reply(), (0, 4));
        if !structured {
            c.read_n(512);
        }
        c.disconnect();
    }
}

#[test]
fn shutdown_answers_inflight_requests_then_closes() {
    let (mut srv, backend) = slow_server();
    let mut c = srv.connect();
    c.go(false, false, "");
    // An idle second client must not hold shutdown up.
    let mut idle = srv.connect();
    idle.go(false, false, "");
    // And one stuck in the handshake.
    let mut hs = srv.connect();
    hs.start();
    c.request(0, CMD_WRITE, 1, 0, 4096, &[0x42; 4096]); // takes 300 ms
    std::thread::sleep(Duration::from_millis(100));
    let token = srv.shutdown_token();
    let waiter = std::thread::spawn(move || {
        let mut c = c;
        let r = c.simple_reply();
        c.expect_closed();
        r
    });
    std::thread::sleep(Duration::from_millis(20));
    token.cancel();
    let took = srv.stop();
    assert!(took < Duration::from_secs(5), "shutdown took {took:?}");
    assert_eq!(waiter.join().unwrap(), (0, 1), "in-flight write answered before close");
    assert!(backend.inner.snapshot()[..4096].iter().all(|&b| b == 0x42));
    idle.expect_closed();
    hs.expect_closed();
}

#[test]
fn many_clients_at_once() {
    let (srv, backend) = mem_server();
    let sock = srv.sock.clone();
    let threads: Vec<_> = (0..8u64)
        .map(|t| {
            let sock = sock.clone();
            std::thread::spawn(move || {
                let mut c = Raw::connect(&sock);
                c.go(t % 2 == 0, false, "");
                let base = t * (1 << 20);
                // Pipeline 32 writes, then read everything back.
                for i in 0..32u64 {
                    c.request(0, CMD_WRITE, i, base + i * 4096, 4096, &pattern(4096, t * 100 + i));
                }
                let mut seen: Vec<u64> = (0..32)
                    .map(|_| c.simple_reply())
                    .map(|(e, k)| {
                        assert_eq!(e, 0);
                        k
                    })
                    .collect();
                seen.sort();
                assert_eq!(seen, (0..32).collect::<Vec<_>>());
                c.disconnect();
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let disk = backend.snapshot();
    for t in 0..8u64 {
        for i in 0..32u64 {
            let at = (t * (1 << 20) + i * 4096) as usize;
            assert_eq!(&disk[at..at + 4096], &pattern(4096, t * 100 + i)[..]);
        }
    }
}

#[test]
fn fuzz_entry_point_survives_garbage_and_real_sessions() {
    tidemark_nbd::fuzz_session(&[]);
    tidemark_nbd::fuzz_session(&pattern(10_000, 5));
    // A valid handshake followed by random requests reaches the transmission phase.
    let mut s = Vec::new();
    s.extend_from_slice(&3u32.to_be_bytes());
    s.extend_from_slice(&IHAVEOPT.to_be_bytes());
    s.extend_from_slice(&OPT_STRUCTURED_REPLY.to_be_bytes());
    s.extend_from_slice(&0u32.to_be_bytes());
    let go = Raw::info_data("", &[]);
    s.extend_from_slice(&IHAVEOPT.to_be_bytes());
    s.extend_from_slice(&OPT_GO.to_be_bytes());
    s.extend_from_slice(&(go.len() as u32).to_be_bytes());
    s.extend_from_slice(&go);
    for i in 0..50u64 {
        s.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        s.extend_from_slice(&((i % 3) as u16).to_be_bytes());
        s.extend_from_slice(&((i % 9) as u16).to_be_bytes());
        s.extend_from_slice(&i.to_be_bytes());
        s.extend_from_slice(&(i * 4096).to_be_bytes());
        s.extend_from_slice(&4096u32.to_be_bytes());
        if i % 9 == 1 {
            s.extend_from_slice(&pattern(4096, i));
        }
    }
    tidemark_nbd::fuzz_session(&s);
    for cut in [5, 30, 100, 1000, s.len() - 3] {
        tidemark_nbd::fuzz_session(&s[..cut]);
    }
}

#[test]
fn shutdown_is_not_held_up_by_a_stalled_client() {
    let (mut srv, backend) = mem_server();
    // Stalls in the middle of a write payload.
    let mut c = srv.connect();
    c.go(false, false, "");
    let mut b = Vec::new();
    b.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
    b.extend_from_slice(&0u16.to_be_bytes());
    b.extend_from_slice(&CMD_WRITE.to_be_bytes());
    b.extend_from_slice(&1u64.to_be_bytes());
    b.extend_from_slice(&0u64.to_be_bytes());
    b.extend_from_slice(&8192u32.to_be_bytes());
    b.extend_from_slice(&[0x33; 100]);
    c.send(&b);
    // Stalls in the middle of an option.
    let mut h = srv.connect();
    h.start();
    h.send(&IHAVEOPT.to_be_bytes());
    std::thread::sleep(Duration::from_millis(100));
    let took = srv.stop();
    assert!(took < Duration::from_secs(9), "shutdown took {took:?}");
    c.expect_closed();
    h.expect_closed();
    assert!(
        backend.snapshot()[..8192].iter().all(|&x| x == 0),
        "the incomplete write must not land"
    );
}

/// Records the order in which write calls start.
struct Recorder {
    inner: MemBackend,
    order: std::sync::Mutex<Vec<u64>>,
}

impl Backend for Recorder {
    fn info(&self) -> ExportInfo {
        self.inner.info()
    }
    async fn read(&self, offset: u64, len: u32, buf: Vec<u8>) -> io::Result<Vec<u8>> {
        self.inner.read(offset, len, buf).await
    }
    async fn write(&self, offset: u64, data: Vec<u8>, fua: bool) -> io::Result<()> {
        self.order.lock().unwrap().push(offset);
        // Finish in a scrambled order, so replies go out of order.
        tokio::time::sleep(Duration::from_micros((offset / 4096 * 7919) % 2000)).await;
        self.inner.write(offset, data, fua).await
    }
    async fn flush(&self) -> io::Result<()> {
        Ok(())
    }
    async fn trim(&self, offset: u64, len: u64, fua: bool) -> io::Result<()> {
        self.inner.trim(offset, len, fua).await
    }
    async fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> io::Result<()> {
        self.inner.write_zeroes(offset, len, flags).await
    }
}

#[test]
fn backend_calls_start_in_request_order() {
    let backend = Arc::new(Recorder {
        inner: MemBackend::with_info(mem_info()),
        order: Default::default(),
    });
    let srv = Server::start(Arc::clone(&backend));
    let mut c = srv.connect();
    c.go(false, false, "");
    let offsets: Vec<u64> = (0..100u64).map(|i| ((i * 37) % 100) * 4096).collect();
    for (i, off) in offsets.iter().enumerate() {
        c.request(0, CMD_WRITE, i as u64, *off, 4096, &[i as u8; 4096]);
    }
    let mut cookies: Vec<u64> = (0..100)
        .map(|_| c.simple_reply())
        .map(|(e, k)| {
            assert_eq!(e, 0);
            k
        })
        .collect();
    c.disconnect();
    assert_eq!(*backend.order.lock().unwrap(), offsets);
    let in_order = cookies.windows(2).all(|w| w[0] < w[1]);
    cookies.sort();
    assert_eq!(cookies, (0..100).collect::<Vec<_>>());
    // Not a requirement, but shows that replies really can overtake each other.
    if in_order {
        eprintln!("note: all replies happened to arrive in order");
    }
}
