-- Claiming a notice and recording it sent each rewrote the whole row with a new entry in every
-- index (status is in the due index's predicate and next_attempt_at is its key): 6 WAL
-- records a claim, a fifth of delivery's database time (bench-email, pg_stat_statements).
-- A claim now changes no indexed column, so its new version stays on the row's page with no
-- index entry (a HOT update): the due index's predicate is a column of its own, which is true
-- whatever a queued notice's status (pending, retrying, sending), and the claim leaves
-- next_attempt_at alone (a claimed notice is taken over when its lease runs out, checked on
-- the row). Pages keep room for the claim's new version. Existing notices keep their data.
ALTER TABLE notices SET (fillfactor = 50);
ALTER TABLE notices ADD COLUMN queued boolean NOT NULL
  GENERATED ALWAYS AS (status IN ('pending', 'retrying', 'sending')) STORED;
DROP INDEX notices_due;
CREATE INDEX notices_due ON notices (next_attempt_at, id) WHERE queued;
