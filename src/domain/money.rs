//! Exact money and quantities: parsing decimal strings, formatting, and the rounding rule.
//!
//! Representations (all integers, never floating point):
//! - money: `i64` in the currency's minor unit (`10^-digits`, digits from configuration,
//!   2 for CNY/USD/EUR);
//! - quantities of a meter: `i64` micro-units (`10^-6`);
//! - unit prices: `i64` nano-units of currency per unit of the meter (`10^-9`).
//!
//! **Rounding rule.** A bill line's amount is `quantity x unit price` computed exactly, then
//! rounded once to the minor unit, half away from zero (0.005 -> 0.01, 0.0049 -> 0.00).
//! The bill total is the sum of its rounded lines; settlement moves whole minor units only, so
//! no later step rounds again. The SQL in `jobs::generate_bills` implements the same rule with
//! PostgreSQL's `round(numeric)`, which also rounds half away from zero; a test checks that
//! both agree.

use std::fmt;

/// Decimal places of a metered quantity.
pub const QUANTITY_DIGITS: u32 = 6;
/// Decimal places of a unit price.
pub const PRICE_DIGITS: u32 = 9;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecimalError {
    #[error("empty value")]
    Empty,
    #[error("{0:?} is not a decimal number")]
    NotANumber(String),
    #[error("{value:?} has more than {digits} decimal places")]
    TooPrecise { value: String, digits: u32 },
    #[error("{0:?} is too large")]
    TooLarge(String),
    #[error("{0:?} is negative")]
    Negative(String),
    #[error("{value:?} is out of range (at most {max} in magnitude)")]
    OutOfRange { value: String, max: String },
}

/// The largest magnitude of an amount or quantity that comes in (an import, a top-up, a
/// coupon), scaled (10^15: 10 trillion in a currency of two decimals, a billion units of a
/// quantity of six): far beyond any real balance or record, and far enough below i64's limit
/// that the sums billing and the reports make of them stay exact.
pub const MAX_SCALED: i64 = 1_000_000_000_000_000;

/// `v` (scaled by `digits`, parsed from `input`) if its magnitude is at most [`MAX_SCALED`].
pub fn bounded(input: &str, v: i64, digits: u32) -> Result<i64, DecimalError> {
    if v.unsigned_abs() <= MAX_SCALED as u64 {
        Ok(v)
    } else {
        Err(DecimalError::OutOfRange {
            value: input.trim().to_string(),
            max: format_scaled(MAX_SCALED, digits),
        })
    }
}

/// An amount of money that comes in (a top-up, a coupon grant): a non-negative decimal of at
/// most `digits` places, at most [`MAX_SCALED`] minor units.
pub fn parse_amount(input: &str, digits: u32) -> Result<i64, DecimalError> {
    bounded(input, parse_non_negative(input, digits)?, digits)
}

/// Parses a plain decimal string ("12.50", "-3", "0.015") into an integer scaled by
/// `10^digits`. Refuses exponents, thousands separators and more decimals than `digits`:
/// silently rounding an input amount would lose money. Hand-written, not rust_decimal: money
/// is an `i64` of minor units everywhere (and `bigint` in SQL), so a decimal type would only
/// be converted at each boundary; what is needed is this parser that refuses to round.
pub fn parse_scaled(input: &str, digits: u32) -> Result<i64, DecimalError> {
    let s = input.trim();
    if s.is_empty() {
        return Err(DecimalError::Empty);
    }
    let (negative, body) = match s.as_bytes()[0] {
        b'-' => (true, &s[1..]),
        b'+' => (false, &s[1..]),
        _ => (false, s),
    };
    let (int_part, frac_part) = match body.split_once('.') {
        Some((i, f)) => (i, f),
        None => (body, ""),
    };
    let all_digits = |p: &str| p.bytes().all(|b| b.is_ascii_digit());
    if (int_part.is_empty() && frac_part.is_empty())
        || !all_digits(int_part)
        || !all_digits(frac_part)
    {
        return Err(DecimalError::NotANumber(input.to_string()));
    }
    if body.ends_with('.') && frac_part.is_empty() && int_part.is_empty() {
        return Err(DecimalError::NotANumber(input.to_string()));
    }
    let frac_trimmed = frac_part.trim_end_matches('0');
    if frac_trimmed.len() as u32 > digits {
        return Err(DecimalError::TooPrecise {
            value: input.to_string(),
            digits,
        });
    }
    let too_large = || DecimalError::TooLarge(input.to_string());
    let mut value: i128 = 0;
    for b in int_part.bytes() {
        value = value * 10 + i128::from(b - b'0');
        if value > i128::from(i64::MAX) {
            return Err(too_large());
        }
    }
    for i in 0..digits as usize {
        let d = frac_trimmed.as_bytes().get(i).map_or(0, |b| b - b'0');
        value = value * 10 + i128::from(d);
    }
    if negative {
        value = -value;
    }
    i64::try_from(value).map_err(|_| too_large())
}

/// Like [`parse_scaled`] but refuses negative values.
pub fn parse_non_negative(input: &str, digits: u32) -> Result<i64, DecimalError> {
    let v = parse_scaled(input, digits)?;
    if v < 0 {
        return Err(DecimalError::Negative(input.to_string()));
    }
    Ok(v)
}

/// Formats an integer scaled by `10^digits` as a plain decimal string with exactly `digits`
/// decimals ("-12.50").
pub fn format_scaled(value: i64, digits: u32) -> String {
    if digits == 0 {
        return value.to_string();
    }
    let scale = 10u64.pow(digits);
    let abs = value.unsigned_abs();
    let sign = if value < 0 { "-" } else { "" };
    format!(
        "{sign}{}.{:0width$}",
        abs / scale,
        abs % scale,
        width = digits as usize
    )
}

/// Formats a quantity (micro-units) with trailing zeros removed ("1.5", "120").
pub fn format_quantity(micros: i64) -> String {
    let s = format_scaled(micros, QUANTITY_DIGITS);
    let s = s.trim_end_matches('0');
    s.trim_end_matches('.').to_string()
}

/// Divides `n` by `d` (> 0), rounding half away from zero.
pub fn div_round_half_away(n: i128, d: i128) -> i128 {
    debug_assert!(d > 0);
    let q = n / d;
    let r = n % d;
    if 2 * r.abs() >= d {
        q + n.signum()
    } else {
        q
    }
}

/// The amount of a bill line in minor units: `quantity (micro) x unit price (nano)`, rounded
/// once, half away from zero, to `money_digits` decimals.
pub fn line_amount(quantity_micros: i64, unit_price_nanos: i64, money_digits: u32) -> i64 {
    let exact = i128::from(quantity_micros) * i128::from(unit_price_nanos);
    let divisor = 10i128.pow(QUANTITY_DIGITS + PRICE_DIGITS - money_digits);
    let rounded = div_round_half_away(exact, divisor);
    i64::try_from(rounded).unwrap_or(if rounded > 0 { i64::MAX } else { i64::MIN })
}

/// Money with its scale, for display in reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Money {
    pub minor: i64,
    pub digits: u32,
}

impl fmt::Display for Money {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&format_scaled(self.minor, self.digits))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_decimal_strings_exactly() {
        let cases: &[(&str, u32, Result<i64, ()>)] = &[
            ("12.50", 2, Ok(1250)),
            ("12.5", 2, Ok(1250)),
            ("12", 2, Ok(1200)),
            ("-3.07", 2, Ok(-307)),
            ("+1.00", 2, Ok(100)),
            ("0.015", 2, Err(())),
            ("0.0150", 3, Ok(15)),
            (".5", 2, Ok(50)),
            ("1.", 2, Ok(100)),
            ("", 2, Err(())),
            ("abc", 2, Err(())),
            ("1e3", 2, Err(())),
            ("1,000.00", 2, Err(())),
            ("-", 2, Err(())),
            (".", 2, Err(())),
            ("99999999999999999999", 2, Err(())),
            ("1.5", 6, Ok(1_500_000)),
            ("0.000001", 6, Ok(1)),
            ("0.0000001", 6, Err(())),
        ];
        for (input, digits, want) in cases {
            let got = parse_scaled(input, *digits).map_err(|_| ());
            assert_eq!(&got, want, "parse_scaled({input:?}, {digits})");
        }
    }

    #[test]
    fn refuses_negative_where_required() {
        assert!(matches!(
            parse_non_negative("-0.01", 2),
            Err(DecimalError::Negative(_))
        ));
        assert_eq!(parse_non_negative("0", 2), Ok(0));
    }

    #[test]
    fn formats_with_fixed_digits() {
        assert_eq!(format_scaled(1250, 2), "12.50");
        assert_eq!(format_scaled(-5, 2), "-0.05");
        assert_eq!(format_scaled(0, 2), "0.00");
        assert_eq!(format_scaled(7, 0), "7");
        assert_eq!(format_quantity(1_500_000), "1.5");
        assert_eq!(format_quantity(120_000_000), "120");
    }

    #[test]
    fn line_amount_rounds_half_away_from_zero_once() {
        // (quantity, unit price, expected cents)
        let cases: &[(&str, &str, i64)] = &[
            ("1", "0.005", 1),           // exactly half a cent rounds up
            ("1", "0.0049", 0),          // below half rounds down
            ("3", "0.0016", 0),          // 0.0048
            ("3", "0.0017", 1),          // 0.0051
            ("100", "0.015", 150),       // exact
            ("0.5", "0.01", 1),          // 0.005 -> 0.01
            ("1.5", "1.333333333", 200), // 1.9999999995 -> 2.00
            ("60", "0.0125", 75),
            ("0", "5", 0),
        ];
        for (q, p, want) in cases {
            let q = parse_scaled(q, QUANTITY_DIGITS).unwrap();
            let p = parse_scaled(p, PRICE_DIGITS).unwrap();
            assert_eq!(line_amount(q, p, 2), *want, "{q} x {p}");
        }
        assert_eq!(div_round_half_away(-5, 10), -1);
        assert_eq!(div_round_half_away(-4, 10), 0);
    }

    #[test]
    fn rounding_per_line_not_per_record() {
        // Three records of 1 unit at 0.004: rated as one line of 3 units -> 0.012 -> 0.01,
        // not three lines of 0.00 each.
        let p = parse_scaled("0.004", PRICE_DIGITS).unwrap();
        assert_eq!(line_amount(3_000_000, p, 2), 1);
    }
}
