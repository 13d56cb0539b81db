pub mod agent;
pub mod failover;
pub mod journal;
pub mod mount;
pub mod points;
pub mod reprotect;
pub mod status;
pub mod tag;
