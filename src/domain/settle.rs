//! Settling a bill: cash coupons first, then general cash coupons, then cash (PRODUCT.md §2),
//! and the arrears test of rule R1.

use chrono::{DateTime, Utc};
use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CouponKind {
    /// Used first.
    Cash,
    /// Used after cash coupons.
    General,
}

impl CouponKind {
    pub fn as_str(self) -> &'static str {
        match self {
            CouponKind::Cash => "cash",
            CouponKind::General => "general",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "cash" => Some(CouponKind::Cash),
            "general" => Some(CouponKind::General),
            _ => None,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Coupon {
    pub id: i64,
    pub kind: CouponKind,
    pub remaining: i64,
    pub expires_at: DateTime<Utc>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Settlement {
    pub paid_cash_coupons: i64,
    pub paid_general_coupons: i64,
    pub paid_cash: i64,
    /// (coupon id, amount drawn), in the order drawn.
    pub coupon_uses: Vec<(i64, i64)>,
}

/// Settles `total` (minor units, >= 0) at instant `at`: coupons that have not expired at `at`
/// are drawn by kind (cash, then general), then by soonest expiry, then by id; whatever is
/// left is paid in cash, which may drive the cash balance negative.
pub fn settle(total: i64, coupons: &[Coupon], at: DateTime<Utc>) -> Settlement {
    let mut usable: Vec<&Coupon> = coupons
        .iter()
        .filter(|c| c.expires_at > at && c.remaining > 0)
        .collect();
    usable.sort_by_key(|c| (c.kind, c.expires_at, c.id));
    let mut due = total.max(0);
    let mut s = Settlement::default();
    for c in usable {
        if due == 0 {
            break;
        }
        let draw = due.min(c.remaining);
        due -= draw;
        match c.kind {
            CouponKind::Cash => s.paid_cash_coupons += draw,
            CouponKind::General => s.paid_general_coupons += draw,
        }
        s.coupon_uses.push((c.id, draw));
    }
    s.paid_cash = due;
    s
}

/// R1: an account is in arrears when cash + credit quota is below zero.
pub fn is_in_arrears(cash_balance: i64, credit_quota: i64) -> bool {
    i128::from(cash_balance) + i128::from(credit_quota) < 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn at(day: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 11, day, 0, 0, 0).unwrap()
    }

    fn coupon(id: i64, kind: CouponKind, remaining: i64, expires_day: u32) -> Coupon {
        Coupon {
            id,
            kind,
            remaining,
            expires_at: at(expires_day),
        }
    }

    #[test]
    fn cash_coupons_then_general_then_cash() {
        let coupons = [
            coupon(1, CouponKind::General, 500, 30),
            coupon(2, CouponKind::Cash, 300, 30),
        ];
        let s = settle(1000, &coupons, at(10));
        assert_eq!(s.paid_cash_coupons, 300);
        assert_eq!(s.paid_general_coupons, 500);
        assert_eq!(s.paid_cash, 200);
        assert_eq!(s.coupon_uses, vec![(2, 300), (1, 500)]);
    }

    #[test]
    fn expired_coupons_are_not_used_and_soonest_expiry_goes_first() {
        let coupons = [
            coupon(1, CouponKind::Cash, 500, 10), // expires exactly at the settlement instant
            coupon(2, CouponKind::Cash, 500, 20),
            coupon(3, CouponKind::Cash, 500, 15),
        ];
        let s = settle(700, &coupons, at(10));
        assert_eq!(s.coupon_uses, vec![(3, 500), (2, 200)]);
        assert_eq!(s.paid_cash, 0);
    }

    #[test]
    fn zero_total_draws_nothing() {
        let s = settle(0, &[coupon(1, CouponKind::Cash, 5, 30)], at(1));
        assert_eq!(s, Settlement::default());
    }

    #[test]
    fn arrears_is_cash_plus_credit_below_zero() {
        let cases = [
            (0, 0, false),
            (-1, 0, true),
            (-100, 100, false),
            (-101, 100, true),
            (5, 0, false),
        ];
        for (cash, credit, want) in cases {
            assert_eq!(
                is_in_arrears(cash, credit),
                want,
                "cash {cash} credit {credit}"
            );
        }
    }
}
