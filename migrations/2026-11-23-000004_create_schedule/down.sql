DROP TABLE bill_skipped;
DROP TABLE bill_candidates;
DROP TABLE job_batches;
DROP INDEX job_runs_open;
ALTER TABLE job_runs DROP COLUMN lease_until;
ALTER TABLE job_runs DROP COLUMN owner;
DELETE FROM job_runs WHERE status = 'interrupted';
ALTER TABLE job_runs DROP CONSTRAINT job_runs_status_check;
ALTER TABLE job_runs ADD CONSTRAINT job_runs_status_check
  CHECK (status IN ('running', 'succeeded', 'failed'));
