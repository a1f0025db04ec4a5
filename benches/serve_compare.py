#!/usr/bin/env python3
"""kbcrm serve next to PostgreSQL, on the same tables, the same machine, in one run.

    python3 benches/serve_compare.py [--scale 0.25] [--clients 16] [--seconds 8] [--repeat 3]

Sets up both servers: generates sample data, builds the warehouse with the release binary,
starts `kbcrm serve`, starts a throwaway PostgreSQL (initdb in a temporary folder, loopback
only) and copies the benchmarked tables into it through the kbcrm server (with an index on
the point-lookup key, as a PostgreSQL user would have). Then, alternating the two servers:

  1. point lookups on a cube: `select * from cube_churn_warning where customer_id = $1`,
  2. a rollup query: revenue by region from cube_sales_rollup,
  each by --clients concurrent psycopg connections for --seconds; throughput and p50/p99;
  3. streaming a 1,000,000-row result (fact_sales) to one psycopg client: rows/s.

Prints median figures over --repeat rounds and the ratio kbcrm/PostgreSQL. Needs psycopg
(`pip install 'psycopg[binary]'`) and PostgreSQL's server binaries (`apt-get install
postgresql`); run it as a user PostgreSQL accepts (as root it runs the server as `postgres`).
"""

import argparse
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psycopg

REPO = Path(__file__).resolve().parent.parent
WORK = REPO / "target" / "bench-serve"
PASSWORD = "bench-password"

POINT = "select * from cube_churn_warning where customer_id = %s"
ROLLUP = (
    "select region, sum(revenue) as revenue, sum(orders) as orders from cube_sales_rollup "
    "where grouping_level = 'region' group by region order by revenue desc"
)
STREAM = "select order_id, line_no, customer_id, product_id, net_amount from fact_sales limit 1000000"
TABLES = ["cube_churn_warning", "cube_sales_rollup", "fact_sales"]

PG_TYPES = {16: "boolean", 20: "bigint", 21: "smallint", 23: "integer", 25: "text", 700: "real",
            701: "double precision", 1043: "text", 1082: "date", 1114: "timestamp",
            1184: "timestamptz", 1700: "numeric"}


def sh(*args, **kw):
    return subprocess.run(args, check=True, **kw)


def kbcrm(*args, **kw):
    return sh(str(REPO / "target" / "release" / "kbcrm"), *args, cwd=WORK / "project", **kw)


def build_warehouse(scale):
    if not (REPO / "target" / "release" / "kbcrm").exists():
        sh("cargo", "build", "--release", cwd=REPO)
    proj = WORK / "project"
    stamp = proj / f".scale-{scale}"
    if stamp.exists():
        return
    shutil.rmtree(proj, ignore_errors=True)
    proj.mkdir(parents=True)
    for d in ("pipelines", "sql"):
        (proj / d).symlink_to(REPO / d)
    shutil.copy(REPO / "kbcrm.yaml", proj / "kbcrm.yaml")
    kbcrm("generate", "--scale", str(scale), "--seed", "11", "--out", "sources", stdout=subprocess.DEVNULL)
    kbcrm("run", "--as-of", "2025-12-31", "-q", stdout=subprocess.DEVNULL)
    kbcrm("user", "add", "bench", "--role", "admin", "--password-stdin",
          input=PASSWORD.encode(), stdout=subprocess.DEVNULL)
    stamp.touch()


def start_kbcrm():
    p = subprocess.Popen([str(REPO / "target" / "release" / "kbcrm"), "serve", "--listen", "127.0.0.1:0", "-q"],
                         cwd=WORK / "project", stdout=subprocess.PIPE, text=True)
    line = p.stdout.readline()
    port = int(line.split("listening on ")[1].split(";")[0].rsplit(":", 1)[1])
    return p, f"host=127.0.0.1 port={port} user=bench password={PASSWORD} dbname=kbcrm"


def pg_bin(name):
    found = shutil.which(name)
    if found:
        return found
    for d in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (d / name).exists():
            return str(d / name)
    sys.exit(f"{name} not found: install PostgreSQL's server (apt-get install postgresql)")


def start_postgres():
    data = Path(tempfile.mkdtemp(prefix="kbcrm-bench-pg-"))
    as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    if as_user:
        shutil.chown(data, "postgres")
    sh(*as_user, pg_bin("initdb"), "-D", str(data / "db"), "-U", "postgres", "--auth=trust",
       stdout=subprocess.DEVNULL)
    port = random.randint(20000, 30000)
    sh(*as_user, pg_bin("pg_ctl"), "-D", str(data / "db"), "-w", "-l", str(data / "log"),
       "-o", f"-p {port} -c listen_addresses=127.0.0.1 -k {data} -c shared_buffers=256MB",
       "start", stdout=subprocess.DEVNULL)
    return (as_user, data), f"host=127.0.0.1 port={port} user=postgres dbname=postgres"


def stop_postgres(handle):
    as_user, data = handle
    subprocess.run([*as_user, pg_bin("pg_ctl"), "-D", str(data / "db"), "-m", "fast", "stop"],
                   stdout=subprocess.DEVNULL)
    shutil.rmtree(data, ignore_errors=True)


def copy_tables(src_dsn, dst_dsn):
    with psycopg.connect(src_dsn) as src, psycopg.connect(dst_dsn, autocommit=True) as dst:
        for t in TABLES:
            with src.cursor() as cur:
                cur.execute(f"select * from {t} limit 0")
                cols = [(d.name, PG_TYPES.get(d.type_code, "text")) for d in cur.description]
            dst.execute(f"drop table if exists {t}")
            dst.execute(f"create table {t} ({', '.join(f'{n} {ty}' for n, ty in cols)})")
            with src.cursor() as cur:
                cur.execute(f"select * from {t}")
                with dst.cursor().copy(f"copy {t} from stdin") as copy:
                    for row in cur:
                        copy.write_row(row)
        dst.execute("create index on cube_churn_warning (customer_id)")
        dst.execute("analyze")


def customer_ids(dsn):
    with psycopg.connect(dsn) as c:
        return [r[0] for r in c.execute("select customer_id from cube_churn_warning")]


def load(dsn, sql, params_of, clients, seconds):
    latencies = []
    lock = threading.Lock()
    stop = time.monotonic() + seconds

    def worker():
        mine = []
        with psycopg.connect(dsn) as c:
            while time.monotonic() < stop:
                t = time.perf_counter()
                c.execute(sql, params_of()).fetchall()
                mine.append(time.perf_counter() - t)
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - started
    latencies.sort()
    q = lambda p: latencies[min(len(latencies) - 1, int(p * len(latencies)))] * 1000
    return {"qps": len(latencies) / elapsed, "p50": q(0.50), "p99": q(0.99)}


def stream(dsn):
    with psycopg.connect(dsn) as c:
        t = time.perf_counter()
        n = len(c.execute(STREAM).fetchall())
        return {"rows/s": n / (time.perf_counter() - t), "rows": n}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--scale", type=float, default=0.25)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=8)
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    build_warehouse(a.scale)
    kb, kb_dsn = start_kbcrm()
    pg, pg_dsn = start_postgres()
    try:
        copy_tables(kb_dsn, pg_dsn)
        ids = customer_ids(kb_dsn)
        results = {("kbcrm", k): [] for k in ("point", "rollup", "stream")}
        results.update({("postgres", k): [] for k in ("point", "rollup", "stream")})
        for round_ in range(a.repeat):
            for name, dsn in (("kbcrm", kb_dsn), ("postgres", pg_dsn)):
                results[(name, "point")].append(load(dsn, POINT, lambda: (random.choice(ids),), a.clients, a.seconds))
                results[(name, "rollup")].append(load(dsn, ROLLUP, lambda: None, a.clients, a.seconds))
                results[(name, "stream")].append(stream(dsn))
        print(f"\nkbcrm serve vs PostgreSQL {a.clients} clients, {a.seconds}s per run, median of {a.repeat} "
              f"(scale {a.scale}, {len(ids)} customers, {results[('kbcrm', 'stream')][0]['rows']} streamed rows)")
        print(f"{'workload':<16}{'metric':<10}{'kbcrm':>12}{'postgres':>12}{'ratio':>9}")
        for work, metrics in (("point lookup", ("qps", "p50", "p99")), ("rollup", ("qps", "p50", "p99")),
                              ("stream 1M rows", ("rows/s",))):
            key = {"point lookup": "point", "rollup": "rollup", "stream 1M rows": "stream"}[work]
            for m in metrics:
                kv = statistics.median(r[m] for r in results[("kbcrm", key)])
                pv = statistics.median(r[m] for r in results[("postgres", key)])
                unit = " ms" if m in ("p50", "p99") else ""
                print(f"{work:<16}{m + unit:<10}{kv:>12.1f}{pv:>12.1f}{kv / pv:>9.2f}")
    finally:
        kb.terminate()
        stop_postgres(pg)


if __name__ == "__main__":
    main()
