//! Lifecycle policies of products (PRODUCT.md §1, §3). Policies are configuration: the two
//! shipped products `lcic` and `sa` differ only in the values below.

use std::fmt;
use std::str::FromStr;

use chrono::Duration;
use serde::{Deserialize, Serialize};

/// When the grace period of R2 starts counting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GraceStart {
    /// lcic: from the first overdue alert that a channel accepted.
    FirstOverdueAlert,
    /// sa: from the start of arrears.
    ArrearsStart,
}

/// Which resources R3 suspends when grace ends unpaid.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SuspendScope {
    /// lcic: every resource of the account, packages and prepaid included.
    AllResources,
    /// sa: pay-per-use resources freeze; prepaid ones keep running until their term ends.
    PayPerUseOnly,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    pub grace_starts: GraceStart,
    pub grace: PolicyDuration,
    pub retention: PolicyDuration,
    pub suspend_scope: SuspendScope,
    /// R6: whether resources suspended for quota_exhausted / package_expired are released
    /// after the retention period too.
    #[serde(default)]
    pub release_non_arrears_suspensions: bool,
    /// Overdue reminders after the first alert, every this long.
    pub overdue_reminder_every: PolicyDuration,
    /// Release warnings go out this long before release (R8 default: 7 days and 1 day).
    pub release_warnings: Vec<PolicyDuration>,
}

impl Policy {
    /// The rules a policy must keep beyond its types: the key (under the policy) and why, for
    /// the configuration and for `simulate`'s override files alike.
    pub fn check(&self) -> Result<(), (&'static str, &'static str)> {
        if self.release_warnings.is_empty() {
            return Err(("release_warnings", "at least one warning is required (R9)"));
        }
        if self.release_warnings.iter().any(|w| *w >= self.retention) {
            return Err((
                "release_warnings",
                "every warning must come before the end of retention",
            ));
        }
        Ok(())
    }
}

/// A positive duration written as `<n><unit>` with unit `s`, `m`, `h` or `d` ("24h", "15d").
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct PolicyDuration(pub i64);

impl PolicyDuration {
    pub fn seconds(self) -> i64 {
        self.0
    }

    pub fn to_chrono(self) -> Duration {
        Duration::seconds(self.0)
    }

    pub fn std(self) -> std::time::Duration {
        std::time::Duration::from_secs(self.0.max(0) as u64)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a duration: write a positive whole number and a unit s, m, h or d (\"24h\", \"15d\")")]
pub struct DurationError(pub String);

impl FromStr for PolicyDuration {
    type Err = DurationError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || DurationError(s.to_string());
        let s = s.trim();
        let split = s.len().checked_sub(1).ok_or_else(err)?;
        let (n, unit) = s.split_at(split);
        let n: i64 = n.parse().map_err(|_| err())?;
        let mult = match unit {
            "s" => 1,
            "m" => 60,
            "h" => 3600,
            "d" => 86_400,
            _ => return Err(err()),
        };
        if n <= 0 {
            return Err(err());
        }
        n.checked_mul(mult).map(PolicyDuration).ok_or_else(err)
    }
}

impl fmt::Display for PolicyDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = self.0;
        // Whole days from two days up; "24h" reads better than "1d" for a grace period.
        if s % 86_400 == 0 && s >= 2 * 86_400 {
            write!(f, "{}d", s / 86_400)
        } else if s % 3600 == 0 {
            write!(f, "{}h", s / 3600)
        } else if s % 60 == 0 {
            write!(f, "{}m", s / 60)
        } else {
            write!(f, "{s}s")
        }
    }
}

impl Serialize for PolicyDuration {
    fn serialize<S: serde::Serializer>(&self, ser: S) -> Result<S::Ok, S::Error> {
        ser.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for PolicyDuration {
    fn deserialize<D: serde::Deserializer<'de>>(de: D) -> Result<Self, D::Error> {
        let s = String::deserialize(de)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_and_print() {
        let cases = [
            ("24h", Some(86_400)),
            ("15d", Some(1_296_000)),
            ("90m", Some(5400)),
            ("30s", Some(30)),
            ("0h", None),
            ("-1d", None),
            ("h", None),
            ("", None),
            ("1w", None),
            ("1.5h", None),
        ];
        for (input, want) in cases {
            assert_eq!(
                input.parse::<PolicyDuration>().ok().map(|d| d.seconds()),
                want,
                "{input:?}"
            );
        }
        assert_eq!(PolicyDuration(86_400).to_string(), "24h");
        assert_eq!(PolicyDuration(15 * 86_400).to_string(), "15d");
        assert_eq!(PolicyDuration(5400).to_string(), "90m");
    }
}
