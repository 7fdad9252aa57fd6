#!/usr/bin/env bash
# Checks that src/db/schema.rs is what `diesel print-schema` makes of the migrations: migrates
# a scratch database with the diesel CLI, prints its schema with diesel.toml's settings and
# diffs the two. A difference fails with the diff; regenerate with
#   diesel print-schema --database-url URL_OF_A_MIGRATED_DATABASE > src/db/schema.rs
# (`diesel migration run` rewrites it too, after it applied a migration).
# Installs diesel_cli (PostgreSQL only; needs libpq, from apt when root) when it is missing.
# The database server: DATABASE_URL's if set, else the local one on 127.0.0.1:5432 (which
# scripts/test.sh starts). SCHEMA_FILE checks another copy (to try a drifted one by hand).
set -euo pipefail
cd "$(dirname "$0")/.."

SCHEMA_FILE="${SCHEMA_FILE:-src/db/schema.rs}"
# The CLI's output format is part of what is compared: the version of Cargo.lock's diesel.
DIESEL_CLI_VERSION="~2.3"

fail() { echo "check-schema: FAILED: $*" >&2; exit 1; }

export PATH="$PATH:${CARGO_HOME:-$HOME/.cargo}/bin"
if ! command -v diesel >/dev/null 2>&1; then
  if ! ldconfig -p 2>/dev/null | grep -q 'libpq\.so ' && [ "$(id -u)" -eq 0 ] \
      && command -v apt-get >/dev/null 2>&1; then
    echo "check-schema: installing libpq-dev for diesel_cli" >&2
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libpq-dev >/dev/null; } \
      || fail "apt-get install libpq-dev failed (diesel_cli links libpq)"
  fi
  echo "check-schema: installing diesel_cli $DIESEL_CLI_VERSION (a few minutes, once)" >&2
  cargo install --quiet --locked diesel_cli --version "$DIESEL_CLI_VERSION" \
      --no-default-features --features postgres \
    || fail "cargo install diesel_cli failed (it needs libpq: apt-get install libpq-dev)"
fi
echo "check-schema: $(diesel --version | tr -s ' \n' ' ')"

admin_url="${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}"
scratch="arrears_schema_check_$$"
# The scratch database's URL: the admin URL with its database name replaced.
scratch_url="$(python3 - "$admin_url" "$scratch" <<'PY'
import sys, urllib.parse as u
p = u.urlsplit(sys.argv[1])
print(u.urlunsplit(p._replace(path="/" + sys.argv[2])))
PY
)"
printed="$(mktemp --suffix=.rs)"
config="$(mktemp --suffix=.toml)"
cleanup() {
  rc=$?
  rm -f "$printed" "$config"
  psql -q "$admin_url" -c "DROP DATABASE IF EXISTS $scratch" >/dev/null 2>&1 || true
  [ $rc -eq 0 ] || echo "check-schema: FAILED (exit $rc)" >&2
}
trap cleanup EXIT

psql -q "$admin_url" -c "CREATE DATABASE $scratch" >/dev/null || fail "cannot create a scratch database on $admin_url"
# Migrated under a configuration without print_schema.file, so that migrating does not
# rewrite the file being checked.
printf '[migrations_directory]\ndir = "%s/migrations"\n' "$PWD" > "$config"
diesel migration run --database-url "$scratch_url" --config-file "$config" >/dev/null \
  || fail "diesel migration run failed on the scratch database"
diesel print-schema --database-url "$scratch_url" --config-file diesel.toml > "$printed" \
  || fail "diesel print-schema failed"

if ! diff -u --label "$SCHEMA_FILE" --label "diesel print-schema (migrations/)" "$SCHEMA_FILE" "$printed"; then
  fail "$SCHEMA_FILE differs from diesel print-schema of migrations/ (the diff above); regenerate: diesel print-schema --database-url URL_OF_A_MIGRATED_DATABASE > $SCHEMA_FILE"
fi
echo "check-schema: $SCHEMA_FILE matches diesel print-schema of migrations/"
