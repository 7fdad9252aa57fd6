-- Billing appends one bill, its lines and one charge a day to every account. Keyed account
-- first, each day's rows land all over indexes that hold every earlier day: every leaf page is
-- written again (in full, the first time after a checkpoint) and split as it fills, so each
-- day cost more than the one before (`arrears bench --days 7`). Keyed day first, a day's rows
-- go to the right-hand edge of the index, in the order billing writes them, whatever the
-- history. Both indexes stay unique on the same columns; their readers name both the account
-- and the day (a bill's lines; a day's charge), which a day-first key serves as well.
-- Rebuilt in place: existing rows are kept. The rebuild holds an exclusive lock on both tables
-- (about 1 s per million bill lines on the project's machine).
ALTER TABLE bill_lines DROP CONSTRAINT bill_lines_pkey;
ALTER TABLE bill_lines ADD PRIMARY KEY (bill_day, account_id, resource_id, meter);

DROP INDEX ledger_entries_charge_day;
CREATE UNIQUE INDEX ledger_entries_charge_day ON ledger_entries (bill_day, account_id) WHERE kind = 'charge';
