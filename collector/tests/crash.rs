//! The `tidemark-collector` binary under failpoints: a crash right before
//! the ack loses nothing that was spooled, and a panic kills the process.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tidemark_wire::frame::{Frame, FrameHeader, Hello, Lineage, Role, FRAME_HEADER_LEN, PROTOCOL_VERSION};
use tidemark_wire::{Record, RecordHeader, RecordKind};

fn free_port() -> String {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().to_string()
}

fn spawn(spool: &std::path::Path, listen: &str, failpoints: Option<&str>) -> Child {
    let token = spool.parent().unwrap().join("token");
    std::fs::write(&token, "  tok\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600)).unwrap();
    let mut c = Command::new(env!("CARGO_BIN_EXE_tidemark-collector"));
    c.args(["--listen", listen, "--target", &free_port(), "--api", &free_port()])
        .arg("--spool")
        .arg(spool)
        .arg("--token-file")
        .arg(&token)
        // This test speaks frames itself.
        .arg("--insecure-plaintext")
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    match failpoints {
        Some(f) => c.env("FAILPOINTS", f),
        None => c.env_remove("FAILPOINTS"),
    };
    c.spawn().unwrap()
}

fn connect(listen: &str) -> TcpStream {
    let t0 = Instant::now();
    loop {
        match TcpStream::connect(listen) {
            Ok(s) => {
                s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                return s;
            }
            Err(_) if t0.elapsed() < Duration::from_secs(20) => std::thread::sleep(Duration::from_millis(50)),
            Err(e) => panic!("collector not listening: {e}"),
        }
    }
}

fn send(s: &mut TcpStream, f: &Frame) {
    s.write_all(&f.encode().unwrap()).unwrap();
}

fn recv(s: &mut TcpStream) -> Option<Frame> {
    let mut hb = [0u8; FRAME_HEADER_LEN];
    s.read_exact(&mut hb).ok()?;
    let h = FrameHeader::parse(&hb).unwrap();
    let mut buf = vec![0u8; h.frame_len()];
    buf[..FRAME_HEADER_LEN].copy_from_slice(&hb);
    s.read_exact(&mut buf[FRAME_HEADER_LEN..]).unwrap();
    Some(Frame::decode(&buf).unwrap().0)
}

fn hello() -> Frame {
    Frame::Hello(Hello {
        protocol: PROTOCOL_VERSION,
        role: Role::Agent,
        flags: 0,
        disk_uuid: [2; 16],
        disk_size: 1 << 20,
        disk_id: "vm1".parse().unwrap(),
        token: b"tok".to_vec(),
        lineage: Lineage {
            generation: [3; 16],
            ..Lineage::default()
        },
    })
}

fn batch(first: u64, last: u64) -> Frame {
    Frame::Batch(
        (first..=last)
            .map(|seq| {
                let data = vec![u8::try_from(seq % 200).unwrap(); 4096];
                Record {
                    header: RecordHeader::new(RecordKind::Write, seq, seq, 0, 4096, &data),
                    payload: data,
                }
            })
            .collect(),
    )
}

fn welcome_seq(s: &mut TcpStream) -> u64 {
    match recv(s) {
        Some(Frame::Welcome { acked_seq, .. }) => acked_seq,
        other => panic!("expected welcome, got {other:?}"),
    }
}

fn wait_exit(c: &mut Child) -> std::process::ExitStatus {
    let t0 = Instant::now();
    loop {
        if let Some(st) = c.try_wait().unwrap() {
            return st;
        }
        assert!(t0.elapsed() < Duration::from_secs(20), "collector did not exit");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn crash_before_ack_keeps_the_spooled_batch_and_panics_abort() {
    let d = tempfile::tempdir().unwrap();
    let spool = d.path().join("spool");
    let listen = free_port();

    // The second batch's ack is never sent: the process exits first.
    let mut c = spawn(&spool, &listen, Some("collector-before-ack=1*off->return(42)"));
    let mut s = connect(&listen);
    send(&mut s, &hello());
    assert_eq!(welcome_seq(&mut s), 0);
    send(&mut s, &batch(1, 2));
    assert_eq!(recv(&mut s), Some(Frame::Ack { seq: 2 }));
    send(&mut s, &batch(3, 5));
    assert_eq!(recv(&mut s), None, "no ack: the process died");
    assert_eq!(wait_exit(&mut c).code(), Some(42));

    // The batch was durable before the ack would have gone out.
    let mut c = spawn(&spool, &listen, Some("collector-spool-before-fsync=panic"));
    let mut s = connect(&listen);
    send(&mut s, &hello());
    assert_eq!(welcome_seq(&mut s), 5);
    // A panic in a failpoint aborts the process (no unwinding, no ack).
    send(&mut s, &batch(6, 6));
    assert_eq!(recv(&mut s), None);
    let st = wait_exit(&mut c);
    assert!(!st.success());
    assert_eq!(st.code(), None, "killed by SIGABRT: {st:?}");

    // The torn temp file of seq 6 is gone at the next start; 6 was never acked.
    let mut c = spawn(&spool, &listen, None);
    let mut s = connect(&listen);
    send(&mut s, &hello());
    assert_eq!(welcome_seq(&mut s), 5);
    let names: Vec<String> = std::fs::read_dir(spool.join("vm1"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert!(names.iter().all(|n| !n.ends_with(".tmp")), "{names:?}");
    // SIGTERM stops it cleanly.
    nix_kill(c.id());
    assert!(wait_exit(&mut c).success());
}

fn nix_kill(pid: u32) {
    let st = Command::new("kill").arg("-TERM").arg(pid.to_string()).status().unwrap();
    assert!(st.success());
}
