-- One payment reference credits one account, once, across the deployment: the reference is
-- the key of its own table (so the table needs no account_id in its key and the business
-- tables stay distributable by account_id). A top-up with a known reference is a replay only
-- with the same account and amount; on another account it is refused.
CREATE TABLE payment_references (
  reference        text PRIMARY KEY CHECK (reference <> ''),
  account_id       text NOT NULL REFERENCES accounts (id),
  amount           bigint NOT NULL CHECK (amount > 0),
  -- the top-up's ledger entry (set in the transaction that claims the reference)
  ledger_entry_id  bigint,
  applied_at       timestamptz NOT NULL
);
CREATE INDEX payment_references_account ON payment_references (account_id);

-- References already used. Where an old reference credited several accounts (what this
-- table now refuses), the first top-up keeps it.
INSERT INTO payment_references (reference, account_id, amount, ledger_entry_id, applied_at)
SELECT DISTINCT ON (reference) reference, account_id, amount, id, effective_at
FROM ledger_entries WHERE kind = 'topup' AND reference IS NOT NULL AND reference <> ''
ORDER BY reference, recorded_at, id;
