//! tidemark-target: the master target (receive → apply → replica → retention
//! → views). Built with the replication pipeline; until then this binary
//! only says so.

fn main() -> std::process::ExitCode {
    eprintln!("tidemark-target: not built yet (see the replication pipeline issue)");
    std::process::ExitCode::from(2)
}
