-- Arrears episodes, resource suspensions and the due-work index of the lifecycle jobs.
--
-- Every lifecycle fact belongs to the arrears episode it was about (the first accepted
-- overdue alert, the account's suspension) and, where it concerns a resource, to that
-- resource's suspension: one row per (resource, reason) period, with its own retention clock
-- and release deadline, so that a new episode or a new suspension reason never inherits an
-- earlier one's clocks or warnings. Numbers are per account (episode 1, 2, ...; suspension
-- 1, 2, ...), handed out under the account's row lock from counters on the account.

CREATE TABLE arrears_episodes (
  account_id              text NOT NULL REFERENCES accounts (id),
  no                      integer NOT NULL CHECK (no > 0),
  -- R1: when settling a bill (or a lowered credit quota) left cash + credit quota below zero
  opened_at               timestamptz NOT NULL,
  opened_by               text NOT NULL,
  -- R2/R9 (lcic): when a channel first accepted this episode's overdue alert
  first_overdue_alert_at  timestamptz,
  -- R3: when the account was suspended in this episode
  suspended_at            timestamptz,
  closed_at               timestamptz,
  -- paid: cash + credit quota back to >= 0; released: nothing of the account is left to act on
  close_reason            text CHECK (close_reason IN ('paid', 'released')),
  closed_by               text,
  PRIMARY KEY (account_id, no),
  CHECK ((closed_at IS NULL) = (close_reason IS NULL))
);
CREATE TRIGGER arrears_episodes_keep BEFORE DELETE ON arrears_episodes
  FOR EACH ROW EXECUTE FUNCTION arrears_refuse_change();

ALTER TABLE accounts
  -- the open episode (NULL: none)
  ADD COLUMN episode integer,
  -- episodes and suspensions numbered so far
  ADD COLUMN episodes integer NOT NULL DEFAULT 0,
  ADD COLUMN suspensions integer NOT NULL DEFAULT 0,
  -- The due-work index: the next instant at which each lifecycle job has something to do
  -- for the account without new input (NULL: nothing until an input changes). Written in
  -- the transaction of every change of its inputs; each job selects only what is due,
  -- oldest first.
  ADD COLUMN alerts_due_at timestamptz,
  ADD COLUMN enforce_due_at timestamptz,
  ADD COLUMN release_due_at timestamptz;
ALTER TABLE accounts ADD CONSTRAINT accounts_open_episode
  FOREIGN KEY (id, episode) REFERENCES arrears_episodes (account_id, no);
CREATE INDEX accounts_alerts_due ON accounts (alerts_due_at, id) WHERE alerts_due_at IS NOT NULL;
CREATE INDEX accounts_enforce_due ON accounts (enforce_due_at, id) WHERE enforce_due_at IS NOT NULL;
CREATE INDEX accounts_release_due ON accounts (release_due_at, id) WHERE release_due_at IS NOT NULL;

CREATE TABLE resource_suspensions (
  account_id   text NOT NULL,
  no           integer NOT NULL CHECK (no > 0),
  resource_id  text NOT NULL,
  reason       text NOT NULL
               CHECK (reason IN ('arrears', 'quota_exhausted', 'package_expired', 'compliance', 'unsubscribed')),
  -- an arrears suspension belongs to its episode; other reasons are not about arrears
  episode      integer,
  -- the retention clock of this suspension
  started_at   timestamptz NOT NULL,
  -- R4: when the product's policy releases it (NULL: never: compliance, or a non-arrears
  -- reason the policy keeps); moved by `arrears policies apply` when the policy changes
  release_at   timestamptz,
  ended_at     timestamptz,
  ended_how    text CHECK (ended_how IN ('restored', 'reason_changed', 'released', 'new_episode')),
  PRIMARY KEY (account_id, no),
  FOREIGN KEY (account_id, resource_id) REFERENCES resources (account_id, id),
  FOREIGN KEY (account_id, episode) REFERENCES arrears_episodes (account_id, no),
  CHECK ((reason = 'arrears') = (episode IS NOT NULL)),
  CHECK ((ended_at IS NULL) = (ended_how IS NULL))
);
CREATE TRIGGER resource_suspensions_keep BEFORE DELETE ON resource_suspensions
  FOR EACH ROW EXECUTE FUNCTION arrears_refuse_change();

-- The current suspension of a suspended resource.
ALTER TABLE resources ADD COLUMN suspension integer;
ALTER TABLE resources ADD CONSTRAINT resources_current_suspension
  FOREIGN KEY (account_id, suspension) REFERENCES resource_suspensions (account_id, no);

-- The audit trail names the episode each change happened in.
ALTER TABLE lifecycle_events ADD COLUMN episode integer;

-- Notices name what they are about, so that a decision (and delivery) can tell an earlier
-- episode's notice from this one's.
ALTER TABLE notices
  ADD COLUMN episode integer,
  ADD COLUMN suspension integer;
CREATE INDEX notices_about ON notices (account_id, kind, episode);

-- ---------------------------------------------------------------------------------------
-- Today's data.

-- One episode for every account in arrears (or with a resource suspended for arrears).
INSERT INTO arrears_episodes (account_id, no, opened_at, opened_by, first_overdue_alert_at, suspended_at)
SELECT a.id, 1,
       coalesce(a.arrears_since,
                (SELECT min(r.suspended_at) FROM resources r
                 WHERE r.account_id = a.id AND r.state_reason = 'arrears'),
                a.updated_at),
       'migration', a.first_overdue_alert_at, a.suspended_at
FROM accounts a
WHERE a.arrears_since IS NOT NULL
   OR EXISTS (SELECT 1 FROM resources r WHERE r.account_id = a.id AND r.state = 'suspended'
              AND r.state_reason = 'arrears');
UPDATE accounts a SET episode = 1, episodes = 1
FROM arrears_episodes e WHERE e.account_id = a.id;
UPDATE lifecycle_events v SET episode = 1
FROM arrears_episodes e WHERE e.account_id = v.account_id AND v.occurred_at >= e.opened_at;

-- An episode whose resources are all released has nothing left to act on.
UPDATE arrears_episodes e SET closed_at = r.last_release, close_reason = 'released', closed_by = 'migration'
FROM (SELECT account_id, max(released_at) AS last_release FROM resources
      GROUP BY account_id HAVING bool_and(state = 'released')) r
WHERE e.account_id = r.account_id;
UPDATE accounts a SET episode = NULL
FROM arrears_episodes e WHERE e.account_id = a.id AND e.closed_at IS NOT NULL;

-- One suspension for every suspended resource, started when it was suspended.
INSERT INTO resource_suspensions (account_id, no, resource_id, reason, episode, started_at)
SELECT r.account_id, row_number() OVER (PARTITION BY r.account_id ORDER BY r.suspended_at, r.id)::int,
       r.id, r.state_reason,
       CASE WHEN r.state_reason = 'arrears' THEN coalesce(a.episode, 1) END,
       coalesce(r.suspended_at, r.updated_at)
FROM resources r JOIN accounts a ON a.id = r.account_id
WHERE r.state = 'suspended';
UPDATE resources r SET suspension = s.no
FROM resource_suspensions s WHERE s.account_id = r.account_id AND s.resource_id = r.id;
UPDATE accounts a SET suspensions = n.n
FROM (SELECT account_id, count(*)::int AS n FROM resource_suspensions GROUP BY account_id) n
WHERE n.account_id = a.id;

-- Accepted release warnings: keyed by the suspension (resource and reason) they were about,
-- the lead, and the release instant they announced. Migrated ones announced the deadline of
-- their suspension, which the policy gives: `arrears policies apply` (run by migrate and at
-- service start) fills it in.
ALTER TABLE release_warnings RENAME TO release_warnings_by_period;
CREATE TABLE release_warnings (
  account_id    text NOT NULL,
  id            bigint GENERATED ALWAYS AS IDENTITY,
  suspension    integer NOT NULL,
  lead_seconds  integer NOT NULL CHECK (lead_seconds > 0),
  release_at    timestamptz,
  accepted_at   timestamptz NOT NULL,
  PRIMARY KEY (account_id, id),
  FOREIGN KEY (account_id, suspension) REFERENCES resource_suspensions (account_id, no),
  UNIQUE NULLS NOT DISTINCT (account_id, suspension, lead_seconds, release_at)
);
INSERT INTO release_warnings (account_id, suspension, lead_seconds, release_at, accepted_at)
SELECT s.account_id, s.no, w.lead_seconds, NULL, min(w.accepted_at)
FROM release_warnings_by_period w
JOIN resource_suspensions s ON s.account_id = w.account_id AND s.started_at = w.period
GROUP BY 1, 2, 3;
DROP TABLE release_warnings_by_period;

-- Notices already written name their episode, and keep their place under the new keys, so
-- that a migrated account is not sent its overdue alert again.
UPDATE notices n SET episode = a.episode,
  dedupe_key = CASE
    WHEN n.kind = 'overdue' THEN 'overdue:e' || a.episode || ':' || n.channel
    WHEN n.kind = 'overdue_reminder'
      THEN regexp_replace(n.dedupe_key, '^overdue_reminder:.*:([0-9]+):([a-z]+)$',
                          'overdue_reminder:e' || a.episode || ':\1:\2')
    WHEN n.kind = 'suspension_imminent'
      THEN regexp_replace(n.dedupe_key, '^suspension_imminent:', 'suspension_imminent:e' || a.episode || ':')
  END
FROM accounts a
WHERE a.id = n.account_id AND a.episode IS NOT NULL
  AND n.kind IN ('overdue', 'overdue_reminder', 'suspension_imminent');

-- The episode facts now live on the episode.
ALTER TABLE accounts DROP COLUMN first_overdue_alert_at, DROP COLUMN suspended_at;

-- Every account in the lifecycle is evaluated by each job's next run, which computes its
-- precise due instants.
UPDATE accounts SET alerts_due_at = now(), enforce_due_at = now(), release_due_at = now()
WHERE episode IS NOT NULL OR state <> 'good' OR compliance_locked
   OR low_balance_threshold IS NOT NULL
   OR EXISTS (SELECT 1 FROM resources r WHERE r.account_id = accounts.id AND r.state <> 'released'
              AND (r.state = 'suspended' OR r.billing_mode = 'package'));

-- The lifecycle policies the due index was last computed under (see `arrears policies apply`).
CREATE TABLE lifecycle_policies (
  product     text PRIMARY KEY,
  policy      jsonb NOT NULL,
  applied_at  timestamptz NOT NULL
);
