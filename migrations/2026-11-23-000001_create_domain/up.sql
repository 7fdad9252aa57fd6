-- The whole billing domain of PRODUCT.md §2.
--
-- Conventions:
--  * every business table carries account_id and every primary/unique key over business rows
--    includes it, so the schema can be distributed by account_id unchanged;
--  * money is bigint in the currency's minor unit (cents for 2-digit currencies);
--    metered quantities are bigint micro-units (1e-6); unit prices are bigint nano-units of
--    currency per unit (1e-9). See src/domain/money.rs for the rounding rule;
--  * instants are timestamptz; `*_at` business instants come from the job's `as_of`,
--    `recorded_at` columns are the wall clock of the database for audit only;
--  * financial records (usage, bills, bill lines, ledger) are append-only: triggers below
--    refuse UPDATE/DELETE on them.

CREATE FUNCTION arrears_refuse_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  RAISE EXCEPTION '% is append-only: % refused', TG_TABLE_NAME, TG_OP
    USING ERRCODE = 'insufficient_privilege';
END $$;

CREATE TABLE accounts (
  id                     text PRIMARY KEY CHECK (id <> ''),
  name                   text NOT NULL,
  email                  text,
  phone                  text,
  locale                 text NOT NULL DEFAULT 'en',
  timezone               text NOT NULL DEFAULT 'UTC',
  -- always equals sum(ledger_entries.amount) of the account
  cash_balance           bigint NOT NULL DEFAULT 0,
  credit_quota           bigint NOT NULL DEFAULT 0 CHECK (credit_quota >= 0),
  low_balance_threshold  bigint,
  state                  text NOT NULL DEFAULT 'good'
                         CHECK (state IN ('good', 'in_arrears', 'suspended', 'compliance_locked')),
  compliance_locked      boolean NOT NULL DEFAULT false,
  legal_hold             boolean NOT NULL DEFAULT false,
  arrears_since          timestamptz,
  suspended_at           timestamptz,
  first_overdue_alert_at timestamptz,
  -- Billing mark: every usage record of this account with usage_day <= billed_through_day
  -- and seq <= billed_through_seq is billed (see src/jobs/generate_bills.rs).
  billed_through_day     date,
  billed_through_seq     bigint NOT NULL DEFAULT 0,
  created_at             timestamptz NOT NULL,
  updated_at             timestamptz NOT NULL
);

CREATE TABLE coupons (
  account_id  text NOT NULL REFERENCES accounts (id),
  id          bigint GENERATED ALWAYS AS IDENTITY,
  kind        text NOT NULL CHECK (kind IN ('general', 'cash')),
  amount      bigint NOT NULL CHECK (amount > 0),
  remaining   bigint NOT NULL CHECK (remaining >= 0 AND remaining <= amount),
  expires_at  timestamptz NOT NULL,
  granted_at  timestamptz NOT NULL,
  PRIMARY KEY (account_id, id)
);

CREATE TABLE prices (
  product           text NOT NULL,
  meter             text NOT NULL,
  unit              text NOT NULL,
  unit_price_nanos  bigint NOT NULL CHECK (unit_price_nanos >= 0),
  -- the product's package meter: package resources draw it from their included quota
  is_package_meter  boolean NOT NULL DEFAULT false,
  PRIMARY KEY (product, meter)
);

CREATE TABLE resources (
  account_id          text NOT NULL REFERENCES accounts (id),
  id                  text NOT NULL CHECK (id <> ''),
  product             text NOT NULL,
  billing_mode        text NOT NULL CHECK (billing_mode IN ('prepaid', 'pay_per_use', 'package')),
  package_quota       bigint CHECK (package_quota >= 0),
  package_used        bigint NOT NULL DEFAULT 0 CHECK (package_used >= 0),
  package_expires_at  timestamptz,
  payg_enabled        boolean NOT NULL DEFAULT false,
  term_ends_at        timestamptz,
  state               text NOT NULL DEFAULT 'active' CHECK (state IN ('active', 'suspended', 'released')),
  state_reason        text CHECK (state_reason IN ('arrears', 'quota_exhausted', 'package_expired', 'compliance', 'unsubscribed')),
  suspended_at        timestamptz,
  released_at         timestamptz,
  unsubscribed_at     timestamptz,
  created_at          timestamptz NOT NULL,
  updated_at          timestamptz NOT NULL,
  PRIMARY KEY (account_id, id),
  CHECK (billing_mode <> 'package' OR package_quota IS NOT NULL)
);

-- No foreign key to resources: the import validates references in bulk before inserting,
-- and a per-row FK probe would halve the bulk import rate.
CREATE TABLE usage_records (
  account_id   text NOT NULL,
  event_id     text NOT NULL,
  resource_id  text NOT NULL,
  meter        text NOT NULL,
  quantity     bigint NOT NULL CHECK (quantity >= 0),
  started_at   timestamptz NOT NULL,
  ended_at     timestamptz NOT NULL CHECK (ended_at >= started_at),
  -- billing day (billing time zone) of ended_at: the day whose bill normally carries it
  usage_day    date NOT NULL,
  -- Arrival order. No sequence cache on purpose: billing marks rely on values being handed
  -- out in commit-compatible order (see src/jobs/generate_bills.rs).
  seq          bigint GENERATED ALWAYS AS IDENTITY (CACHE 1),
  imported_at  timestamptz NOT NULL,
  PRIMARY KEY (account_id, event_id)
);
CREATE INDEX usage_records_seq ON usage_records USING brin (seq);
CREATE TRIGGER usage_records_append_only BEFORE UPDATE OR DELETE ON usage_records
  FOR EACH ROW EXECUTE FUNCTION arrears_refuse_change();

-- Every usage record with seq <= low_water_seq is billed; billing scans only above it.
CREATE TABLE billing_cursor (
  id             boolean PRIMARY KEY DEFAULT true CHECK (id),
  low_water_seq  bigint NOT NULL
);
INSERT INTO billing_cursor (id, low_water_seq) VALUES (true, 0);

CREATE TABLE bills (
  account_id            text NOT NULL REFERENCES accounts (id),
  bill_day              date NOT NULL,
  total                 bigint NOT NULL CHECK (total >= 0),
  paid_cash_coupons     bigint NOT NULL CHECK (paid_cash_coupons >= 0),
  paid_general_coupons  bigint NOT NULL CHECK (paid_general_coupons >= 0),
  paid_cash             bigint NOT NULL CHECK (paid_cash >= 0),
  records               integer NOT NULL,
  late_records          integer NOT NULL,
  issued_at             timestamptz NOT NULL,
  recorded_at           timestamptz NOT NULL DEFAULT now(),
  PRIMARY KEY (account_id, bill_day),
  CHECK (total = paid_cash_coupons + paid_general_coupons + paid_cash)
);
CREATE TRIGGER bills_append_only BEFORE UPDATE OR DELETE ON bills
  FOR EACH ROW EXECUTE FUNCTION arrears_refuse_change();

CREATE TABLE bill_lines (
  account_id         text NOT NULL,
  bill_day           date NOT NULL,
  resource_id        text NOT NULL,
  meter              text NOT NULL,
  records            integer NOT NULL,
  quantity           bigint NOT NULL,
  -- drawn from the package's included quota
  included_quantity  bigint NOT NULL,
  -- charged at the unit price
  billed_quantity    bigint NOT NULL,
  -- package overage with pay-as-you-go off: recorded, not charged
  unbilled_quantity  bigint NOT NULL,
  unit_price_nanos   bigint NOT NULL,
  amount             bigint NOT NULL CHECK (amount >= 0),
  PRIMARY KEY (account_id, bill_day, resource_id, meter),
  FOREIGN KEY (account_id, bill_day) REFERENCES bills (account_id, bill_day),
  CHECK (quantity = included_quantity + billed_quantity + unbilled_quantity)
);
CREATE TRIGGER bill_lines_append_only BEFORE UPDATE OR DELETE ON bill_lines
  FOR EACH ROW EXECUTE FUNCTION arrears_refuse_change();

CREATE TABLE ledger_entries (
  account_id    text NOT NULL REFERENCES accounts (id),
  id            bigint GENERATED ALWAYS AS IDENTITY,
  kind          text NOT NULL CHECK (kind IN ('opening_balance', 'charge', 'coupon_use', 'topup', 'adjustment')),
  amount        bigint NOT NULL,
  bill_day      date,
  coupon_id     bigint,
  reference     text,
  effective_at  timestamptz NOT NULL,
  recorded_at   timestamptz NOT NULL DEFAULT now(),
  PRIMARY KEY (account_id, id)
);
CREATE UNIQUE INDEX ledger_entries_topup_reference ON ledger_entries (account_id, reference) WHERE kind = 'topup';
CREATE UNIQUE INDEX ledger_entries_charge_day ON ledger_entries (account_id, bill_day) WHERE kind = 'charge';
CREATE TRIGGER ledger_entries_append_only BEFORE UPDATE OR DELETE ON ledger_entries
  FOR EACH ROW EXECUTE FUNCTION arrears_refuse_change();

-- The audit trail: every state change of an account or resource.
CREATE TABLE lifecycle_events (
  account_id   text NOT NULL REFERENCES accounts (id),
  id           bigint GENERATED ALWAYS AS IDENTITY,
  resource_id  text,
  from_state   text NOT NULL,
  to_state     text NOT NULL,
  reason       text NOT NULL,
  cause        text NOT NULL,
  occurred_at  timestamptz NOT NULL,
  recorded_at  timestamptz NOT NULL DEFAULT now(),
  PRIMARY KEY (account_id, id)
);
CREATE TRIGGER lifecycle_events_append_only BEFORE UPDATE OR DELETE ON lifecycle_events
  FOR EACH ROW EXECUTE FUNCTION arrears_refuse_change();

CREATE TABLE job_runs (
  job          text NOT NULL,
  slot         timestamptz NOT NULL,
  status       text NOT NULL CHECK (status IN ('running', 'succeeded', 'failed')),
  attempts     integer NOT NULL DEFAULT 1,
  as_of        timestamptz NOT NULL,
  started_at   timestamptz NOT NULL,
  finished_at  timestamptz,
  report       jsonb,
  error        text,
  PRIMARY KEY (job, slot)
);
