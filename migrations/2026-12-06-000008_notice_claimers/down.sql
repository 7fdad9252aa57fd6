ALTER TABLE notices DROP COLUMN claimed_by;
