#!/usr/bin/env bash
# Runs the whole test suite against a real PostgreSQL: DATABASE_URL if set, else the local
# server on 127.0.0.1:5432, which this script installs or starts when it is missing or down.
set -euo pipefail
cd "$(dirname "$0")/.."

pg_ready() { pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null; }

if [ -z "${DATABASE_URL:-}" ]; then
  if ! command -v pg_isready >/dev/null 2>&1 && ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
    echo "installing PostgreSQL"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
  fi
  export PATH="$PATH:$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)"
  if ! pg_ready; then
    version=$(ls /usr/lib/postgresql | sort -V | tail -1)
    if ! pg_lsclusters -h 2>/dev/null | grep -q "^$version main"; then
      pg_createcluster "$version" main -- --auth=trust >/dev/null
    fi
    echo "starting PostgreSQL $version"
    pg_ctlcluster --skip-systemctl-redirect "$version" main start
    for _ in $(seq 1 30); do pg_ready && break; sleep 1; done
  fi
  pg_ready || { echo "PostgreSQL is not answering on 127.0.0.1:5432" >&2; exit 1; }
fi

# The SMTP tests run a real SMTP server: Python's aiosmtpd.
if ! python3 -c 'import aiosmtpd' 2>/dev/null; then
  echo "installing aiosmtpd"
  python3 -m pip install --quiet --disable-pip-version-check aiosmtpd \
    || python3 -m pip install --quiet --disable-pip-version-check --break-system-packages aiosmtpd
fi

# postfix's smtp-sink and smtp-source, the references of `arrears bench-email` (no test needs
# them; installed for the benchmark on a new machine, without starting postfix's daemon:
# Debian's invoke-rc.d honours a policy-rc.d that exits 101). Skipped when not root.
if ! command -v smtp-sink >/dev/null 2>&1 && [ ! -x /usr/sbin/smtp-sink ] && [ "$(id -u)" -eq 0 ] \
    && command -v apt-get >/dev/null 2>&1; then
  echo "installing postfix's smtp-sink and smtp-source"
  placed_policy=""
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod 0755 /usr/sbin/policy-rc.d
    placed_policy=1
  fi
  echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections 2>/dev/null || true
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postfix >/dev/null; } \
    || echo "could not install postfix (bench-email needs it; the tests do not)" >&2
  if [ -n "$placed_policy" ]; then rm -f /usr/sbin/policy-rc.d; fi
fi

cargo test --locked -- --test-threads="${TEST_THREADS:-4}"

# src/db/schema.rs against `diesel print-schema` of the migrations (installs diesel_cli).
bash scripts/check-schema.sh

# The systemd units of deploy/.
bash scripts/verify-units.sh
# The Prometheus rules (promtool check + unit tests) and the Grafana dashboard of deploy/.
bash scripts/verify-deploy.sh
