-- Every amount in the database is an integer count of the deployment currency's minor unit
-- (bigint: balances, bills, the ledger, prices as nanos of a unit). The configuration names
-- the currency and its digits; a configuration with other ones would read 79.90 CNY as 7990
-- JPY and top up in the wrong unit. The first price list applied pins them here (`migrate`,
-- `prices apply`, the service's start, the embedded database's first use); from then on every
-- command refuses a configuration that disagrees.
CREATE TABLE money_settings (
  id                 boolean PRIMARY KEY DEFAULT true CHECK (id),
  currency           text NOT NULL,
  minor_unit_digits  integer NOT NULL,
  pinned_at          timestamptz NOT NULL
);
