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

cargo test --locked -- --test-threads="${TEST_THREADS:-4}"

# The systemd units of deploy/.
bash scripts/verify-units.sh
# The Prometheus rules (promtool check + unit tests) and the Grafana dashboard of deploy/.
bash scripts/verify-deploy.sh
