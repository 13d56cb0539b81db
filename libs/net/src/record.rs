//! The TLS 1.3 record layer of the replication hops, after rustls'
//! handshake (`docs/security.md`, "Why the record layer is Tidemark's").
//!
//! rustls makes and checks the handshake: certificates, revocation, the
//! key schedule. Once it is done, [`handshake`] takes the traffic keys
//! and sequence numbers from rustls (the secret extraction made for
//! kernel TLS; this kernel has no `tls` module) and the two halves of the
//! connection protect their records here, with ring's AEAD:
//! - [`RecordReader`] reads as much as the socket holds into one buffer
//!   and opens each record where it lies; the reader's caller copies the
//!   plaintext out once.
//! - [`RecordWriter`] seals up to [`OUT_CAP`] of records into one buffer
//!   and writes them with one system call.
//!
//! The format is RFC 8446 section 5: a 5-byte header (type 23, version
//! 3.3, length), the AEAD of (plaintext, content type, no padding) with
//! the header as additional data, the nonce the IV XOR the record's
//! sequence number. Anything else after the handshake (a handshake
//! message, an alert other than close_notify, a record that fails
//! authentication, a length out of range) ends the connection with an
//! error naming it, and nothing of that record is returned. Tidemark's
//! peers send no session tickets and no key updates: a connection ends
//! (and is made again) before a key has protected its limit of records.

use std::io;
use std::ops::Range;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_128_GCM, AES_256_GCM, CHACHA20_POLY1305};
use rustls::ConnectionTrafficSecrets;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;

/// The most plaintext one record carries (RFC 8446 5.1).
const MAX_PLAIN: usize = 1 << 14;
/// The longest protected record body allowed (RFC 8446 5.2).
const MAX_BODY: usize = MAX_PLAIN + 256;
const HEADER: usize = 5;
const TAG: usize = 16;
/// How many bytes the reader asks the socket for at once (at least).
const IN_CAP: usize = 256 << 10;
/// How many sealed bytes the writer holds before it waits for the socket.
pub const OUT_CAP: usize = 256 << 10;

const APPLICATION_DATA: u8 = 23;
const HANDSHAKE: u8 = 22;
const ALERT: u8 = 21;

fn bad(what: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what)
}

/// Drive rustls' handshake on `tcp` one whole record at a time, so that
/// nothing past the handshake is read, and write what rustls has to send
/// (its alert too, when the handshake fails). Returns when the handshake
/// is complete and sent.
pub async fn handshake(tcp: &mut TcpStream, conn: &mut rustls::Connection) -> io::Result<()> {
    async fn send(tcp: &mut TcpStream, conn: &mut rustls::Connection) -> io::Result<()> {
        while conn.wants_write() {
            let mut out = Vec::new();
            conn.write_tls(&mut out)?;
            tcp.write_all(&out).await?;
        }
        Ok(())
    }
    async fn feed(tcp: &mut TcpStream, conn: &mut rustls::Connection, mut bytes: &[u8]) -> io::Result<()> {
        while !bytes.is_empty() {
            conn.read_tls(&mut bytes)?;
        }
        if let Err(e) = conn.process_new_packets() {
            let _ = send(tcp, conn).await;
            return Err(bad(e.to_string()));
        }
        Ok(())
    }
    loop {
        send(tcp, conn).await?;
        if !conn.is_handshaking() {
            return Ok(());
        }
        // The header first, so that rustls refuses what is not TLS before
        // a body is waited for; then the body.
        let mut header = [0u8; HEADER];
        tcp.read_exact(&mut header).await?;
        feed(tcp, conn, &header).await?;
        let mut body = vec![0u8; usize::from(u16::from_be_bytes([header[3], header[4]]))];
        tcp.read_exact(&mut body).await?;
        feed(tcp, conn, &body).await?;
    }
}

/// One direction's key: the AEAD, the IV and the next record's sequence
/// number.
struct Keys {
    aead: LessSafeKey,
    iv: [u8; 12],
    seq: u64,
    /// How many records this key may protect (AES-GCM's confidentiality
    /// limit, RFC 8446 5.5).
    limit: u64,
}

impl Keys {
    fn new((seq, secrets): (u64, ConnectionTrafficSecrets)) -> io::Result<Self> {
        let (alg, key, iv, limit) = match &secrets {
            ConnectionTrafficSecrets::Aes128Gcm { key, iv } => (&AES_128_GCM, key, iv, 1 << 24),
            ConnectionTrafficSecrets::Aes256Gcm { key, iv } => (&AES_256_GCM, key, iv, 1 << 24),
            ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => (&CHACHA20_POLY1305, key, iv, u64::MAX),
            _ => {
                return Err(io::Error::other(
                    "the TLS cipher suite negotiated has no record layer here",
                ))
            }
        };
        let aead = UnboundKey::new(alg, key.as_ref())
            .map_err(|_| io::Error::other("a TLS traffic key of the wrong length"))?;
        let iv: [u8; 12] = iv
            .as_ref()
            .try_into()
            .map_err(|_| io::Error::other("a TLS IV of the wrong length"))?;
        Ok(Self {
            aead: LessSafeKey::new(aead),
            iv,
            seq,
            limit,
        })
    }

    /// The next record's nonce (its sequence number, then advanced).
    fn next_nonce(&mut self) -> io::Result<Nonce> {
        if self.seq >= self.limit {
            return Err(io::Error::other(
                "this connection's TLS key has protected its limit of records: the connection ends and is made again",
            ));
        }
        let mut n = self.iv;
        for (b, s) in n[4..].iter_mut().zip(self.seq.to_be_bytes()) {
            *b ^= s;
        }
        self.seq += 1;
        Ok(Nonce::assume_unique_for_key(n))
    }
}

/// Split an established connection into its reading and writing halves,
/// taking the traffic keys out of rustls. `conn`'s handshake must be
/// complete ([`handshake`]) with secret extraction enabled in its
/// configuration, and nothing may be left in it to read.
pub fn split(tcp: TcpStream, mut conn: rustls::Connection) -> io::Result<(RecordReader, RecordWriter)> {
    if io::Read::read(&mut conn.reader(), &mut [0u8; 1]).is_ok_and(|n| n > 0) {
        return Err(io::Error::other("data arrived inside the TLS handshake"));
    }
    let secrets = conn.dangerous_extract_secrets().map_err(io::Error::other)?;
    let (r, w) = tcp.into_split();
    Ok((
        RecordReader::new(r, Keys::new(secrets.rx)?),
        RecordWriter::new(w, Keys::new(secrets.tx)?),
    ))
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum ReadState {
    Open,
    /// The peer sent close_notify: end of stream.
    Closed,
    /// A record was refused: every read after fails.
    Failed,
}

/// The reading half of a TLS connection ([`split`]).
pub struct RecordReader {
    io: OwnedReadHalf,
    keys: Keys,
    buf: Box<[u8]>,
    /// `buf[start..end]`: bytes read and not yet opened.
    start: usize,
    end: usize,
    /// Opened plaintext not yet returned, within `buf`.
    plain: Range<usize>,
    state: ReadState,
    /// Why the connection failed, when a record was refused after
    /// plaintext was handed out in the same read (reported next).
    failure: Option<io::Error>,
}

impl RecordReader {
    fn new(io: OwnedReadHalf, keys: Keys) -> Self {
        Self {
            io,
            keys,
            buf: vec![0; IN_CAP + HEADER + MAX_BODY].into_boxed_slice(),
            start: 0,
            end: 0,
            plain: 0..0,
            state: ReadState::Open,
            failure: None,
        }
    }

    /// Open the next record if it is whole in the buffer. Ok(false): more
    /// bytes are needed.
    fn open_next(&mut self) -> io::Result<bool> {
        let avail = &mut self.buf[self.start..self.end];
        if avail.len() < HEADER {
            return Ok(false);
        }
        let len = usize::from(u16::from_be_bytes([avail[3], avail[4]]));
        if avail[0] != APPLICATION_DATA || avail[1] != 3 {
            return Err(bad(format!(
                "a TLS record of type {} version {}.{} after the handshake (not a protected record)",
                avail[0], avail[1], avail[2]
            )));
        }
        if !(TAG + 1..=MAX_BODY).contains(&len) {
            return Err(bad(format!("a TLS record of {len} bytes (at most {MAX_BODY})")));
        }
        if avail.len() < HEADER + len {
            return Ok(false);
        }
        let (header, body) = avail[..HEADER + len].split_at_mut(HEADER);
        let nonce = self.keys.next_nonce()?;
        let plain = self
            .keys
            .aead
            .open_in_place(nonce, Aad::from(&*header), body)
            .map_err(|_| bad("a TLS record failed authentication (altered in transit, or not from the peer)".into()))?;
        // The content type is the last byte that is not padding.
        let Some(at) = plain.iter().rposition(|&b| b != 0) else {
            return Err(bad("a TLS record without a content type".into()));
        };
        if at > MAX_PLAIN {
            return Err(bad(format!(
                "a TLS record of {at} bytes of plaintext (at most {MAX_PLAIN})"
            )));
        }
        let content = self.start + HEADER;
        self.start += HEADER + len;
        match plain[at] {
            APPLICATION_DATA => self.plain = content..content + at,
            ALERT if at == 2 && plain[1] == 0 => self.state = ReadState::Closed,
            ALERT if at == 2 => {
                return Err(bad(format!(
                    "the peer sent TLS alert {} and ended the connection",
                    plain[1]
                )))
            }
            HANDSHAKE => {
                return Err(bad(
                    "a TLS handshake message after the handshake (Tidemark's peers send no tickets or key updates)"
                        .into(),
                ))
            }
            t => return Err(bad(format!("a TLS record of content type {t} after the handshake"))),
        }
        Ok(true)
    }
}

impl AsyncRead for RecordReader {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, out: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let me = self.get_mut();
        loop {
            // Hand out opened plaintext, opening the records already read
            // while the caller has room.
            let mut gave = false;
            while !me.plain.is_empty() && out.remaining() > 0 {
                let n = me.plain.len().min(out.remaining());
                out.put_slice(&me.buf[me.plain.start..me.plain.start + n]);
                me.plain.start += n;
                gave = true;
                if me.plain.is_empty() && out.remaining() > 0 && me.state == ReadState::Open {
                    if let Err(e) = me.open_next() {
                        // This record's fault is reported on the next read.
                        me.state = ReadState::Failed;
                        me.failure = Some(e);
                    }
                }
            }
            if gave {
                return Poll::Ready(Ok(()));
            }
            if let Some(e) = me.failure.take() {
                return Poll::Ready(Err(e));
            }
            match me.state {
                ReadState::Open => {}
                ReadState::Closed => return Poll::Ready(Ok(())),
                ReadState::Failed => {
                    return Poll::Ready(Err(bad("this TLS connection already failed".into())));
                }
            }
            match me.open_next() {
                Ok(true) => continue,
                Ok(false) => {}
                Err(e) => {
                    me.state = ReadState::Failed;
                    return Poll::Ready(Err(e));
                }
            }
            // More bytes: keep room for at least a whole record after them.
            if me.start == me.end {
                me.start = 0;
                me.end = 0;
            } else if me.buf.len() - me.end < HEADER + MAX_BODY {
                me.buf.copy_within(me.start..me.end, 0);
                me.end -= me.start;
                me.start = 0;
            }
            let mut rb = ReadBuf::new(&mut me.buf[me.end..]);
            ready!(Pin::new(&mut me.io).poll_read(cx, &mut rb))?;
            let n = rb.filled().len();
            if n == 0 {
                me.state = ReadState::Failed;
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the peer closed the connection without a TLS close_notify",
                )));
            }
            me.end += n;
        }
    }
}

/// The writing half of a TLS connection ([`split`]).
pub struct RecordWriter {
    io: OwnedWriteHalf,
    keys: Keys,
    /// Sealed records; `out[..sent]` are written.
    out: Vec<u8>,
    sent: usize,
    closed: bool,
}

impl RecordWriter {
    fn new(io: OwnedWriteHalf, keys: Keys) -> Self {
        Self {
            io,
            keys,
            out: Vec::with_capacity(OUT_CAP + HEADER + MAX_BODY),
            sent: 0,
            closed: false,
        }
    }

    /// Seal `plain` (at most [`MAX_PLAIN`] bytes) as one record of
    /// content type `kind` at the end of `out`.
    fn seal(&mut self, plain: &[u8], kind: u8) -> io::Result<()> {
        let nonce = self.keys.next_nonce()?;
        let start = self.out.len();
        // At most MAX_PLAIN + 17 bytes: fits the header's 16 bits.
        let len = u16::try_from(plain.len() + 1 + TAG).map_err(|_| io::Error::other("a TLS record too long"))?;
        self.out.extend_from_slice(&[APPLICATION_DATA, 3, 3]);
        self.out.extend_from_slice(&len.to_be_bytes());
        self.out.extend_from_slice(plain);
        self.out.push(kind);
        let (header, body) = self.out[start..].split_at_mut(HEADER);
        let tag = self
            .keys
            .aead
            .seal_in_place_separate_tag(nonce, Aad::from(&*header), body)
            .map_err(|_| io::Error::other("TLS sealing failed"))?;
        self.out.extend_from_slice(tag.as_ref());
        Ok(())
    }

    /// Write sealed records until none is left (Ready) or the socket is
    /// full (Pending).
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.sent < self.out.len() {
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, &self.out[self.sent..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.sent += n;
        }
        self.out.clear();
        self.sent = 0;
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for RecordWriter {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        let me = self.get_mut();
        if me.closed {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "the TLS connection was shut down",
            )));
        }
        if me.poll_drain(cx)?.is_pending() && me.out.len() - me.sent >= OUT_CAP {
            return Poll::Pending;
        }
        if me.sent > 0 {
            me.out.drain(..me.sent);
            me.sent = 0;
        }
        let room = OUT_CAP.saturating_sub(me.out.len()).max(1);
        let take = data.len().min(room);
        for chunk in data[..take].chunks(MAX_PLAIN) {
            me.seal(chunk, APPLICATION_DATA)?;
        }
        // Send now what can go; the rest goes on the next write or flush.
        let _ = me.poll_drain(cx)?;
        Poll::Ready(Ok(take))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let me = self.get_mut();
        ready!(me.poll_drain(cx))?;
        Pin::new(&mut me.io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let me = self.get_mut();
        if !me.closed {
            // close_notify: a warning-level alert, description 0.
            me.seal(&[1, 0], ALERT)?;
            me.closed = true;
        }
        ready!(me.poll_drain(cx))?;
        Pin::new(&mut me.io).poll_shutdown(cx)
    }
}

/// Handshake on `tcp` with `conn` and split the connection, within
/// `timeout`.
pub async fn establish(
    mut tcp: TcpStream,
    mut conn: rustls::Connection,
    timeout: std::time::Duration,
) -> Result<
    (
        RecordReader,
        RecordWriter,
        Option<rustls::pki_types::CertificateDer<'static>>,
    ),
    EstablishError,
> {
    match tokio::time::timeout(timeout, handshake(&mut tcp, &mut conn)).await {
        Err(_) => return Err(EstablishError::Timeout),
        Ok(Err(e)) => return Err(EstablishError::Handshake(e)),
        Ok(Ok(())) => {}
    }
    let peer = conn
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| c.clone().into_owned());
    let (r, w) = split(tcp, conn).map_err(EstablishError::Handshake)?;
    Ok((r, w, peer))
}

/// Why [`establish`] failed.
#[derive(Debug)]
pub enum EstablishError {
    Timeout,
    Handshake(io::Error),
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
    use rustls::pki_types::ServerName;
    use tokio::net::TcpListener;

    use super::*;
    use crate::ca::{Ca, CA_KEY_FILE, CA_NAME_FILE, ISSUED_DIR};
    use crate::tls::{Identity, PeerRole, Tls, CA_FILE, CERT_FILE, KEY_FILE};

    /// A CA in `dir/ca` and an identity folder `dir/NAME` for each of
    /// `who`, loaded.
    fn identities(dir: &Path, who: &[(&str, PeerRole)]) -> Vec<Tls> {
        let cadir = dir.join("ca");
        std::fs::create_dir_all(cadir.join(ISSUED_DIR)).unwrap();
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::default();
        p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        p.distinguished_name.push(DnType::CommonName, "Tidemark CA test");
        p.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert = p.self_signed(&key).unwrap();
        crate::ca::write_new(&cadir.join(CA_KEY_FILE), key.serialize_pem().as_bytes(), 0o600).unwrap();
        std::fs::write(cadir.join(CA_NAME_FILE), "Tidemark CA test\n").unwrap();
        std::fs::write(cadir.join(CA_FILE), cert.pem()).unwrap();
        let ca = Ca::load(&cadir).unwrap();
        who.iter()
            .map(|(name, role)| {
                let out = dir.join(name);
                std::fs::create_dir_all(&out).unwrap();
                let key = KeyPair::generate().unwrap();
                let (pem, _) = ca.issue(&Identity::new(name, *role).unwrap(), &key, 3600).unwrap();
                crate::ca::write_new(&out.join(KEY_FILE), key.serialize_pem().as_bytes(), 0o600).unwrap();
                std::fs::write(out.join(CERT_FILE), pem).unwrap();
                std::fs::write(out.join(CA_FILE), cert.pem()).unwrap();
                Tls::load(&out).unwrap()
            })
            .collect()
    }

    /// Bytes of every length that matters to records: empty, one, a
    /// record's worth and one over, many records, odd sizes.
    fn messages() -> Vec<Vec<u8>> {
        let mut x = 0x1234_5678_u32;
        [1, MAX_PLAIN - 1, MAX_PLAIN, MAX_PLAIN + 1, 100_000, 3 << 20, 17]
            .iter()
            .map(|&n| {
                (0..n)
                    .map(|_| {
                        x ^= x << 13;
                        x ^= x >> 17;
                        x ^= x << 5;
                        x.to_le_bytes()[0]
                    })
                    .collect()
            })
            .collect()
    }

    /// Send each message over `w` and read it back from `r` (echoed by the
    /// other side).
    async fn round_trip<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(r: &mut R, w: &mut W) {
        for m in messages() {
            let (_, got) = tokio::join!(
                async {
                    w.write_all(&m).await.unwrap();
                    w.flush().await.unwrap();
                },
                async {
                    let mut got = vec![0; m.len()];
                    r.read_exact(&mut got).await.unwrap();
                    got
                }
            );
            assert!(got == m, "{} bytes came back altered", m.len());
        }
    }

    /// Echo what `r` reads to `w` until the peer's close_notify, then close.
    async fn echo<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(mut r: R, mut w: W) {
        let mut buf = vec![0; 70_000];
        loop {
            let n = r.read(&mut buf).await.unwrap();
            if n == 0 {
                break;
            }
            w.write_all(&buf[..n]).await.unwrap();
            w.flush().await.unwrap();
        }
        w.shutdown().await.unwrap();
    }

    // The record layer against rustls' own, in both roles: what one seals
    // the other opens, in both directions, and close_notify ends each.
    #[tokio::test]
    async fn records_interoperate_with_rustls() {
        let d = tempfile::tempdir().unwrap();
        let ids = identities(d.path(), &[("c1", PeerRole::Collector), ("a1", PeerRole::Agent)]);
        let (collector, agent) = (&ids[0], &ids[1]);

        // This layer listening, rustls (tokio-rustls) dialing.
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let server = async {
            let (tcp, _) = l.accept().await.unwrap();
            let c = collector.accept(tcp).await.unwrap();
            assert_eq!(c.peer.as_ref().map(|p| p.name.as_str()), Some("a1"));
            echo(c.reader, c.writer).await;
        };
        let client = async {
            let config = agent.client_config(PeerRole::Collector, None).unwrap();
            let tcp = TcpStream::connect(addr).await.unwrap();
            let s = tokio_rustls::TlsConnector::from(config)
                .connect(ServerName::try_from("collector.tidemark").unwrap(), tcp)
                .await
                .unwrap();
            let (mut r, mut w) = tokio::io::split(s);
            round_trip(&mut r, &mut w).await;
            w.shutdown().await.unwrap();
            assert_eq!(r.read(&mut [0; 8]).await.unwrap(), 0, "the echo's close_notify");
        };
        tokio::join!(server, client);

        // rustls listening, this layer dialing.
        let server = async {
            let (tcp, _) = l.accept().await.unwrap();
            let s = tokio_rustls::TlsAcceptor::from(collector.server_config())
                .accept(tcp)
                .await
                .unwrap();
            let (r, w) = tokio::io::split(s);
            echo(r, w).await;
        };
        let client = async {
            let tcp = TcpStream::connect(addr).await.unwrap();
            let mut c = agent.connect(tcp, PeerRole::Collector, Some("c1")).await.unwrap();
            round_trip(&mut c.reader, &mut c.writer).await;
            c.writer.shutdown().await.unwrap();
            assert_eq!(c.reader.read(&mut [0; 8]).await.unwrap(), 0, "the echo's close_notify");
        };
        tokio::join!(server, client);
    }

    /// A writer and a reader with one key, and the wire between them in
    /// the test's hands: (writer, the wire's far end, its near end, reader).
    async fn wire(limit: u64) -> (RecordWriter, TcpStream, TcpStream, RecordReader) {
        async fn pair() -> (TcpStream, TcpStream) {
            let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let a = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
            (a, l.accept().await.unwrap().0)
        }
        let keys = || Keys {
            aead: LessSafeKey::new(UnboundKey::new(&AES_128_GCM, &[7; 16]).unwrap()),
            iv: [9; 12],
            seq: 0,
            limit,
        };
        let (a, wire_out) = pair().await;
        let (wire_in, b) = pair().await;
        let w = RecordWriter::new(a.into_split().1, keys());
        let r = RecordReader::new(b.into_split().0, keys());
        (w, wire_out, wire_in, r)
    }

    /// Write `msgs` as records and return the bytes that went on the wire.
    async fn sealed(w: &mut RecordWriter, wire_out: &mut TcpStream, msgs: &[&[u8]]) -> Vec<u8> {
        for m in msgs {
            w.write_all(m).await.unwrap();
            w.flush().await.unwrap();
        }
        let want: usize = msgs
            .iter()
            .map(|m| m.len().div_ceil(MAX_PLAIN).max(1) * (HEADER + TAG + 1) + m.len())
            .sum();
        let mut got = vec![0; want];
        wire_out.read_exact(&mut got).await.unwrap();
        got
    }

    #[tokio::test]
    async fn records_altered_reordered_or_cut_are_refused_and_nothing_of_them_is_read() {
        // One byte flipped in the ciphertext of the second record.
        let (mut w, mut out, mut inn, mut r) = wire(u64::MAX).await;
        let mut bytes = sealed(&mut w, &mut out, &[b"first", b"second"]).await;
        let second = HEADER + 5 + 1 + TAG;
        bytes[second + HEADER + 2] ^= 1;
        inn.write_all(&bytes).await.unwrap();
        let mut buf = [0; 64];
        assert_eq!(r.read(&mut buf).await.unwrap(), 5);
        let e = r.read(&mut buf).await.unwrap_err();
        assert!(e.to_string().contains("failed authentication"), "{e}");
        assert!(r.read(&mut buf).await.is_err(), "a failed connection stays failed");

        // Two records swapped: the sequence numbers in the nonces differ.
        let (mut w, mut out, mut inn, mut r) = wire(u64::MAX).await;
        let bytes = sealed(&mut w, &mut out, &[b"aaaa", b"bbbb"]).await;
        let half = bytes.len() / 2;
        inn.write_all(&bytes[half..]).await.unwrap();
        inn.write_all(&bytes[..half]).await.unwrap();
        let e = r.read(&mut buf).await.unwrap_err();
        assert!(e.to_string().contains("failed authentication"), "{e}");

        // A header altered: it is the additional data, so it fails too.
        let (mut w, mut out, mut inn, mut r) = wire(u64::MAX).await;
        let mut bytes = sealed(&mut w, &mut out, &[b"xyz"]).await;
        bytes[2] = 1; // version 3.1
        inn.write_all(&bytes).await.unwrap();
        assert!(r.read(&mut buf).await.is_err());

        // Not a protected record, or one too long: named.
        let (_, _, mut inn, mut r) = wire(u64::MAX).await;
        inn.write_all(&[22, 3, 3, 0, 40]).await.unwrap();
        let e = r.read(&mut buf).await.unwrap_err();
        assert!(e.to_string().contains("type 22"), "{e}");
        let (_, _, mut inn, mut r) = wire(u64::MAX).await;
        inn.write_all(&[23, 3, 3, 0x48, 0x01]).await.unwrap();
        let e = r.read(&mut buf).await.unwrap_err();
        assert!(e.to_string().contains("18433 bytes"), "{e}");

        // Cut in the middle of a record: an error, not a short stream.
        let (mut w, mut out, mut inn, mut r) = wire(u64::MAX).await;
        let bytes = sealed(&mut w, &mut out, &[b"whole", b"cut short"]).await;
        inn.write_all(&bytes[..bytes.len() - 3]).await.unwrap();
        drop(inn);
        assert_eq!(r.read(&mut buf).await.unwrap(), 5);
        let e = r.read(&mut buf).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof, "{e}");

        // close_notify: the end of the stream; closed at a record boundary
        // without it: an error (a truncation the peer did not mean).
        let (mut w, mut out, mut inn, mut r) = wire(u64::MAX).await;
        let mut bytes = sealed(&mut w, &mut out, &[b"last"]).await;
        w.shutdown().await.unwrap();
        let mut rest = Vec::new();
        out.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest.len(), HEADER + 2 + 1 + TAG);
        bytes.extend_from_slice(&rest);
        inn.write_all(&bytes).await.unwrap();
        assert_eq!(r.read(&mut buf).await.unwrap(), 4);
        assert_eq!(r.read(&mut buf).await.unwrap(), 0);
        let (mut w, mut out, mut inn, mut r) = wire(u64::MAX).await;
        let bytes = sealed(&mut w, &mut out, &[b"last"]).await;
        inn.write_all(&bytes).await.unwrap();
        drop(inn);
        assert_eq!(r.read(&mut buf).await.unwrap(), 4);
        assert_eq!(r.read(&mut buf).await.unwrap_err().kind(), io::ErrorKind::UnexpectedEof);
    }

    #[tokio::test]
    async fn a_key_protects_no_more_records_than_its_limit() {
        let (mut w, _out, _inn, _r) = wire(2).await;
        w.write_all(&[1; MAX_PLAIN * 2]).await.unwrap();
        let e = w.write_all(b"one more").await.unwrap_err();
        assert!(e.to_string().contains("limit of records"), "{e}");
    }

    #[tokio::test]
    async fn a_plain_tcp_peer_is_refused_in_the_handshake() {
        let d = tempfile::tempdir().unwrap();
        let ids = identities(d.path(), &[("c1", PeerRole::Collector)]);
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut tcp = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (srv, _) = l.accept().await.unwrap();
        let accept = tokio::spawn(async move {
            let t = &ids[0];
            t.accept(srv).await.map(|_| ())
        });
        // A 16-byte frame header where a ClientHello belongs.
        tcp.write_all(&[0x54, 0x4d, 0, 1, 0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0])
            .await
            .unwrap();
        let e = accept.await.unwrap().unwrap_err();
        assert!(e.starts_with("TLS handshake"), "{e}");
    }
}
