-- A release warning that was not written in its window (no send_alerts run in it, a legal
-- hold lifted after it) used to be dropped for good, and with it any chance of the release
-- (R9: both warnings accepted a day before): such an account was due for no job again, its
-- resources suspended for ever. send_alerts now sends a missed warning late (the release then
-- waits a day after it). This marks every account with a live suspension that has a release
-- instant due for send_alerts at that instant at the latest, so that an account stuck that
-- way is looked at again; an account with nothing missing just has its due instant
-- recomputed by that run.
UPDATE accounts a SET alerts_due_at = least(coalesce(a.alerts_due_at, 'infinity'), s.release_at)
FROM (SELECT account_id, min(release_at) AS release_at
      FROM resource_suspensions
      WHERE ended_at IS NULL AND release_at IS NOT NULL
      GROUP BY account_id) s
WHERE a.id = s.account_id;
