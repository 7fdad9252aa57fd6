-- Price lists become versioned data: each (product, meter) has a history of prices, each in
-- effect from an instant until the next version. `arrears prices apply` writes a version; no
-- other command touches the table. The prices present before this migration were the whole
-- price list since the beginning: they stay in effect from the beginning of time.
ALTER TABLE prices DROP CONSTRAINT prices_pkey;
ALTER TABLE prices
  ADD COLUMN effective_from timestamptz NOT NULL DEFAULT '0001-01-01 00:00:00+00',
  -- the meter is no longer priced from effective_from: usage of it is left unbilled
  ADD COLUMN retired boolean NOT NULL DEFAULT false,
  ADD COLUMN applied_at timestamptz NOT NULL DEFAULT now();
ALTER TABLE prices ALTER COLUMN effective_from DROP DEFAULT;
ALTER TABLE prices ADD PRIMARY KEY (product, meter, effective_from);
CREATE TRIGGER prices_append_only BEFORE UPDATE OR DELETE ON prices
  FOR EACH ROW EXECUTE FUNCTION arrears_refuse_change();

-- The price list in effect at an instant: the latest version of each (product, meter) from
-- at or before `at`, without the retired ones. Inlined by the planner (a SQL function).
CREATE FUNCTION prices_at(at timestamptz)
RETURNS TABLE (product text, meter text, unit text, unit_price_nanos bigint, is_package_meter boolean)
LANGUAGE sql STABLE AS $$
  SELECT v.product, v.meter, v.unit, v.unit_price_nanos, v.is_package_meter
  FROM (SELECT DISTINCT ON (p.product, p.meter) p.*
        FROM prices p WHERE p.effective_from <= at
        ORDER BY p.product, p.meter, p.effective_from DESC) v
  WHERE NOT v.retired
$$;
