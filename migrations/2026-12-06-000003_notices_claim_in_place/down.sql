DROP INDEX notices_due;
ALTER TABLE notices DROP COLUMN queued;
CREATE INDEX notices_due ON notices (next_attempt_at, id) WHERE status IN ('pending', 'retrying', 'sending');
ALTER TABLE notices RESET (fillfactor);
