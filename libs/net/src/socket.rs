//! Socket options.

use std::io;
use std::os::fd::AsFd;
use std::time::Duration;

/// `TCP_USER_TIMEOUT`: data left unacknowledged for longer than `d` ends
/// the connection, so a peer that vanished (no FIN, no RST) is noticed in
/// `d` rather than after the kernel's ~15 minutes of retransmissions.
/// Rounded down to whole milliseconds, at most `u32::MAX`.
pub fn set_user_timeout(sock: &impl AsFd, d: Duration) -> io::Result<()> {
    let ms = u32::try_from(d.as_millis()).unwrap_or(u32::MAX);
    nix::sys::socket::setsockopt(sock, nix::sys::socket::sockopt::TcpUserTimeout, &ms).map_err(io::Error::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn user_timeout_is_set() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let s = tokio::net::TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        set_user_timeout(&s, Duration::from_secs(30)).unwrap();
        let got = nix::sys::socket::getsockopt(&s, nix::sys::socket::sockopt::TcpUserTimeout).unwrap();
        assert_eq!(got, 30_000);
        // Not a TCP socket: the kernel's error, not a panic.
        let (u, _) = std::os::unix::net::UnixStream::pair().unwrap();
        assert!(set_user_timeout(&u, Duration::from_secs(1)).is_err());
    }
}
