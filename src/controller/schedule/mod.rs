//! GroupSnapshotSchedule: cuts GroupSnapshots on a cron schedule and trims them by retention.

pub mod cron;
pub mod plan;
pub mod retention;
