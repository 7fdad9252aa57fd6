-- Delivery takes due notices oldest first, by (next_attempt_at, id), a batch at a time. The
-- index serves that order, so a batch costs what it takes, not a sort of the whole queue
-- (with 20,000 notices due, each claim sorted all of them: 14 ms a batch, twice).
-- A claimed notice is due again when its lease runs out: the claim sets next_attempt_at to
-- the lease's end, so that one range of this index finds taken-over notices too.
DROP INDEX notices_due;
CREATE INDEX notices_due ON notices (next_attempt_at, id) WHERE status IN ('pending', 'retrying', 'sending');
UPDATE notices SET next_attempt_at = greatest(next_attempt_at, lease_until)
WHERE status = 'sending' AND lease_until IS NOT NULL;
