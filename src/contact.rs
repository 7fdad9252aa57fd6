//! What every layer needs to know about reaching a customer, and nothing else: the locales
//! notices are written in, and the masking of contact data for logs. Its own module so that
//! configuration, templates, delivery and imports can all use it without depending on each
//! other (it used to live in `import`, which made templates depend on the importer).

/// The locales every template exists in (`templates/*/<kind>/<locale>`).
pub const LOCALES: &[&str] = &["en", "zh-CN"];

/// Masks an email address or phone number for logs: keeps the first character and the domain
/// of an address, the last two digits of a number.
pub fn mask_contact(s: &str) -> String {
    if let Some((local, domain)) = s.split_once('@') {
        let first = local.chars().next().unwrap_or('*');
        format!("{first}***@{domain}")
    } else {
        let tail: String = s
            .chars()
            .rev()
            .take(2)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        format!("***{tail}")
    }
}
