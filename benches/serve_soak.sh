#!/usr/bin/env bash
# A bounded soak of `kbcrm serve`: 32 pgbench clients running a mixed read script for 60 s, one
# more client sending heavy queries with a 2 s statement timeout the whole time, and a login
# every second timed on the side.
#
#   benches/serve_soak.sh [--scale 0.1] [--clients 32] [--seconds 60]
#
# Prints pgbench's throughput and failures, the p50/p99 latency from its per-transaction log,
# how many heavy queries timed out (57014) and how many other errors they got, the logins that
# took over 1 s, and the server's resident memory before and after. Needs pgbench and psql
# (Debian: postgresql, postgresql-client); builds the release binary if it is missing and a
# warehouse of generated data under target/bench-soak.
set -euo pipefail
cd "$(dirname "$0")/.."

scale=0.1
clients=32
seconds=60
while [ $# -gt 0 ]; do
  case "$1" in
    --scale) scale=$2; shift 2 ;;
    --clients) clients=$2; shift 2 ;;
    --seconds) seconds=$2; shift 2 ;;
    *) echo "usage: benches/serve_soak.sh [--scale S] [--clients N] [--seconds T]" >&2; exit 2 ;;
  esac
done

pgbench=$(command -v pgbench || ls /usr/lib/postgresql/*/bin/pgbench 2>/dev/null | sort -V | tail -1 || true)
if [ -z "$pgbench" ] || ! command -v psql >/dev/null; then
  echo "needs pgbench and psql (apt-get install postgresql postgresql-client)" >&2
  exit 1
fi
[ -x target/release/kbcrm ] || cargo build --release
kbcrm="$PWD/target/release/kbcrm"
work="$PWD/target/bench-soak"
proj="$work/project"
password="soak-password"

if [ ! -f "$proj/.scale-$scale" ]; then
  rm -rf "$proj"
  mkdir -p "$proj"
  ln -s "$PWD/pipelines" "$proj/pipelines"
  ln -s "$PWD/sql" "$proj/sql"
  cp kbcrm.yaml "$proj/kbcrm.yaml"
  (cd "$proj" \
    && "$kbcrm" generate --scale "$scale" --seed 7 --out sources >/dev/null \
    && "$kbcrm" run --as-of 2025-12-31 -q >/dev/null \
    && printf '%s\n' "$password" | "$kbcrm" user add soak --role analyst --password-stdin >/dev/null)
  touch "$proj/.scale-$scale"
fi
# Enough connections for the clients, the heavy one and the timed logins.
sed -i "s/^  max_connections: .*/  max_connections: $((clients + 8))/" "$proj/kbcrm.yaml"

log="$work/serve.log"
(cd "$proj" && exec "$kbcrm" serve --listen 127.0.0.1:0 >"$work/serve.out" 2>"$log") &
server=$!
trap 'kill $server 2>/dev/null || true' EXIT
for _ in $(seq 100); do
  grep -q "listening on" "$work/serve.out" 2>/dev/null && break
  sleep 0.1
done
port=$(sed -n 's/.*listening on [^:]*:\([0-9]*\);.*/\1/p' "$work/serve.out")
export PGPASSWORD="$password"
conn="host=127.0.0.1 port=$port user=soak dbname=kbcrm"
rss() { awk '/^VmRSS/ {print $2}' "/proc/$server/status"; }

# Customer ids the point lookups draw from.
psql "$conn" -X -A -t -c "select customer_id from cube_churn_warning order by customer_id limit 5000" \
  >"$work/customers.txt"
ncust=$(wc -l <"$work/customers.txt")
first=$(head -1 "$work/customers.txt")
prefix=${first%%[0-9]*}
cat >"$work/mixed.sql" <<SQL
\\set n random(1, $ncust)
\\set kind random(1, 10)
select * from cube_churn_warning where customer_id = (select customer_id from cube_churn_warning order by customer_id limit 1 offset :n - 1);
select region, count(*), sum(net_amount) from fact_sales f join dim_customer c on f.customer_key = c.customer_key where c.is_current group by region order by region;
select tier, count(*) from cube_loyalty group by tier order by tier;
SQL

psql "$conn" -X -q -c "select 1" >/dev/null
sleep 1
rss_before=$(rss)

# The heavy client: cross joins cut by a 2 s timeout, back to back.
heavy_log="$work/heavy.log"
: >"$heavy_log"
(
  end=$(( $(date +%s) + seconds ))
  while [ "$(date +%s)" -lt "$end" ]; do
    psql "$conn" -X -q -c "set statement_timeout = '2s'" \
      -c "select count(*) from generate_series(1, 100000000) a, generate_series(1, 100000000) b" \
      >>"$heavy_log" 2>&1 || true
  done
) &
heavy=$!

# A login and a query every second, timed.
logins="$work/logins.txt"
: >"$logins"
(
  end=$(( $(date +%s) + seconds ))
  while [ "$(date +%s)" -lt "$end" ]; do
    start=$(date +%s.%N)
    psql "$conn" -X -q -A -t -c "select 1" >/dev/null 2>&1 && ok=1 || ok=0
    echo "$(echo "$(date +%s.%N) - $start" | bc) $ok" >>"$logins"
    sleep 1
  done
) &
login_loop=$!

rm -f "$work"/pgbench_log.*
(cd "$work" && "$pgbench" -n -M simple -c "$clients" -j 2 -T "$seconds" -f mixed.sql -l \
  --log-prefix=pgbench_log "$conn") >"$work/pgbench.out" 2>&1 || true
wait "$heavy" "$login_loop" || true
sleep 2
rss_after=$(rss)

tps=$(sed -n 's/^tps = \([0-9.]*\).*/\1/p' "$work/pgbench.out" | head -1)
failed=$(sed -n 's/^number of failed transactions: \([0-9]*\).*/\1/p' "$work/pgbench.out" | head -1)
done_tx=$(sed -n 's/^number of transactions actually processed: \([0-9]*\).*/\1/p' "$work/pgbench.out" | head -1)
aborted=$(grep -c "aborted\|error" "$work/pgbench.out" || true)
read -r p50 p99 < <(cat "$work"/pgbench_log.* | awk '{print $3}' | sort -n \
  | awk '{a[NR]=$1} END {if (NR) printf "%.1f %.1f\n", a[int(NR*0.5)+0]/1000, a[int(NR*0.99)+0]/1000; else print "- -"}')
timeouts=$(grep -c "57014\|statement timeout" "$heavy_log" || true)
heavy_other=$(grep -v "statement timeout" "$heavy_log" | grep -c "ERROR\|FATAL" || true)
slow=$(awk '$1 > 1.0 || $2 == 0' "$logins" | wc -l)
nlog=$(wc -l <"$logins")
worst=$(sort -n "$logins" | tail -1 | awk '{print $1}')

echo "kbcrm serve soak: scale $scale, $clients pgbench clients for $seconds s (mixed read script), one heavy client with a 2 s timeout"
echo "  pgbench: ${tps:-?} tps, ${done_tx:-?} transactions, ${failed:-0} failed, ${aborted} client errors; latency p50 ${p50} ms, p99 ${p99} ms"
echo "  heavy queries stopped by the timeout: $timeouts; other errors: $heavy_other"
echo "  logins: $nlog, over 1 s or failed: $slow (slowest ${worst} s)"
echo "  server RSS: ${rss_before} kB before, ${rss_after} kB after"
if [ "${failed:-0}" != "0" ] || [ "$aborted" != "0" ]; then
  tail -20 "$work/pgbench.out"
fi
