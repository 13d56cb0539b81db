pub mod agent;
pub mod journal;
pub mod status;
