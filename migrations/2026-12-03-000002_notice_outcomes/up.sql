-- Notices that stopped being true before they were sent are cancelled, with the reason, and
-- never sent or counted as accepted; every email notice keeps one Message-ID across attempts.
ALTER TABLE notices DROP CONSTRAINT notices_status_check;
ALTER TABLE notices ADD CONSTRAINT notices_status_check
  CHECK (status IN ('pending', 'sending', 'sent', 'retrying', 'dead', 'cancelled'));
ALTER TABLE notices
  ADD COLUMN cancel_reason text,
  ADD COLUMN message_id text,
  -- sent through a channel that reaches nobody (the log SMS adapter, the .eml file
  -- transport): recorded as sent, never as accepted (R9) unless the configuration says so
  ADD COLUMN dev_channel boolean NOT NULL DEFAULT false;
