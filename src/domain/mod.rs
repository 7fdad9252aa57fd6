//! Pure billing and lifecycle rules: money, settlement, policies, calendar arithmetic, the
//! lifecycle decisions and the due-work index. No I/O here.

pub mod alerts;
pub mod calendar;
pub mod due;
pub mod lifecycle;
pub mod money;
pub mod notice;
pub mod policy;
pub mod settle;
