DROP INDEX notices_due;
CREATE INDEX notices_due ON notices (next_attempt_at) WHERE status IN ('pending', 'retrying', 'sending');
