#!/usr/bin/env bash
# The first run: builds arrears, then `arrears demo` on the embedded PostgreSQL (started from
# this machine's PostgreSQL binaries under ./.arrears; no set-up): 80 simulated days of both
# products' lifecycles, slot by slot, in well under a minute once built. Notices go to
# ./arrears-demo/notices. Safe to run again: each run starts from a fresh demo database.
set -euo pipefail
cd "$(dirname "$0")/.."
unset DATABASE_URL ARREARS_CONFIG
echo "building arrears (release; the first build takes a few minutes)..."
cargo build --release --locked --quiet
exec target/release/arrears demo "$@"
