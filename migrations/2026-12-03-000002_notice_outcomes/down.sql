UPDATE notices SET status = 'dead', last_error = 'cancelled: ' || coalesce(cancel_reason, '') WHERE status = 'cancelled';
ALTER TABLE notices DROP COLUMN cancel_reason, DROP COLUMN message_id, DROP COLUMN dev_channel;
ALTER TABLE notices DROP CONSTRAINT notices_status_check;
ALTER TABLE notices ADD CONSTRAINT notices_status_check
  CHECK (status IN ('pending', 'sending', 'sent', 'retrying', 'dead'));
