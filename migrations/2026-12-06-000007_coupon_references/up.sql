-- A coupon grant may carry the operator's reference (`coupon grant ... --reference REF`), so
-- that a grant retried after a timeout or a lost reply grants once: the same reference with
-- the same account, kind, amount and expiry replays the first grant; with anything else it
-- is refused. Unique across the deployment; grants without one (NULL) are not constrained.
ALTER TABLE coupons ADD COLUMN reference text UNIQUE;
