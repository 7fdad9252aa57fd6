//! diesel table definitions: `diesel print-schema` of the migrated database (diesel.toml);
//! edit a migration, not this file. scripts/check-schema.sh fails when they drift.

// @generated automatically by Diesel CLI.

diesel::table! {
    accounts (id) {
        id -> Text,
        name -> Text,
        email -> Nullable<Text>,
        phone -> Nullable<Text>,
        locale -> Text,
        timezone -> Text,
        cash_balance -> Int8,
        credit_quota -> Int8,
        low_balance_threshold -> Nullable<Int8>,
        state -> Text,
        compliance_locked -> Bool,
        legal_hold -> Bool,
        arrears_since -> Nullable<Timestamptz>,
        billed_through_day -> Nullable<Date>,
        billed_through_seq -> Int8,
        created_at -> Timestamptz,
        updated_at -> Timestamptz,
        balance_alert_armed -> Bool,
        episode -> Nullable<Int4>,
        episodes -> Int4,
        suspensions -> Int4,
        alerts_due_at -> Nullable<Timestamptz>,
        enforce_due_at -> Nullable<Timestamptz>,
        release_due_at -> Nullable<Timestamptz>,
    }
}

diesel::table! {
    arrears_episodes (account_id, no) {
        account_id -> Text,
        no -> Int4,
        opened_at -> Timestamptz,
        opened_by -> Text,
        first_overdue_alert_at -> Nullable<Timestamptz>,
        suspended_at -> Nullable<Timestamptz>,
        closed_at -> Nullable<Timestamptz>,
        close_reason -> Nullable<Text>,
        closed_by -> Nullable<Text>,
    }
}

diesel::table! {
    bill_lines (bill_day, account_id, resource_id, meter) {
        account_id -> Text,
        bill_day -> Date,
        resource_id -> Text,
        meter -> Text,
        records -> Int4,
        quantity -> Int8,
        included_quantity -> Int8,
        billed_quantity -> Int8,
        unbilled_quantity -> Int8,
        unit_price_nanos -> Int8,
        amount -> Int8,
    }
}

diesel::table! {
    billing_cursor (id) {
        id -> Bool,
        low_water_seq -> Int8,
    }
}

diesel::table! {
    bills (account_id, bill_day) {
        account_id -> Text,
        bill_day -> Date,
        total -> Int8,
        paid_cash_coupons -> Int8,
        paid_general_coupons -> Int8,
        paid_cash -> Int8,
        records -> Int4,
        late_records -> Int4,
        issued_at -> Timestamptz,
        recorded_at -> Timestamptz,
    }
}

diesel::table! {
    control_plane_orders (account_id, id) {
        account_id -> Text,
        id -> Int8,
        resource_id -> Text,
        product -> Text,
        kind -> Text,
        reason -> Nullable<Text>,
        cause -> Text,
        created_at -> Timestamptz,
    }
}

diesel::table! {
    coupons (account_id, id) {
        account_id -> Text,
        id -> Int8,
        kind -> Text,
        amount -> Int8,
        remaining -> Int8,
        expires_at -> Timestamptz,
        granted_at -> Timestamptz,
        reference -> Nullable<Text>,
    }
}

diesel::table! {
    job_batches (job, slot, batch_no) {
        job -> Text,
        slot -> Timestamptz,
        batch_no -> Int4,
        lo -> Text,
        hi -> Text,
        status -> Text,
        done_by -> Nullable<Text>,
        done_at -> Nullable<Timestamptz>,
        result -> Nullable<Jsonb>,
    }
}

diesel::table! {
    job_runs (job, slot) {
        job -> Text,
        slot -> Timestamptz,
        status -> Text,
        attempts -> Int4,
        as_of -> Timestamptz,
        started_at -> Timestamptz,
        finished_at -> Nullable<Timestamptz>,
        report -> Nullable<Jsonb>,
        error -> Nullable<Text>,
        owner -> Nullable<Text>,
        lease_until -> Nullable<Timestamptz>,
    }
}

diesel::table! {
    ledger_entries (account_id, id) {
        account_id -> Text,
        id -> Int8,
        kind -> Text,
        amount -> Int8,
        bill_day -> Nullable<Date>,
        coupon_id -> Nullable<Int8>,
        reference -> Nullable<Text>,
        effective_at -> Timestamptz,
        recorded_at -> Timestamptz,
    }
}

diesel::table! {
    lifecycle_events (account_id, id) {
        account_id -> Text,
        id -> Int8,
        resource_id -> Nullable<Text>,
        from_state -> Text,
        to_state -> Text,
        reason -> Text,
        cause -> Text,
        occurred_at -> Timestamptz,
        recorded_at -> Timestamptz,
        episode -> Nullable<Int4>,
    }
}

diesel::table! {
    lifecycle_policies (product) {
        product -> Text,
        policy -> Jsonb,
        applied_at -> Timestamptz,
    }
}

diesel::table! {
    money_settings (id) {
        id -> Bool,
        currency -> Text,
        minor_unit_digits -> Int4,
        pinned_at -> Timestamptz,
    }
}

diesel::table! {
    notices (account_id, id) {
        account_id -> Text,
        id -> Int8,
        kind -> Text,
        channel -> Text,
        dedupe_key -> Text,
        payload -> Jsonb,
        status -> Text,
        attempts -> Int4,
        next_attempt_at -> Timestamptz,
        lease_until -> Nullable<Timestamptz>,
        last_error -> Nullable<Text>,
        provider_message_id -> Nullable<Text>,
        accepted_at -> Nullable<Timestamptz>,
        created_at -> Timestamptz,
        episode -> Nullable<Int4>,
        suspension -> Nullable<Int4>,
        cancel_reason -> Nullable<Text>,
        message_id -> Nullable<Text>,
        dev_channel -> Bool,
        queued -> Bool,
        claimed_by -> Nullable<Int4>,
    }
}

diesel::table! {
    package_terms (account_id, resource_id, no) {
        account_id -> Text,
        resource_id -> Text,
        no -> Int4,
        starts_at -> Nullable<Timestamptz>,
        ends_at -> Timestamptz,
        quota -> Int8,
        used -> Int8,
        closed_at -> Timestamptz,
    }
}

diesel::table! {
    payment_references (reference) {
        reference -> Text,
        account_id -> Text,
        amount -> Int8,
        ledger_entry_id -> Nullable<Int8>,
        applied_at -> Timestamptz,
    }
}

diesel::table! {
    prices (product, meter, effective_from) {
        product -> Text,
        meter -> Text,
        unit -> Text,
        unit_price_nanos -> Int8,
        is_package_meter -> Bool,
        effective_from -> Timestamptz,
        retired -> Bool,
        applied_at -> Timestamptz,
    }
}

diesel::table! {
    release_warnings (account_id, id) {
        account_id -> Text,
        id -> Int8,
        suspension -> Int4,
        lead_seconds -> Int4,
        release_at -> Nullable<Timestamptz>,
        accepted_at -> Timestamptz,
    }
}

diesel::table! {
    resource_suspensions (account_id, no) {
        account_id -> Text,
        no -> Int4,
        resource_id -> Text,
        reason -> Text,
        episode -> Nullable<Int4>,
        started_at -> Timestamptz,
        release_at -> Nullable<Timestamptz>,
        ended_at -> Nullable<Timestamptz>,
        ended_how -> Nullable<Text>,
    }
}

diesel::table! {
    resources (account_id, id) {
        account_id -> Text,
        id -> Text,
        product -> Text,
        billing_mode -> Text,
        package_quota -> Nullable<Int8>,
        package_used -> Int8,
        package_expires_at -> Nullable<Timestamptz>,
        payg_enabled -> Bool,
        term_ends_at -> Nullable<Timestamptz>,
        state -> Text,
        state_reason -> Nullable<Text>,
        suspended_at -> Nullable<Timestamptz>,
        released_at -> Nullable<Timestamptz>,
        unsubscribed_at -> Nullable<Timestamptz>,
        created_at -> Timestamptz,
        updated_at -> Timestamptz,
        suspension -> Nullable<Int4>,
        package_starts_at -> Nullable<Timestamptz>,
    }
}

diesel::table! {
    usage_records (account_id, event_id) {
        account_id -> Text,
        event_id -> Text,
        resource_id -> Text,
        meter -> Text,
        quantity -> Int8,
        started_at -> Timestamptz,
        ended_at -> Timestamptz,
        usage_day -> Date,
        seq -> Int8,
        imported_at -> Timestamptz,
    }
}

diesel::joinable!(control_plane_orders -> accounts (account_id));
diesel::joinable!(coupons -> accounts (account_id));
diesel::joinable!(lifecycle_events -> accounts (account_id));
diesel::joinable!(notices -> accounts (account_id));
diesel::joinable!(payment_references -> accounts (account_id));
diesel::joinable!(resources -> accounts (account_id));

diesel::allow_tables_to_appear_in_same_query!(
    accounts,
    arrears_episodes,
    bill_lines,
    billing_cursor,
    bills,
    control_plane_orders,
    coupons,
    job_batches,
    job_runs,
    ledger_entries,
    lifecycle_events,
    lifecycle_policies,
    money_settings,
    notices,
    package_terms,
    payment_references,
    prices,
    release_warnings,
    resource_suspensions,
    resources,
    usage_records,
);
