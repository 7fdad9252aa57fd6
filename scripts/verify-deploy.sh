#!/usr/bin/env bash
# Checks the monitoring files in deploy/:
#   - deploy/prometheus/arrears-rules.yml with `promtool check rules`, and its unit tests
#     (deploy/prometheus/arrears-rules.test.yml) with `promtool test rules`;
#   - deploy/grafana/arrears-dashboard.json: valid JSON with panels, every panel target's
#     PromQL naming only arrears_* metrics or `up`, and parsing (checked by promtool too).
# Installs promtool (Debian's prometheus package) when it is missing, without leaving a
# prometheus daemon running. Any failure exits non-zero with the reason.
set -euo pipefail
cd "$(dirname "$0")/.."

RULES=deploy/prometheus/arrears-rules.yml
TESTS=deploy/prometheus/arrears-rules.test.yml
DASHBOARD=deploy/grafana/arrears-dashboard.json

fail() { echo "verify-deploy: FAILED: $*" >&2; exit 1; }
exprs_rules="$(mktemp --suffix=.yml)"
trap 'rc=$?; rm -f "$exprs_rules"; [ $rc -eq 0 ] || echo "verify-deploy: FAILED (exit $rc)" >&2' EXIT

for f in "$RULES" "$TESTS" "$DASHBOARD"; do
  [ -f "$f" ] || fail "$f is missing"
done

if ! command -v promtool >/dev/null; then
  [ "$(id -u)" -eq 0 ] || fail "promtool is not installed and this is not root (apt-get install prometheus)"
  echo "verify-deploy: installing promtool (Debian package prometheus)" >&2
  before="$(pgrep -x prometheus || true)"
  # Keep the package's postinst from starting the daemon: Debian's invoke-rc.d honours
  # policy-rc.d exiting 101. Only a policy-rc.d this script placed is removed again.
  placed_policy=""
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
    chmod 0755 /usr/sbin/policy-rc.d
    placed_policy=1
  fi
  install_rc=0
  { apt-get update -qq &&
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null; } ||
    install_rc=$?
  [ -n "$placed_policy" ] && rm -f /usr/sbin/policy-rc.d
  [ "$install_rc" -eq 0 ] || fail "apt-get install prometheus exited $install_rc"
  # Should a daemon have started all the same, stop the one(s) the install started, by pid.
  for pid in $(pgrep -x prometheus || true); do
    if ! grep -qx "$pid" <<<"$before"; then
      echo "verify-deploy: stopping the prometheus daemon the package started (pid $pid)" >&2
      kill "$pid" 2>/dev/null || true
    fi
  done
  command -v promtool >/dev/null || fail "promtool still not found after installing prometheus"
fi
promtool --version 2>&1 | head -n 1

echo "== promtool check rules $RULES"
promtool check rules "$RULES" || fail "promtool check rules $RULES"

echo "== promtool test rules $TESTS"
promtool test rules "$TESTS" || fail "promtool test rules $TESTS"

echo "== dashboard $DASHBOARD"
python3 - "$DASHBOARD" "$exprs_rules" <<'PY'
import json, re, sys

path, rules_out = sys.argv[1], sys.argv[2]
try:
    d = json.load(open(path))
except ValueError as e:
    sys.exit(f"{path}: not valid JSON: {e}")

errors = []
panels = d.get("panels")
if not panels:
    sys.exit(f"{path}: no panels")
if not isinstance(d.get("schemaVersion"), int):
    errors.append("schemaVersion missing")
variables = {v.get("name"): v for v in d.get("templating", {}).get("list", [])}
inputs = {i.get("name") for i in d.get("__inputs", [])}
if not (variables.get("datasource", {}).get("type") == "datasource" or "DS_PROMETHEUS" in inputs):
    errors.append("neither a datasource template variable nor a DS_PROMETHEUS input")

FUNCS = {
    "abs", "absent", "absent_over_time", "avg_over_time", "ceil", "changes", "clamp",
    "clamp_max", "clamp_min", "count_over_time", "day_of_month", "day_of_week",
    "day_of_year", "days_in_month", "delta", "deriv", "exp", "floor", "histogram_quantile",
    "holt_winters", "hour", "idelta", "increase", "irate", "label_join", "label_replace",
    "last_over_time", "ln", "log10", "log2", "max_over_time", "min_over_time", "minute",
    "month", "predict_linear", "present_over_time", "quantile_over_time", "rate", "resets",
    "round", "scalar", "sgn", "sort", "sort_desc", "sqrt", "stddev_over_time",
    "stdvar_over_time", "sum_over_time", "time", "timestamp", "vector", "year",
    "sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values",
    "bottomk", "topk", "quantile",
}
KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or",
            "unless", "bool", "offset", "inf", "nan"}
IDENT = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")

def metric_names(expr):
    e = re.sub(r"\$\{[^}]*\}|\$\w+", "5m", expr)              # Grafana variables
    e = re.sub(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|`[^`]*`', '""', e)  # strings
    e = re.sub(r"\{[^}]*\}", "{}", e)                           # label matchers
    e = re.sub(r"\[[^\]]*\]", "", e)                            # ranges / subqueries
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", e)
    e = re.sub(r"\b\d+(\.\d+)?(e[+-]?\d+)?[smhdwy]*\b", " ", e)  # numbers, durations
    names = []
    for m in IDENT.finditer(e):
        word = m.group(0)
        after = e[m.end():].lstrip()
        if word.lower() in KEYWORDS:
            continue
        if word in FUNCS and after.startswith("("):
            continue
        names.append(word)
    return names

def all_panels(ps):
    for p in ps:
        yield p
        yield from all_panels(p.get("panels", []))  # collapsed rows

exprs, seen_ids = [], set()
for p in all_panels(panels):
    title = p.get("title", "?")
    if p.get("type") == "row":
        continue
    if p.get("id") in seen_ids:
        errors.append(f"panel {title!r}: duplicate id {p.get('id')}")
    seen_ids.add(p.get("id"))
    targets = p.get("targets") or []
    if not targets:
        errors.append(f"panel {title!r}: no targets")
    for t in targets:
        expr = t.get("expr", "")
        if not expr.strip():
            errors.append(f"panel {title!r} target {t.get('refId')}: no expr")
            continue
        names = metric_names(expr)
        if not names:
            errors.append(f"panel {title!r} target {t.get('refId')}: no metric name in {expr!r}")
        for n in names:
            if not (n.startswith("arrears_") or n == "up"):
                errors.append(f"panel {title!r} target {t.get('refId')}: metric {n!r} "
                              f"is neither arrears_* nor up")
        exprs.append((title, expr))

if errors:
    sys.exit(f"{path}:\n  " + "\n  ".join(errors))

# The queries, with Grafana's variables filled in, as recording rules for promtool to parse.
def fill(expr):
    return (expr.replace("$__rate_interval", "5m").replace("$__interval", "1m")
                .replace("$__range", "1h").replace('=~"$instance"', '=~".*"'))
with open(rules_out, "w") as f:
    f.write("groups:\n  - name: dashboard-queries\n    rules:\n")
    for i, (title, expr) in enumerate(exprs):
        f.write(f"      - record: dashboard:query_{i}\n        expr: {json.dumps(fill(expr))}\n")
print(f"{path}: {len(list(all_panels(panels)))} panels, {len(exprs)} queries, "
      f"metric names OK")
PY
if ! out="$(promtool check rules "$exprs_rules" 2>&1)"; then
  echo "$out" >&2
  fail "a dashboard query does not parse as PromQL"
fi
echo "dashboard queries parse as PromQL"

echo "verify-deploy: OK"
