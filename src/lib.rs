//! arrears: the billing-arrears lifecycle engine of a cloud provider. Daily bills from
//! metered usage, arrears, alerts, suspension, release and restore, run on a schedule by
//! `arrears serve` (service.rs) or one slot at a time from the CLI.

pub mod bench;
pub mod bench_email;
pub mod bench_lifecycle;
pub mod config;
pub mod contact;
pub mod db;
pub mod demo;
pub mod domain;
pub mod import;
pub mod jobs;
pub mod ledger;
pub mod lifecycle;
pub mod metrics;
pub mod notify;
pub mod queries;
pub mod report;
pub mod scheduler;
pub mod server;
pub mod service;
pub mod shared;
pub mod simulate;
pub mod smtp_url;
