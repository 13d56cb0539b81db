//! tidemark-collector: the process server (receive → spool → compress/dedup →
//! forward) and configuration server. Built with the replication pipeline;
//! until then this binary only says so.

fn main() -> std::process::ExitCode {
    eprintln!("tidemark-collector: not built yet (see the replication pipeline issue)");
    std::process::ExitCode::from(2)
}
