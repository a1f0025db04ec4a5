#!/usr/bin/env bash
# Throughput of database sources: a narrow table (bigint id, numeric(12,2) amount,
# timestamptz changed_at, int status) read by `kbcrm run` from PostgreSQL over binary COPY, next
# to the two-step route of `COPY ... TO STDOUT` into a CSV file and a CSV load of that file; then
# the same table read from MariaDB when its server is installed (.ci/mariadb).
#
#   cargo build --release
#   benches/postgres_source.sh [ROWS]        # default 5,000,000 rows
#
# Starts the throwaway test server (.ci/postgres) when KBCRM_TEST_PG_URL is not set. Prints
# wall-clock seconds, the kbcrm process's CPU seconds (user + sys) and rows per second per core
# (rows / CPU seconds of the kbcrm process; the server works on the other core).
set -euo pipefail
[ -n "${BENCH_TRACE:-}" ] && set -x
cd "$(dirname "$0")/.."
rows="${1:-5000000}"
kbcrm="$PWD/target/release/kbcrm"
[ -x "$kbcrm" ] || { echo "build first: cargo build --release" >&2; exit 1; }
if [ -z "${KBCRM_TEST_PG_URL:-}" ]; then
  eval "$(.ci/postgres start)"
fi
admin="$KBCRM_TEST_PG_URL"
db_url="${admin%/*}/kbcrm_bench"
psql -q "$admin" -c "DROP DATABASE IF EXISTS kbcrm_bench" -c "CREATE DATABASE kbcrm_bench"
psql -q "$db_url" <<SQL
CREATE TABLE narrow (id bigint PRIMARY KEY, amount numeric(12,2), changed_at timestamptz, status int);
INSERT INTO narrow SELECT g, (g % 100000) / 100.0, timestamptz '2025-01-01' + g * interval '1 second', g % 7
  FROM generate_series(1, $rows) g;
VACUUM ANALYZE narrow;
SQL

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
schema='    schema:
      id: { type: bigint, required: true }
      amount: decimal(12,2)
      changed_at: timestamp
      status: int'
mkdir -p "$work/db/pipelines" "$work/csv/pipelines"
echo "name: bench" >"$work/db/kbcrm.yaml"
echo "name: bench" >"$work/csv/kbcrm.yaml"
cat >"$work/db/pipelines/pg.yaml" <<EOF
sources:
  narrow:
    format: postgres
    connection: BENCH_URL
    location: public.narrow
$schema
EOF
cat >"$work/db/pipelines/pg2.yaml" <<EOF
sources:
  narrow:
    format: postgres
    connection: BENCH_URL
    location: public.narrow
    partition: { column: id, parts: 2 }
$schema
EOF
cat >"$work/csv/pipelines/csv.yaml" <<EOF
sources:
  narrow:
    format: csv
    location: narrow.csv
$schema
EOF

# seconds, cpu seconds of a command
timed() {
  /usr/bin/time -f '%e %U %S' -o "$work/time" "$@" >/dev/null 2>"$work/err" || { cat "$work/err" >&2; exit 1; }
  awk '{ printf "%s %.2f\n", $1, $2 + $3 }' "$work/time"
}
report() {
  awk -v name="$1" -v rows="$rows" -v wall="$2" -v cpu="$3" 'BEGIN {
    printf "%-44s %8.2f s wall %8.2f s cpu %12.0f rows/s %12.0f rows/s per core\n",
      name, wall, cpu, rows / wall, rows / cpu }'
}

export BENCH_URL="$db_url"
printf 'PostgreSQL source throughput, %s rows, %s cores (%s)\n' "$rows" "$(nproc)" "$(date -u +%F)"
for i in 1 2 3; do
  rm -rf "$work/db/warehouse" "$work/csv/warehouse" "$work/csv/narrow.csv"
  read -r w c < <(cd "$work/db" && timed "$kbcrm" run pg)
  report "kbcrm run, format: postgres (binary COPY)" "$w" "$c"
  rm -rf "$work/db/warehouse"
  read -r w c < <(cd "$work/db" && timed "$kbcrm" run pg2)
  report "kbcrm run, format: postgres, 2 key ranges" "$w" "$c"
  read -r w1 c1 < <(timed psql -q "$db_url" -c "\\copy narrow TO '$work/csv/narrow.csv' WITH (FORMAT csv, HEADER)")
  report "psql COPY ... TO STDOUT (csv file)" "$w1" "$c1"
  read -r w2 c2 < <(cd "$work/csv" && timed "$kbcrm" run csv)
  report "kbcrm run, format: csv of that file" "$w2" "$c2"
  report "COPY to CSV + CSV load, together" "$(awk -v a="$w1" -v b="$w2" 'BEGIN{print a+b}')" \
    "$(awk -v a="$c1" -v b="$c2" 'BEGIN{print a+b}')"
done
psql -q "$admin" -c "DROP DATABASE kbcrm_bench"

# The same table in MariaDB, read with `format: mysql` (skipped without a MariaDB server).
if [ -z "${KBCRM_TEST_MYSQL_URL:-}" ] && command -v mariadb-install-db >/dev/null; then
  eval "$(.ci/mariadb start)"
fi
if [ -n "${KBCRM_TEST_MYSQL_URL:-}" ]; then
  my_admin="$KBCRM_TEST_MYSQL_URL"
  my_url="${my_admin%/*}/kbcrm_bench"
  my() { # the server's own client, credentials from the URL
    local rest=${my_admin#mysql://}
    local cred=${rest%%@*}
    local hostport=${rest#*@}
    hostport=${hostport%%/*}
    mariadb --no-defaults -h "${hostport%:*}" -P "${hostport#*:}" -u "${cred%%:*}" -p"${cred#*:}" "$@"
  }
  my -e "DROP DATABASE IF EXISTS kbcrm_bench; CREATE DATABASE kbcrm_bench"
  my kbcrm_bench -e "CREATE TABLE narrow (id bigint PRIMARY KEY, amount decimal(12,2),
      changed_at datetime(6), status int);
    INSERT INTO narrow SELECT seq, (seq % 100000) / 100.0,
      timestamp '2025-01-01 00:00:00' + interval seq second, seq % 7 FROM seq_1_to_$rows"
  mkdir -p "$work/my/pipelines"
  echo "name: bench" >"$work/my/kbcrm.yaml"
  printf 'sources:\n  narrow:\n    format: mysql\n    connection: BENCH_URL\n    location: narrow\n%s\n' \
    "$schema" >"$work/my/pipelines/my.yaml"
  export BENCH_URL="$my_url"
  for i in 1 2 3; do
    rm -rf "$work/my/warehouse"
    read -r w c < <(cd "$work/my" && timed "$kbcrm" run my)
    report "kbcrm run, format: mysql (MariaDB)" "$w" "$c"
  done
  my -e "DROP DATABASE kbcrm_bench"
fi
