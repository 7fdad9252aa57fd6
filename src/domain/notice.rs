//! The kinds of notice (R8): customer notices (email and SMS from templates) and the events
//! for the products' control planes (webhooks). Pure names, shared by the lifecycle rules
//! that decide notices and the outbox that delivers them.

use serde::Serialize;

/// Every kind of notice: customer notices (email and SMS from templates) and control-plane
/// events (webhooks).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum NoticeKind {
    Overdue,
    OverdueReminder,
    SuspensionImminent,
    Suspended,
    ReleaseWarning,
    Released,
    Restored,
    BalanceLow,
    PackageExhausted,
    PackageExpired,
    #[serde(rename = "resource.suspended")]
    ResourceSuspended,
    #[serde(rename = "resource.restored")]
    ResourceRestored,
    #[serde(rename = "resource.released")]
    ResourceReleased,
    #[serde(rename = "account.state_changed")]
    AccountStateChanged,
}

impl NoticeKind {
    pub const ALL: &'static [NoticeKind] = &[
        NoticeKind::Overdue,
        NoticeKind::OverdueReminder,
        NoticeKind::SuspensionImminent,
        NoticeKind::Suspended,
        NoticeKind::ReleaseWarning,
        NoticeKind::Released,
        NoticeKind::Restored,
        NoticeKind::BalanceLow,
        NoticeKind::PackageExhausted,
        NoticeKind::PackageExpired,
        NoticeKind::ResourceSuspended,
        NoticeKind::ResourceRestored,
        NoticeKind::ResourceReleased,
        NoticeKind::AccountStateChanged,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            NoticeKind::Overdue => "overdue",
            NoticeKind::OverdueReminder => "overdue_reminder",
            NoticeKind::SuspensionImminent => "suspension_imminent",
            NoticeKind::Suspended => "suspended",
            NoticeKind::ReleaseWarning => "release_warning",
            NoticeKind::Released => "released",
            NoticeKind::Restored => "restored",
            NoticeKind::BalanceLow => "balance_low",
            NoticeKind::PackageExhausted => "package_exhausted",
            NoticeKind::PackageExpired => "package_expired",
            NoticeKind::ResourceSuspended => "resource.suspended",
            NoticeKind::ResourceRestored => "resource.restored",
            NoticeKind::ResourceReleased => "resource.released",
            NoticeKind::AccountStateChanged => "account.state_changed",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        NoticeKind::ALL.iter().copied().find(|k| k.as_str() == s)
    }

    /// The template folder name.
    pub fn template(self) -> &'static str {
        self.as_str()
    }

    pub fn is_webhook(self) -> bool {
        self.as_str().contains('.')
    }
}
