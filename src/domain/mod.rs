//! Pure billing rules: money, settlement, policies and calendar arithmetic. No I/O here.

pub mod calendar;
pub mod lifecycle;
pub mod money;
pub mod policy;
pub mod settle;
