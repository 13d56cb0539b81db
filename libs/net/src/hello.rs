//! The checks every listener makes of a Hello before it looks at the disk:
//! the protocol version, the token (in constant time) and the role. What
//! follows (binding the disk id, refusing a busy or failed-over disk) is
//! each service's own.

use tidemark_wire::frame::{ErrorCode, Hello, Role, PROTOCOL_VERSION};

/// Largest frame body any listener reads before the Hello is checked (a
/// Hello is a few hundred bytes): an unauthenticated peer holds at most
/// this much of a service's frame budget.
pub const HELLO_MAX_BODY: u32 = 16 << 10;

/// Why a Hello is refused: the code and the reason for the Error frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub code: ErrorCode,
    pub reason: String,
}

impl Refusal {
    pub fn new(code: ErrorCode, reason: impl Into<String>) -> Self {
        Self {
            code,
            reason: reason.into(),
        }
    }
}

/// Check `hello` as `me` (`collector`, `target`), which accepts peers of
/// role `from` holding `token`.
pub fn check_hello(hello: &Hello, me: &str, from: Role, token: &[u8]) -> Result<(), Refusal> {
    if hello.protocol != PROTOCOL_VERSION {
        return Err(Refusal::new(
            ErrorCode::UnsupportedVersion,
            format!(
                "protocol version {} is not supported (this {me} speaks {PROTOCOL_VERSION})",
                hello.protocol
            ),
        ));
    }
    if !tidemark_util::bytes::ct_eq(&hello.token, token) {
        return Err(Refusal::new(
            ErrorCode::BadToken,
            format!("the token for disk {} does not match the {me}'s", hello.disk_id),
        ));
    }
    if hello.role != from {
        return Err(Refusal::new(
            ErrorCode::Malformed,
            format!(
                "disk {}: a peer with role {:?} said Hello; only the {from:?} role connects to a {me}",
                hello.disk_id, hello.role
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello() -> Hello {
        Hello {
            protocol: PROTOCOL_VERSION,
            role: Role::Agent,
            flags: 0,
            disk_uuid: [1; 16],
            disk_size: 0,
            disk_id: "d1".parse().unwrap(),
            token: b"tok".to_vec(),
            lineage: tidemark_wire::frame::Lineage::default(),
        }
    }

    #[test]
    fn refuses_version_token_and_role_in_that_order() {
        assert_eq!(check_hello(&hello(), "collector", Role::Agent, b"tok"), Ok(()));
        let mut h = hello();
        h.protocol += 1;
        h.token = b"bad".to_vec();
        assert_eq!(
            check_hello(&h, "collector", Role::Agent, b"tok").unwrap_err().code,
            ErrorCode::UnsupportedVersion
        );
        let mut h = hello();
        h.token = b"guess-42".to_vec();
        let r = check_hello(&h, "collector", Role::Agent, b"tok").unwrap_err();
        assert_eq!(r.code, ErrorCode::BadToken);
        assert!(
            !r.reason.contains("guess-42"),
            "the reason never echoes a token: {}",
            r.reason
        );
        let r = check_hello(&hello(), "target", Role::Collector, b"tok").unwrap_err();
        assert_eq!(r.code, ErrorCode::Malformed);
        assert!(
            r.reason.contains("only the Collector role connects to a target"),
            "{}",
            r.reason
        );
    }
}
