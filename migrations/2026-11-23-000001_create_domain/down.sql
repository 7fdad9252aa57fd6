DROP TABLE job_runs, lifecycle_events, ledger_entries, bill_lines, bills, billing_cursor,
  usage_records, resources, prices, coupons, accounts;
DROP FUNCTION arrears_refuse_change();
