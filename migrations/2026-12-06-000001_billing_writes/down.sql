ALTER TABLE accounts RESET (fillfactor);
DROP TRIGGER accounts_keep ON accounts;
DROP FUNCTION arrears_refuse_account_delete();
ALTER TABLE ledger_entries ADD FOREIGN KEY (account_id) REFERENCES accounts (id);
ALTER TABLE bills ADD FOREIGN KEY (account_id) REFERENCES accounts (id);
ALTER TABLE bill_lines ADD FOREIGN KEY (account_id, bill_day) REFERENCES bills (account_id, bill_day);
