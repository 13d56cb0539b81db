//! The fixed newstyle handshake: greeting, client flags and option haggling
//! up to NBD_OPT_GO / NBD_OPT_EXPORT_NAME.
//!
//! ```text
//! S: "NBDMAGIC" "IHAVEOPT" u16 handshake flags (FIXED_NEWSTYLE | NO_ZEROES)
//! C: u32 client flags
//! repeat:
//!   C: "IHAVEOPT" u32 option u32 length [length bytes]
//!   S: u64 0x3e889045565a9 u32 option u32 reply-type u32 length [data]  (one or more)
//! ```
//!
//! Every option length is bounded before anything is allocated, and so is the
//! number of options; nothing a client sends here can make the server panic.

use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::proto::*;
use crate::{Error, ExportInfo};

/// Largest option payload we accept; real clients send a few hundred bytes.
pub(crate) const MAX_OPTION_LEN: u32 = 64 << 10;
/// Options per connection before we decide the client is wasting our time.
const MAX_OPTIONS: usize = 4096;

/// Runs the handshake. `Ok(Some(params))` means the transmission phase
/// starts; `Ok(None)` that the client aborted (or the server is shutting
/// down) and the connection should close quietly.
pub(crate) async fn negotiate<R, W>(
    r: &mut R,
    w: &mut W,
    info: &ExportInfo,
    shutdown: &CancellationToken,
) -> Result<Option<Params>, Error>
where
    R: AsyncBufRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let (mut params, warnings) = Params::from_info(info);
    for w in warnings {
        warn!(export = %info.name, "export misconfigured: {w}");
    }

    let mut out = Vec::with_capacity(512);
    out.extend_from_slice(&NBDMAGIC.to_be_bytes());
    out.extend_from_slice(&IHAVEOPT.to_be_bytes());
    out.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    send(w, &out).await?;

    let mut b4 = [0u8; 4];
    r.read_exact(&mut b4)
        .await
        .map_err(|e| Error::io("reading client flags", e))?;
    let cflags = u32::from_be_bytes(b4);
    if cflags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
        return Err(Error::protocol(format!("unknown client flags {cflags:#x}")));
    }
    let no_zeroes = cflags & FLAG_C_NO_ZEROES != 0;

    for _ in 0..MAX_OPTIONS {
        // Wait for the next option, giving up quietly on shutdown.
        let more = tokio::select! {
            biased;
            _ = shutdown.cancelled() => return Ok(None),
            res = r.fill_buf() => !res.map_err(|e| Error::io("waiting for an option", e))?.is_empty(),
        };
        if !more {
            return Err(Error::Disconnected {
                during: "option haggling",
            });
        }
        let mut hdr = [0u8; 16];
        r.read_exact(&mut hdr)
            .await
            .map_err(|e| Error::io("reading an option header", e))?;
        let (magic, rest) = hdr.split_at(8);
        let magic = u64::from_be_bytes(magic.try_into().unwrap_or([0; 8]));
        let opt = u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]);
        let len = u32::from_be_bytes([rest[4], rest[5], rest[6], rest[7]]);
        if magic != IHAVEOPT {
            return Err(Error::protocol(format!("bad option magic {magic:#018x}")));
        }
        out.clear();
        if len > MAX_OPTION_LEN {
            // Too big to be honest and too big to skip cheaply: say so, then hang up.
            if opt != OPT_EXPORT_NAME {
                put_option_reply(&mut out, opt, REP_ERR_TOO_BIG, b"option data too large");
                let _ = send(w, &out).await;
            }
            return Err(Error::protocol(format!(
                "option {opt} carries {len} bytes, more than the {MAX_OPTION_LEN} allowed"
            )));
        }
        let mut data = vec![0u8; len as usize];
        r.read_exact(&mut data)
            .await
            .map_err(|e| Error::io("reading option data", e))?;

        if shutdown.is_cancelled() {
            let typ = if opt == OPT_ABORT { REP_ACK } else { REP_ERR_SHUTDOWN };
            if opt != OPT_EXPORT_NAME {
                put_option_reply(&mut out, opt, typ, &[]);
                let _ = send(w, &out).await;
            }
            return Ok(None);
        }

        match opt {
            OPT_EXPORT_NAME => {
                if !names_export(&data, info) {
                    return Err(Error::protocol(format!(
                        "NBD_OPT_EXPORT_NAME for unknown export {:?}",
                        lossy(&data)
                    )));
                }
                out.extend_from_slice(&params.size.to_be_bytes());
                out.extend_from_slice(&params.transmission_flags().to_be_bytes());
                if !no_zeroes {
                    out.extend_from_slice(&[0u8; 124]);
                }
                send(w, &out).await?;
                return Ok(Some(params));
            }
            OPT_ABORT => {
                put_option_reply(&mut out, opt, REP_ACK, &[]);
                // The client may already be gone; that is fine.
                let _ = send(w, &out).await;
                return Ok(None);
            }
            OPT_LIST => {
                if data.is_empty() {
                    let mut d = Vec::with_capacity(4 + info.name.len() + info.description.len());
                    d.extend_from_slice(&len_u32(info.name.len()).to_be_bytes());
                    d.extend_from_slice(info.name.as_bytes());
                    d.extend_from_slice(info.description.as_bytes());
                    put_option_reply(&mut out, opt, REP_SERVER, &d);
                    put_option_reply(&mut out, opt, REP_ACK, &[]);
                } else {
                    put_option_reply(&mut out, opt, REP_ERR_INVALID, b"NBD_OPT_LIST takes no data");
                }
            }
            OPT_STRUCTURED_REPLY => {
                if data.is_empty() {
                    params.structured = true;
                    put_option_reply(&mut out, opt, REP_ACK, &[]);
                } else {
                    put_option_reply(
                        &mut out,
                        opt,
                        REP_ERR_INVALID,
                        b"NBD_OPT_STRUCTURED_REPLY takes no data",
                    );
                }
            }
            OPT_INFO | OPT_GO => match parse_info_request(&data) {
                None => put_option_reply(&mut out, opt, REP_ERR_INVALID, b"malformed NBD_OPT_INFO/GO"),
                Some((name, _)) if !names_export(name, info) => {
                    let msg = format!("unknown export {:?}", lossy(name));
                    put_option_reply(&mut out, opt, REP_ERR_UNKNOWN, msg.as_bytes());
                }
                Some((_, requests)) => {
                    put_export_info(&mut out, opt, &params, info, &requests);
                    put_option_reply(&mut out, opt, REP_ACK, &[]);
                    if opt == OPT_GO {
                        send(w, &out).await?;
                        return Ok(Some(params));
                    }
                }
            },
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                let set = opt == OPT_SET_META_CONTEXT;
                if set {
                    // A SET replaces the previous selection, even when it fails.
                    params.meta_context = None;
                }
                match parse_meta_request(&data) {
                    _ if set && !params.structured => put_option_reply(
                        &mut out,
                        opt,
                        REP_ERR_INVALID,
                        b"negotiate NBD_OPT_STRUCTURED_REPLY first",
                    ),
                    None => put_option_reply(&mut out, opt, REP_ERR_INVALID, b"malformed meta context request"),
                    Some((name, _)) if !names_export(name, info) => {
                        let msg = format!("unknown export {:?}", lossy(name));
                        put_option_reply(&mut out, opt, REP_ERR_UNKNOWN, msg.as_bytes());
                    }
                    Some((_, queries)) => {
                        let selected = if set {
                            queries.iter().any(|q| *q == META_BASE_ALLOCATION.as_bytes())
                        } else {
                            queries.is_empty()
                                || queries
                                    .iter()
                                    .any(|q| *q == b"base:" || *q == META_BASE_ALLOCATION.as_bytes())
                        };
                        if selected {
                            let id = if set { META_BASE_ALLOCATION_ID } else { 0 };
                            let mut d = Vec::with_capacity(4 + META_BASE_ALLOCATION.len());
                            d.extend_from_slice(&id.to_be_bytes());
                            d.extend_from_slice(META_BASE_ALLOCATION.as_bytes());
                            put_option_reply(&mut out, opt, REP_META_CONTEXT, &d);
                            if set {
                                params.meta_context = Some(META_BASE_ALLOCATION_ID);
                            }
                        }
                        put_option_reply(&mut out, opt, REP_ACK, &[]);
                    }
                }
            }
            _ => {
                debug!(option = opt, "unsupported option");
                put_option_reply(&mut out, opt, REP_ERR_UNSUP, b"option not supported by this server");
            }
        }
        send(w, &out).await?;
    }
    Err(Error::protocol(format!("more than {MAX_OPTIONS} options")))
}

async fn send<W: AsyncWrite + Unpin>(w: &mut W, bytes: &[u8]) -> Result<(), Error> {
    w.write_all(bytes)
        .await
        .map_err(|e| Error::io("writing a handshake reply", e))?;
    w.flush().await.map_err(|e| Error::io("writing a handshake reply", e))
}

/// The export is served under its own name and under "" (the default export).
fn names_export(name: &[u8], info: &ExportInfo) -> bool {
    name.is_empty() || name == info.name.as_bytes()
}

/// Client-controlled names in log lines and error messages: lossy and short.
fn lossy(b: &[u8]) -> String {
    let s = String::from_utf8_lossy(&b[..b.len().min(256)]);
    s.into_owned()
}

/// NBD_INFO_EXPORT and NBD_INFO_BLOCK_SIZE always (clients ignore what they
/// did not ask for), NAME and DESCRIPTION when asked.
fn put_export_info(out: &mut Vec<u8>, opt: u32, p: &Params, info: &ExportInfo, requests: &[u16]) {
    let mut d = Vec::with_capacity(16);
    d.extend_from_slice(&INFO_EXPORT.to_be_bytes());
    d.extend_from_slice(&p.size.to_be_bytes());
    d.extend_from_slice(&p.transmission_flags().to_be_bytes());
    put_option_reply(out, opt, REP_INFO, &d);

    d.clear();
    d.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    d.extend_from_slice(&p.min_block.to_be_bytes());
    d.extend_from_slice(&p.preferred_block.to_be_bytes());
    d.extend_from_slice(&p.max_payload.to_be_bytes());
    put_option_reply(out, opt, REP_INFO, &d);

    if requests.contains(&INFO_NAME) {
        d.clear();
        d.extend_from_slice(&INFO_NAME.to_be_bytes());
        d.extend_from_slice(truncate_utf8(&info.name, 4096).as_bytes());
        put_option_reply(out, opt, REP_INFO, &d);
    }
    if requests.contains(&INFO_DESCRIPTION) && !info.description.is_empty() {
        d.clear();
        d.extend_from_slice(&INFO_DESCRIPTION.to_be_bytes());
        d.extend_from_slice(truncate_utf8(&info.description, 4096).as_bytes());
        put_option_reply(out, opt, REP_INFO, &d);
    }
}

fn be_u32(d: &[u8], at: usize) -> Option<u32> {
    let b = d.get(at..at.checked_add(4)?)?;
    Some(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
}

/// NBD_OPT_INFO / NBD_OPT_GO data: u32 name length, name, u16 count, count x u16.
pub(crate) fn parse_info_request(d: &[u8]) -> Option<(&[u8], Vec<u16>)> {
    let nlen = usize::try_from(be_u32(d, 0)?).ok()?;
    let name_end = 4usize.checked_add(nlen)?;
    let name = d.get(4..name_end)?;
    let rest = d.get(name_end..)?;
    let count = usize::from(u16::from_be_bytes([*rest.first()?, *rest.get(1)?]));
    let list = &rest[2..];
    if list.len() != count * 2 {
        return None;
    }
    Some((
        name,
        list.chunks_exact(2).map(|c| u16::from_be_bytes([c[0], c[1]])).collect(),
    ))
}

/// NBD_OPT_{LIST,SET}_META_CONTEXT data: u32 name length, name, u32 count,
/// count x (u32 length, query). Must be consumed exactly.
pub(crate) fn parse_meta_request(d: &[u8]) -> Option<(&[u8], Vec<&[u8]>)> {
    let nlen = usize::try_from(be_u32(d, 0)?).ok()?;
    let name_end = 4usize.checked_add(nlen)?;
    let name = d.get(4..name_end)?;
    let count = be_u32(d, name_end)?;
    let mut at = name_end + 4;
    // No with_capacity(count): the count is the client's word, the data is not.
    let mut queries = Vec::new();
    for _ in 0..count {
        let qlen = usize::try_from(be_u32(d, at)?).ok()?;
        let start = at + 4;
        let end = start.checked_add(qlen)?;
        queries.push(d.get(start..end)?);
        at = end;
    }
    if at != d.len() {
        return None;
    }
    Some((name, queries))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn info_request_parsing() {
        let mut d = vec![0, 0, 0, 3, b'a', b'b', b'c', 0, 2, 0, 1, 0, 3];
        assert_eq!(parse_info_request(&d), Some((&b"abc"[..], vec![1, 3])));
        d.push(0);
        assert_eq!(parse_info_request(&d), None, "trailing byte");
        assert_eq!(parse_info_request(&[0, 0, 0, 9, 1]), None, "name longer than data");
        assert_eq!(parse_info_request(&[0xff, 0xff, 0xff, 0xff]), None);
        assert_eq!(parse_info_request(&[0, 0, 0, 0, 0, 0]), Some((&b""[..], vec![])));
        assert_eq!(parse_info_request(&[0, 0, 0, 0, 0]), None);
    }

    #[test]
    fn meta_request_parsing() {
        let mut d = vec![0, 0, 0, 0, 0, 0, 0, 2];
        d.extend_from_slice(&15u32.to_be_bytes());
        d.extend_from_slice(b"base:allocation");
        d.extend_from_slice(&5u32.to_be_bytes());
        d.extend_from_slice(b"base:");
        let (name, q) = parse_meta_request(&d).unwrap();
        assert!(name.is_empty());
        assert_eq!(q, vec![&b"base:allocation"[..], &b"base:"[..]]);
        assert_eq!(parse_meta_request(&d[..d.len() - 1]), None);
        // A huge query count with no data must not allocate or succeed.
        assert_eq!(parse_meta_request(&[0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff]), None);
    }

    proptest::proptest! {
        #[test]
        fn option_parsers_never_panic(data in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..256)) {
            let _ = parse_info_request(&data);
            let _ = parse_meta_request(&data);
        }
    }
}
