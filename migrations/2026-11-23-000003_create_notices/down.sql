ALTER TABLE accounts DROP COLUMN balance_alert_armed;
DROP TABLE notices;
