pub mod agent;
pub mod journal;
