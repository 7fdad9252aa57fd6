DROP INDEX ledger_entries_charge_day;
CREATE UNIQUE INDEX ledger_entries_charge_day ON ledger_entries (account_id, bill_day) WHERE kind = 'charge';

ALTER TABLE bill_lines DROP CONSTRAINT bill_lines_pkey;
ALTER TABLE bill_lines ADD PRIMARY KEY (account_id, bill_day, resource_id, meter);
