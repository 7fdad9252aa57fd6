-- The transactional outbox (R8): every notice (email, SMS, webhook) is written in the
-- transaction of the state change or decision that causes it, once per dedupe key.
CREATE TABLE notices (
  account_id           text NOT NULL REFERENCES accounts (id),
  id                   bigint GENERATED ALWAYS AS IDENTITY,
  kind                 text NOT NULL,
  channel              text NOT NULL CHECK (channel IN ('email', 'sms', 'webhook')),
  -- (kind, period, channel): a re-run, a crash or a second instance can never add it twice
  dedupe_key           text NOT NULL,
  -- template variables, or the webhook body; never a contact address (resolved at send time)
  payload              jsonb NOT NULL,
  status               text NOT NULL DEFAULT 'pending'
                       CHECK (status IN ('pending', 'sending', 'sent', 'retrying', 'dead')),
  attempts             integer NOT NULL DEFAULT 0,
  next_attempt_at      timestamptz NOT NULL,
  -- a claimed notice whose sender died is taken over when its lease has run out
  lease_until          timestamptz,
  last_error           text,
  provider_message_id  text,
  accepted_at          timestamptz,
  created_at           timestamptz NOT NULL,
  PRIMARY KEY (account_id, id),
  UNIQUE (account_id, dedupe_key)
);
CREATE INDEX notices_due ON notices (next_attempt_at) WHERE status IN ('pending', 'retrying', 'sending');

-- R7: the balance alert fires once per crossing of the threshold and re-arms above it.
ALTER TABLE accounts ADD COLUMN balance_alert_armed boolean NOT NULL DEFAULT true;
