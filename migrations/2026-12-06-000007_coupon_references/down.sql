ALTER TABLE coupons DROP COLUMN reference;
