//! arrears: the billing-arrears lifecycle engine of a cloud provider. Daily bills from
//! metered usage, arrears, and (in later modules) alerts, suspension, release and restore.

pub mod bench;
pub mod config;
pub mod db;
pub mod domain;
pub mod import;
pub mod jobs;
pub mod ledger;
pub mod lifecycle;
pub mod notify;
pub mod queries;
pub mod report;
pub mod simulate;
