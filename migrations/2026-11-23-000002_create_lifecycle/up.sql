-- Facts and orders of the arrears lifecycle (R4, R9).

-- Release warnings a channel accepted, per account and suspension period (the instant the
-- suspension began) and lead time before release. Until the notification outbox exists these
-- are recorded by `arrears facts release-warning`.
CREATE TABLE release_warnings (
  account_id    text NOT NULL REFERENCES accounts (id),
  period        timestamptz NOT NULL,
  lead_seconds  integer NOT NULL CHECK (lead_seconds > 0),
  accepted_at   timestamptz NOT NULL,
  PRIMARY KEY (account_id, period, lead_seconds)
);

-- Orders for the products' control planes (suspend, restore, release = delete the data).
-- Recorded in the transaction of the state change; delivered by the notifications work.
CREATE TABLE control_plane_orders (
  account_id   text NOT NULL REFERENCES accounts (id),
  id           bigint GENERATED ALWAYS AS IDENTITY,
  resource_id  text NOT NULL,
  product      text NOT NULL,
  kind         text NOT NULL CHECK (kind IN ('suspend', 'restore', 'release')),
  reason       text,
  cause        text NOT NULL,
  created_at   timestamptz NOT NULL,
  PRIMARY KEY (account_id, id)
);
CREATE TRIGGER control_plane_orders_append_only BEFORE UPDATE OR DELETE ON control_plane_orders
  FOR EACH ROW EXECUTE FUNCTION arrears_refuse_change();

-- Resources are never deleted: a released resource stays as its own tombstone.
CREATE FUNCTION arrears_refuse_resource_delete() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  RAISE EXCEPTION 'resources are kept as tombstones: DELETE refused' USING ERRCODE = 'insufficient_privilege';
END $$;
CREATE TRIGGER resources_keep_tombstones BEFORE DELETE ON resources
  FOR EACH ROW EXECUTE FUNCTION arrears_refuse_resource_delete();

CREATE INDEX resources_suspended ON resources (suspended_at) WHERE state = 'suspended';
CREATE INDEX accounts_not_good ON accounts (id) WHERE state <> 'good';
