-- The service: slot claims with a lease, billing batches any instance can claim, and the
-- shared work list of a billing run (so that batches run on other instances too).

ALTER TABLE job_runs DROP CONSTRAINT job_runs_status_check;
ALTER TABLE job_runs ADD CONSTRAINT job_runs_status_check
  CHECK (status IN ('running', 'succeeded', 'failed', 'interrupted'));
-- Who holds a running slot, and until when: a runner renews its lease while it works; a
-- slot whose lease expired (its runner died) is taken over and resumed.
ALTER TABLE job_runs ADD COLUMN owner text;
ALTER TABLE job_runs ADD COLUMN lease_until timestamptz;
CREATE INDEX job_runs_open ON job_runs (job, slot) WHERE status <> 'succeeded';

-- One row per batch of accounts of a billing run. A batch is claimed with FOR UPDATE SKIP
-- LOCKED inside the very transaction that bills it, so a batch is billed once: when its
-- worker dies, the transaction rolls back and the batch is pending again.
CREATE TABLE job_batches (
  job       text NOT NULL,
  slot      timestamptz NOT NULL,
  batch_no  integer NOT NULL,
  lo        text NOT NULL,
  hi        text NOT NULL,
  status    text NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'done')),
  done_by   text,
  done_at   timestamptz,
  result    jsonb,
  PRIMARY KEY (job, slot, batch_no)
);
CREATE INDEX job_batches_pending ON job_batches (job, slot) WHERE status = 'pending';

-- The unbilled usage of a billing run, aggregated per account, resource, meter and day, and
-- the accounts it leaves alone. Unlogged: it is derived data that a resumed run recomputes
-- from usage_records and the accounts' marks (a crash empties it; the next attempt refills it).
CREATE UNLOGGED TABLE bill_candidates (
  slot        timestamptz NOT NULL,
  account_id  text NOT NULL,
  resource_id text NOT NULL,
  meter       text NOT NULL,
  usage_day   date NOT NULL,
  records     integer NOT NULL,
  quantity    bigint NOT NULL,
  min_seq     bigint NOT NULL,
  max_seq     bigint NOT NULL
);
CREATE INDEX bill_candidates_slot_account ON bill_candidates (slot, account_id);
CREATE UNLOGGED TABLE bill_skipped (
  slot        timestamptz NOT NULL,
  account_id  text NOT NULL,
  why         text NOT NULL
);
CREATE INDEX bill_skipped_slot_account ON bill_skipped (slot, account_id);
