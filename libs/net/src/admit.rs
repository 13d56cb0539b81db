//! Connection admission for the listeners (`docs/security.md`,
//! "Listeners"): caps on connections not yet authenticated (the TLS
//! handshake and the Hello) — in all, and from one address — so that a
//! flood of unauthenticated connections holds a small fixed number of
//! slots and one source cannot take them all, and a cap on all
//! connections. A connection over a cap is closed at accept.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Connections at once still in their TLS handshake or before their Hello.
pub const MAX_UNAUTHENTICATED: usize = 64;

/// Of those, from one address.
pub const MAX_UNAUTHENTICATED_PER_ADDR: usize = 8;

/// Connections at once in all (a collector: about one per protected disk).
pub const MAX_CONNECTIONS: usize = 4096;

/// The listener's slots.
#[derive(Clone, Debug)]
pub struct Admission {
    unauthenticated: Arc<Semaphore>,
    all: Arc<Semaphore>,
    per_addr: Arc<Mutex<HashMap<IpAddr, usize>>>,
    caps: (usize, usize, usize),
}

impl Default for Admission {
    fn default() -> Self {
        Self::new(MAX_UNAUTHENTICATED, MAX_UNAUTHENTICATED_PER_ADDR, MAX_CONNECTIONS)
    }
}

/// A connection's slots: the unauthenticated ones are given back by
/// [`Admitted::authenticated`] (or the end), the other when it ends.
#[derive(Debug)]
pub struct Admitted {
    unauthenticated: Option<(OwnedSemaphorePermit, AddrSlot)>,
    _all: OwnedSemaphorePermit,
}

/// One unauthenticated slot of an address.
#[derive(Debug)]
struct AddrSlot {
    addr: IpAddr,
    map: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

impl Drop for AddrSlot {
    fn drop(&mut self) {
        let mut m = self.map.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(n) = m.get_mut(&self.addr) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.addr);
            }
        }
    }
}

impl Admission {
    /// Caps of `unauthenticated` connections, of those `per_addr` from
    /// one address, and of `all` connections.
    pub fn new(unauthenticated: usize, per_addr: usize, all: usize) -> Self {
        Self {
            unauthenticated: Arc::new(Semaphore::new(unauthenticated)),
            all: Arc::new(Semaphore::new(all)),
            per_addr: Arc::default(),
            caps: (unauthenticated, per_addr, all),
        }
    }

    /// Slots for a new connection from `addr`, or why it is closed.
    pub fn admit(&self, addr: IpAddr) -> Result<Admitted, String> {
        let all = self
            .all
            .clone()
            .try_acquire_owned()
            .map_err(|_| format!("{} connections are open already", self.caps.2))?;
        let slot = {
            let mut m = self.per_addr.lock().unwrap_or_else(PoisonError::into_inner);
            let n = m.entry(addr).or_insert(0);
            if *n >= self.caps.1 {
                return Err(format!(
                    "{} connections from {addr} are still authenticating",
                    self.caps.1
                ));
            }
            *n += 1;
            AddrSlot {
                addr,
                map: self.per_addr.clone(),
            }
        };
        let pre = self.unauthenticated.clone().try_acquire_owned().map_err(|_| {
            format!(
                "{} connections are still authenticating (a flood of unauthenticated connections?)",
                self.caps.0
            )
        })?;
        Ok(Admitted {
            unauthenticated: Some((pre, slot)),
            _all: all,
        })
    }
}

impl Admitted {
    /// The peer proved who it is (its Hello was accepted): it no longer
    /// takes one of the few unauthenticated slots.
    pub fn authenticated(&mut self) {
        self.unauthenticated = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unauthenticated_slots_are_few_per_address_and_given_back_on_authentication() {
        let (a1, a2, a3): (IpAddr, IpAddr, IpAddr) = (
            "127.0.0.1".parse().unwrap(),
            "127.0.0.2".parse().unwrap(),
            "::1".parse().unwrap(),
        );
        let a = Admission::new(3, 2, 4);
        let mut x = a.admit(a1).unwrap();
        let _y = a.admit(a1).unwrap();
        assert!(a.admit(a1).unwrap_err().contains("from 127.0.0.1"));
        let _z = a.admit(a2).unwrap();
        assert!(a
            .admit(a3)
            .unwrap_err()
            .contains("3 connections are still authenticating"));
        x.authenticated();
        let _w = a.admit(a1).unwrap();
        assert!(a.admit(a3).unwrap_err().contains("4 connections are open already"));
        drop(x);
        assert!(
            a.admit(a1).unwrap_err().contains("from 127.0.0.1"),
            "y and w still authenticate"
        );
    }
}
