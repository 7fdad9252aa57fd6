//! Billing days: calendar days in the deployment's billing time zone.

use chrono::{DateTime, Duration, NaiveDate, TimeZone, Utc};
use chrono_tz::Tz;

/// The billing day that contains instant `t`.
pub fn billing_day_of(t: DateTime<Utc>, tz: Tz) -> NaiveDate {
    t.with_timezone(&tz).date_naive()
}

/// The default billing day for a run at `as_of`: the day before the one containing `as_of`
/// (bills are generated T+1).
pub fn default_billing_day(as_of: DateTime<Utc>, tz: Tz) -> NaiveDate {
    billing_day_of(as_of, tz) - Duration::days(1)
}

/// The first instant of `day` in `tz`. Midnight may not exist (a DST change at 00:00), in
/// which case the day starts at the first instant that does.
pub fn start_of_day(day: NaiveDate, tz: Tz) -> DateTime<Utc> {
    let mut naive = day.and_hms_opt(0, 0, 0).expect("midnight is a valid time");
    for _ in 0..4 {
        if let Some(t) = tz.from_local_datetime(&naive).earliest() {
            return t.with_timezone(&Utc);
        }
        naive += Duration::minutes(30);
    }
    // No zone skips more than two hours; fall back to UTC midnight rather than panic.
    Utc.from_utc_datetime(&day.and_hms_opt(0, 0, 0).expect("midnight"))
}

/// The first instant after `day` in `tz`.
pub fn end_of_day(day: NaiveDate, tz: Tz) -> DateTime<Utc> {
    start_of_day(day + Duration::days(1), tz)
}

/// "2026-11-23 14:00 (Asia/Shanghai)": an instant as an account in zone `tz` reads it (UTC when
/// the zone is unknown).
pub fn format_instant(t: DateTime<Utc>, tz: &str) -> String {
    match tz.parse::<Tz>() {
        Ok(z) => format!("{} ({tz})", t.with_timezone(&z).format("%Y-%m-%d %H:%M")),
        Err(_) => format!("{} (UTC)", t.format("%Y-%m-%d %H:%M")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn billing_day_follows_the_billing_zone() {
        let tz: Tz = "Asia/Shanghai".parse().unwrap();
        // 2026-11-22 16:30 UTC is 2026-11-23 00:30 in Shanghai.
        let t = Utc.with_ymd_and_hms(2026, 11, 22, 16, 30, 0).unwrap();
        assert_eq!(
            billing_day_of(t, tz),
            NaiveDate::from_ymd_opt(2026, 11, 23).unwrap()
        );
        assert_eq!(
            default_billing_day(t, tz),
            NaiveDate::from_ymd_opt(2026, 11, 22).unwrap()
        );
        let d = NaiveDate::from_ymd_opt(2026, 11, 22).unwrap();
        assert_eq!(
            start_of_day(d, tz),
            Utc.with_ymd_and_hms(2026, 11, 21, 16, 0, 0).unwrap()
        );
        assert_eq!(
            end_of_day(d, tz),
            Utc.with_ymd_and_hms(2026, 11, 22, 16, 0, 0).unwrap()
        );
    }

    #[test]
    fn day_without_midnight_starts_at_first_valid_instant() {
        // America/Santiago skips 00:00-01:00 on its spring-forward day (2026-09-06).
        let tz: Tz = "America/Santiago".parse().unwrap();
        let d = NaiveDate::from_ymd_opt(2026, 9, 6).unwrap();
        let start = start_of_day(d, tz);
        assert_eq!(billing_day_of(start, tz), d);
        assert_eq!(
            billing_day_of(start - Duration::seconds(1), tz),
            d - Duration::days(1)
        );
    }
}
