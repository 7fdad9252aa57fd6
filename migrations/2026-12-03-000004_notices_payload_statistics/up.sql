-- The planner never filters on a notice's payload, and sampling it (large JSON) was half the
-- cost of each ANALYZE of notices that the jobs run when autovacuum is off or behind
-- (src/db/stats.rs).
ALTER TABLE notices ALTER COLUMN payload SET STATISTICS 0;
