DROP TABLE lifecycle_policies;
ALTER TABLE accounts ADD COLUMN first_overdue_alert_at timestamptz, ADD COLUMN suspended_at timestamptz;
UPDATE accounts a SET first_overdue_alert_at = e.first_overdue_alert_at, suspended_at = e.suspended_at
FROM arrears_episodes e WHERE e.account_id = a.id AND e.no = a.episode;
DROP TABLE release_warnings;
CREATE TABLE release_warnings (
  account_id    text NOT NULL REFERENCES accounts (id),
  period        timestamptz NOT NULL,
  lead_seconds  integer NOT NULL CHECK (lead_seconds > 0),
  accepted_at   timestamptz NOT NULL,
  PRIMARY KEY (account_id, period, lead_seconds)
);
DROP INDEX notices_about;
ALTER TABLE lifecycle_events DROP COLUMN episode;
ALTER TABLE notices DROP COLUMN episode, DROP COLUMN suspension;
ALTER TABLE resources DROP CONSTRAINT resources_current_suspension;
ALTER TABLE resources DROP COLUMN suspension;
DROP TABLE resource_suspensions;
ALTER TABLE accounts DROP CONSTRAINT accounts_open_episode;
ALTER TABLE accounts DROP COLUMN episode, DROP COLUMN episodes, DROP COLUMN suspensions,
  DROP COLUMN alerts_due_at, DROP COLUMN enforce_due_at, DROP COLUMN release_due_at;
DROP TABLE arrears_episodes;
