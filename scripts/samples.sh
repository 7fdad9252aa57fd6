#!/usr/bin/env bash
# The sample data: loads samples/ into the embedded PostgreSQL (no set-up) and bills
# 2026-11-22. Safe to run again: imports and billing are idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
unset DATABASE_URL ARREARS_CONFIG
cargo build --quiet
arrears=target/debug/arrears
step() { printf '\n\033[1m$ arrears %s\033[0m\n' "$*"; "$arrears" "$@"; }

step import accounts samples/accounts.csv --as-of 2026-11-22T00:00:00Z
step import resources samples/resources.csv --as-of 2026-11-22T00:00:00Z
step import usage samples/usage.csv --as-of 2026-11-22T23:00:00Z
step run generate_bills --as-of 2026-11-23T00:30:00+08:00
step bills acme
step bills umbrella
step account show globex
step account show initech
printf '\nThe embedded database keeps running under ./.arrears; stop it with: %s embedded stop\n' "$arrears"
