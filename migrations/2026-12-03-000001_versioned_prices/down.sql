DROP FUNCTION prices_at(timestamptz);
DROP TRIGGER prices_append_only ON prices;
-- the latest version of each price stays, as the one price list of the old schema
CREATE TEMP TABLE latest_prices AS
  SELECT DISTINCT ON (product, meter) product, meter, unit, unit_price_nanos, is_package_meter, retired
  FROM prices ORDER BY product, meter, effective_from DESC;
DELETE FROM prices;
ALTER TABLE prices DROP CONSTRAINT prices_pkey;
ALTER TABLE prices DROP COLUMN effective_from, DROP COLUMN retired, DROP COLUMN applied_at;
INSERT INTO prices SELECT product, meter, unit, unit_price_nanos, is_package_meter FROM latest_prices WHERE NOT retired;
ALTER TABLE prices ADD PRIMARY KEY (product, meter);
