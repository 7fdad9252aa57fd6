-- A package's terms. The resource row holds the current term (package_quota, package_used,
-- package_expires_at, and from now on package_starts_at: NULL for a term that runs since the
-- resource was created); a renewal keeps the term it replaces here, with what was left of it,
-- so that a record that arrives late, of a day the earlier term covered, draws on that term
-- (settlement by the record's own day), not on pay-as-you-go or on the renewed package.
ALTER TABLE resources ADD COLUMN package_starts_at timestamptz;

CREATE TABLE package_terms (
  account_id   text NOT NULL,
  resource_id  text NOT NULL,
  -- 1, 2, ...: the order of the terms a renewal closed
  no           integer NOT NULL CHECK (no > 0),
  -- NULL: since the resource was created
  starts_at    timestamptz,
  -- covers the days that start before this: the term's expiry, or the renewal if earlier
  ends_at      timestamptz NOT NULL,
  quota        bigint NOT NULL CHECK (quota >= 0),
  used         bigint NOT NULL CHECK (used >= 0),
  closed_at    timestamptz NOT NULL,
  PRIMARY KEY (account_id, resource_id, no),
  FOREIGN KEY (account_id, resource_id) REFERENCES resources (account_id, id)
);
CREATE TRIGGER package_terms_keep BEFORE DELETE ON package_terms
  FOR EACH ROW EXECUTE FUNCTION arrears_refuse_change();
