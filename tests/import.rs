//! CSV imports: atomic per file, every bad line named with its field and reason, re-imports
//! of usage are no-ops.

mod common;

use arrears::import::{import_file, ImportError, ImportKind, LineError};
use common::*;

async fn setup() -> TestDb {
    let t = TestDb::new().await;
    t.import_accounts(&["a1,Alpha,a@example.com,+8613800138000,zh-CN,Asia/Shanghai,10.00,0,5.00"])
        .await;
    t.import_resources(&[
        "r1,a1,lcic,pay_per_use,,,,",
        "pkg,a1,lcic,package,100,2026-12-31T00:00:00Z,true,",
    ])
    .await;
    t
}

fn bad_lines(e: ImportError) -> Vec<LineError> {
    match e {
        ImportError::BadRows { errors, count, .. } => {
            assert_eq!(count, errors.len());
            errors
        }
        other => panic!("expected bad rows, got {other}"),
    }
}

fn has(errors: &[LineError], line: u64, field: &str, reason_part: &str) -> bool {
    errors
        .iter()
        .any(|e| e.line == line && e.field == field && e.reason.contains(reason_part))
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_usage_file_imports_nothing_and_names_every_bad_line() {
    let t = setup().await;
    let f = csv(
        USAGE_HEADER,
        &[
            "ok1,a1,r1,classroom_minutes,10,2026-11-22T01:00:00Z,2026-11-22T02:00:00Z", // line 2: fine
            "e3,a1,r1,classroom_minutes,ten,2026-11-22T01:00:00Z,2026-11-22T02:00:00Z", // 3: bad number
            "e4,nobody,r1,classroom_minutes,1,2026-11-22T01:00:00Z,2026-11-22T02:00:00Z", // 4: unknown account
            "e5,a1,nope,classroom_minutes,1,2026-11-22T01:00:00Z,2026-11-22T02:00:00Z", // 5: unknown resource
            "e6,a1,r1,classroom_minutes,-1,2026-11-22T01:00:00Z,2026-11-22T02:00:00Z", // 6: negative
            "e7,a1,r1,classroom_minutes,1,2026-11-22T03:00:00Z,2026-11-22T02:00:00Z", // 7: end before start
            "ok1,a1,r1,classroom_minutes,10,2026-11-22T01:00:00Z,2026-11-22T02:00:00Z", // 8: duplicate of line 2
            "e9,a1,r1,classroom_minutes,1,yesterday,2026-11-22T02:00:00Z", // 9: malformed time
            "e10,a1,r1,no_such_meter,1,2026-11-22T01:00:00Z,2026-11-22T02:00:00Z", // 10: unpriced meter
            "e11,a1,r1,classroom_minutes,1,2026-11-22T01:00:00Z",                  // 11: short row
            "e12,a1,r1,classroom_minutes,1,2026-11-22T01:00:00Z,2030-01-01T00:00:00Z", // 12: future
        ],
    );
    let before = t.fingerprint().await;
    let errors = bad_lines(
        import_file(
            &t.db,
            &t.config,
            ImportKind::Usage,
            &f.path,
            at("2026-11-23T00:00:00Z"),
            false,
        )
        .await
        .unwrap_err(),
    );
    assert!(has(&errors, 3, "quantity", "not a decimal"), "{errors:#?}");
    assert!(
        has(&errors, 4, "account_id", "unknown account"),
        "{errors:#?}"
    );
    assert!(
        has(&errors, 5, "resource_id", "unknown resource"),
        "{errors:#?}"
    );
    assert!(has(&errors, 6, "quantity", "negative"), "{errors:#?}");
    assert!(
        has(&errors, 7, "ended_at", "before started_at"),
        "{errors:#?}"
    );
    assert!(has(&errors, 8, "event_id", "line 2"), "{errors:#?}");
    assert!(has(&errors, 9, "started_at", "RFC 3339"), "{errors:#?}");
    assert!(has(&errors, 10, "meter", "no price"), "{errors:#?}");
    assert!(has(&errors, 11, "record", "fields"), "{errors:#?}");
    assert!(has(&errors, 12, "ended_at", "future"), "{errors:#?}");
    assert!(
        !errors.iter().any(|e| e.line == 2),
        "line 2 is fine: {errors:#?}"
    );
    assert_eq!(before, t.fingerprint().await, "nothing imported");
}

#[tokio::test(flavor = "multi_thread")]
async fn reimporting_usage_changes_nothing() {
    let t = setup().await;
    let rows = [
        "e1,a1,r1,classroom_minutes,10,2026-11-22T01:00:00Z,2026-11-22T02:00:00Z",
        "e2,a1,pkg,classroom_minutes,1.5,2026-11-22T01:00:00Z,2026-11-22T02:00:00Z",
    ];
    let first = t.import_usage(&rows, "2026-11-23T00:00:00Z").await;
    assert_eq!((first.inserted, first.already_imported), (2, 0));
    let before = t.fingerprint().await;
    let again = t.import_usage(&rows, "2026-11-24T00:00:00Z").await;
    assert_eq!((again.inserted, again.already_imported), (0, 2));
    assert_eq!(before, t.fingerprint().await);
    // A file mixing old and new events takes only the new ones.
    let mixed = t
        .import_usage(
            &[
                rows[0],
                "e3,a1,r1,classroom_minutes,1,2026-11-22T01:00:00Z,2026-11-22T02:00:00Z",
            ],
            "2026-11-24T00:00:00Z",
        )
        .await;
    assert_eq!((mixed.inserted, mixed.already_imported), (1, 1));
    assert_eq!(t.scalar_i64("SELECT count(*) FROM usage_records").await, 3);
    assert_eq!(
        t.scalar_i64("SELECT quantity FROM usage_records WHERE event_id = 'e2'")
            .await,
        1_500_000
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_accounts_file_imports_nothing() {
    let t = TestDb::new().await;
    let f = csv(
        ACCOUNTS_HEADER,
        &[
            "a1,Alpha,a@example.com,,en,UTC,10.00,0,",
            "a2,Beta,not-an-email,,en,UTC,10.00,0,",
            "a3,Gamma,,12345,fr,Mars/Base,1.005,-5,",
            "a1,Again,,,en,UTC,0,0,",
            ",NoId,,,en,UTC,0,0,",
            // Looks like an address but the mailer (lettre) refuses it: refused here, at
            // its line, not at delivery.
            "a7,Delta,first..last@example.com,,en,UTC,0,0,",
        ],
    );
    let errors = bad_lines(
        import_file(
            &t.db,
            &t.config,
            ImportKind::Accounts,
            &f.path,
            at("2026-11-01T00:00:00Z"),
            false,
        )
        .await
        .unwrap_err(),
    );
    assert!(has(&errors, 3, "email", "not an email"), "{errors:#?}");
    assert!(has(&errors, 4, "phone", "E.164"), "{errors:#?}");
    assert!(has(&errors, 4, "locale", "fr"), "{errors:#?}");
    assert!(has(&errors, 4, "timezone", "Mars/Base"), "{errors:#?}");
    assert!(
        has(&errors, 4, "cash_balance", "decimal places"),
        "{errors:#?}"
    );
    assert!(has(&errors, 4, "credit_quota", "negative"), "{errors:#?}");
    assert!(has(&errors, 6, "id", "required"), "{errors:#?}");
    assert!(has(&errors, 5, "id", "line 2"), "{errors:#?}");
    assert!(has(&errors, 7, "email", "not an email"), "{errors:#?}");
    assert_eq!(t.scalar_i64("SELECT count(*) FROM accounts").await, 0);
    assert_eq!(t.scalar_i64("SELECT count(*) FROM ledger_entries").await, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn header_must_name_the_contract_columns() {
    let t = TestDb::new().await;
    let f = csv(
        "id,name,email,phone,locale,tz,cash_balance,credit_quota,low_balance_threshold",
        &["a1,A,,,en,UTC,0,0,"],
    );
    let errors = bad_lines(
        import_file(
            &t.db,
            &t.config,
            ImportKind::Accounts,
            &f.path,
            at("2026-11-01T00:00:00Z"),
            false,
        )
        .await
        .unwrap_err(),
    );
    assert!(has(&errors, 1, "tz", "unknown column"), "{errors:#?}");
    assert!(has(&errors, 1, "timezone", "missing column"), "{errors:#?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn opening_balance_is_a_ledger_entry_and_reimport_keeps_the_balance() {
    let t = TestDb::new().await;
    t.import_accounts(&["a1,Alpha,,,en,UTC,12.50,3.00,"]).await;
    assert_eq!(t.balance("a1").await, 1250);
    assert_eq!(
        t.scalar_i64("SELECT amount FROM ledger_entries WHERE kind = 'opening_balance'")
            .await,
        1250
    );
    // Re-import with other values: the profile changes, the balance moves only through the ledger.
    t.import_accounts(&["a1,Alpha Renamed,,,en,UTC,99.00,4.00,"])
        .await;
    assert_eq!(t.balance("a1").await, 1250);
    assert_eq!(t.scalar_i64("SELECT credit_quota FROM accounts").await, 400);
    assert_eq!(t.scalar_i64("SELECT count(*) FROM ledger_entries").await, 1);
    t.assert_balances_match_ledger().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_resources_file_imports_nothing() {
    let t = setup().await;
    let f = csv(
        RESOURCES_HEADER,
        &[
            "n1,a1,lcic,pay_per_use,,,,",
            "n2,ghost,lcic,pay_per_use,,,,",
            "n3,a1,nope,pay_per_use,,,,",
            "n4,a1,sa,package,10,,,",
            "n5,a1,lcic,package,,,,",
            "n6,a1,lcic,rental,,,,",
            "r1,a1,sa,pay_per_use,,,,",
            "n8,a1,lcic,prepaid,,,maybe,2027-01-01",
        ],
    );
    let errors = bad_lines(
        import_file(
            &t.db,
            &t.config,
            ImportKind::Resources,
            &f.path,
            at("2026-11-01T00:00:00Z"),
            false,
        )
        .await
        .unwrap_err(),
    );
    assert!(
        has(&errors, 3, "account_id", "unknown account"),
        "{errors:#?}"
    );
    assert!(
        has(&errors, 4, "product", "not a configured product"),
        "{errors:#?}"
    );
    assert!(
        has(&errors, 5, "billing_mode", "no package meter"),
        "{errors:#?}"
    );
    assert!(has(&errors, 6, "package_quota", "required"), "{errors:#?}");
    assert!(has(&errors, 7, "billing_mode", "rental"), "{errors:#?}");
    assert!(has(&errors, 8, "product", "cannot change"), "{errors:#?}");
    assert!(has(&errors, 9, "payg_enabled", "maybe"), "{errors:#?}");
    assert!(has(&errors, 9, "term_ends_at", "RFC 3339"), "{errors:#?}");
    assert_eq!(t.scalar_i64("SELECT count(*) FROM resources").await, 2);
}

/// Amounts, quantities and instants that the rest of the product could not carry (a sum past
/// bigint, PostgreSQL's missing year 0) are refused at import with their line, not met by a
/// bare database error in billing or a report. The bounds themselves are accepted.
#[tokio::test(flavor = "multi_thread")]
async fn out_of_range_numbers_and_instants_are_refused_with_their_line() {
    let t = setup().await;
    let usage = csv(
        USAGE_HEADER,
        &[
            "b2,a1,r1,classroom_minutes,9000000000000,2026-11-22T01:00:00Z,2026-11-22T02:00:00Z", // 2
            "b3,a1,r1,classroom_minutes,1000000000.000001,2026-11-22T01:00:00Z,2026-11-22T02:00:00Z", // 3
            "b4,a1,r1,classroom_minutes,1,0000-01-01T00:00:00Z,2026-11-22T02:00:00Z", // 4
            "b5,a1,r1,classroom_minutes,1,1899-12-31T23:59:59Z,2026-11-22T02:00:00Z", // 5
        ],
    );
    let before = t.fingerprint().await;
    let errors = bad_lines(
        import_file(
            &t.db,
            &t.config,
            ImportKind::Usage,
            &usage.path,
            at("2026-11-23T00:00:00Z"),
            false,
        )
        .await
        .unwrap_err(),
    );
    assert!(has(&errors, 2, "quantity", "out of range"), "{errors:?}");
    assert!(has(&errors, 3, "quantity", "out of range"), "{errors:?}");
    assert!(has(&errors, 4, "started_at", "out of range"), "{errors:?}");
    assert!(has(&errors, 5, "started_at", "out of range"), "{errors:?}");
    assert_eq!(errors.len(), 4, "{errors:?}");
    assert_eq!(t.fingerprint().await, before, "nothing imported");
    let accounts = csv(
        ACCOUNTS_HEADER,
        &[
            "x2,X,,,en,UTC,-92233720368547758.08,0,", // 2: i64's own limit
            "x3,X,,,en,UTC,10000000000000.01,0,",     // 3: just past the bound
            "x4,X,,,en,UTC,0,10000000000000.01,",     // 4: credit quota too
            "x5,X,,,en,UTC,0,0,10000000000000.01",    // 5: threshold too
        ],
    );
    let errors = bad_lines(
        import_file(
            &t.db,
            &t.config,
            ImportKind::Accounts,
            &accounts.path,
            at("2026-11-23T00:00:00Z"),
            false,
        )
        .await
        .unwrap_err(),
    );
    assert!(has(&errors, 2, "cash_balance", ""), "{errors:?}");
    assert!(
        has(&errors, 3, "cash_balance", "out of range"),
        "{errors:?}"
    );
    assert!(
        has(&errors, 4, "credit_quota", "out of range"),
        "{errors:?}"
    );
    assert!(
        has(&errors, 5, "low_balance_threshold", "out of range"),
        "{errors:?}"
    );
    assert_eq!(t.fingerprint().await, before, "nothing imported");
    // The bounds themselves go in.
    import_file(
        &t.db,
        &t.config,
        ImportKind::Usage,
        &csv(
            USAGE_HEADER,
            &["b6,a1,r1,classroom_minutes,1000000000,1900-01-01T00:00:00Z,2026-11-22T02:00:00Z"],
        )
        .path,
        at("2026-11-23T00:00:00Z"),
        false,
    )
    .await
    .unwrap();
    import_file(
        &t.db,
        &t.config,
        ImportKind::Accounts,
        &csv(
            ACCOUNTS_HEADER,
            &["x6,X,,,en,UTC,-10000000000000.00,10000000000000,"],
        )
        .path,
        at("2026-11-23T00:00:00Z"),
        false,
    )
    .await
    .unwrap();
}

/// An error names the physical line of the file, whatever its line ends (a file saved on
/// Windows ends lines with CRLF), a byte-order mark or blank lines.
#[tokio::test(flavor = "multi_thread")]
async fn errors_name_the_physical_line_with_crlf_a_bom_and_blank_lines() {
    let t = TestDb::new().await;
    let good = "g1,Good,g@example.com,,en,UTC,1.00,0,";
    let bad = "b1,Bad,b@example.com,,en,UTC,1.001,0,"; // three decimals
    let two_lines = "g2,\"Two\r\nlines\",g2@example.com,,en,UTC,1.00,0,";
    let cases: [(&str, String, u64); 8] = [
        ("LF", format!("{ACCOUNTS_HEADER}\n{good}\n{bad}\n"), 3),
        (
            "no final line end",
            format!("{ACCOUNTS_HEADER}\n{good}\n{bad}"),
            3,
        ),
        (
            "a quoted name on two lines",
            format!("{ACCOUNTS_HEADER}\r\n{two_lines}\r\n{bad}\r\n"),
            4,
        ),
        (
            "bad first",
            format!("{ACCOUNTS_HEADER}\r\n{bad}\r\n{good}\r\n"),
            2,
        ),
        (
            "blank lines, no final line end",
            format!("{ACCOUNTS_HEADER}\n\n{bad}"),
            3,
        ),
        (
            "CRLF",
            format!("{ACCOUNTS_HEADER}\r\n{good}\r\n{bad}\r\n"),
            3,
        ),
        (
            "BOM and CRLF",
            format!("\u{feff}{ACCOUNTS_HEADER}\r\n{good}\r\n{bad}\r\n"),
            3,
        ),
        (
            "blank lines",
            format!("{ACCOUNTS_HEADER}\n\n{good}\r\n\r\n{bad}\r\n"),
            5,
        ),
    ];
    let dir = tempfile::tempdir().unwrap();
    for (name, text, line) in cases {
        let path = dir.path().join("accounts.csv");
        std::fs::write(&path, text).unwrap();
        let errors = bad_lines(
            import_file(
                &t.db,
                &t.config,
                ImportKind::Accounts,
                &path,
                at("2026-11-23T00:00:00Z"),
                false,
            )
            .await
            .unwrap_err(),
        );
        assert_eq!(errors.len(), 1, "{name}: {errors:?}");
        assert!(has(&errors, line, "cash_balance", ""), "{name}: {errors:?}");
    }
    assert_eq!(t.scalar_i64("SELECT count(*) FROM accounts").await, 0);
    // The same file with CRLF and the bad row fixed imports, names intact.
    let path = dir.path().join("ok.csv");
    std::fs::write(&path, format!("{ACCOUNTS_HEADER}\r\n{good}\r\n")).unwrap();
    import_file(
        &t.db,
        &t.config,
        ImportKind::Accounts,
        &path,
        at("2026-11-23T00:00:00Z"),
        false,
    )
    .await
    .unwrap();
    let c = t.client().await;
    let name: String = c
        .query_one("SELECT name FROM accounts WHERE id = 'g1'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(name, "Good");
}

/// PRODUCT.md §2: a prepaid resource has a term end (without one it would run in arrears for
/// ever); a resource file without it is refused, naming the line.
#[tokio::test(flavor = "multi_thread")]
async fn a_prepaid_resource_without_a_term_end_is_refused() {
    let t = setup().await;
    let before = t.fingerprint().await;
    let f = csv(
        RESOURCES_HEADER,
        &[
            "p1,a1,sa,prepaid,,,,2027-06-30T00:00:00Z",
            "p2,a1,sa,prepaid,,,,",
        ],
    );
    let errors = bad_lines(
        import_file(
            &t.db,
            &t.config,
            ImportKind::Resources,
            &f.path,
            at("2026-11-23T00:00:00Z"),
            false,
        )
        .await
        .unwrap_err(),
    );
    assert!(
        has(&errors, 3, "term_ends_at", "required for a prepaid"),
        "{errors:?}"
    );
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert_eq!(t.fingerprint().await, before, "nothing imported");
}
