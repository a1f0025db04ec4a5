"""What the side-by-side benchmark scripts (benches/compare, benches/tpch-compare) share: the
Python environment, the release binary, `kbcrm serve` for a client, DuckDB with the same limits,
a Delta table's current Parquet files, result comparison and the statistics."""

import json
import re
import math
import os
import time
import platform
import statistics
import subprocess
import sys
from decimal import Decimal
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
VENV = REPO / "target" / "bench-venv"
KBCRM = REPO / "target" / "release" / "kbcrm"
PASSWORD = "bench-password"
MEMORY = "4GB"

try:
    import duckdb
    import psycopg
    import yaml  # noqa: F401  (the scripts use it; installed here with the rest)
except ImportError:
    # First use: a virtual environment under target/ with the clients, then the script again in it.
    python = VENV / "bin" / "python"
    if Path(sys.prefix).resolve() == VENV.resolve():
        raise
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", "duckdb", "psycopg[binary]", "pyyaml"],
                   check=True)
    os.execv(str(python), [str(python), sys.argv[0], *sys.argv[1:]])


def sh(*args, **kw):
    return subprocess.run([str(a) for a in args], check=True, **kw)


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def build(no_build):
    if not no_build:
        sh("cargo", "build", "--release", "--quiet", cwd=REPO)


def machine(scale, repeat):
    """One line naming both engines, the scale, the repetitions and the machine."""
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    version = subprocess.run([KBCRM, "--version"], capture_output=True, text=True).stdout.strip()
    return (f"{version} vs DuckDB {duckdb.__version__}; scale {scale}; median of {repeat} after a "
            f"warm-up; {os.cpu_count()} cores ({cpu}), {MEMORY} memory limit each; {platform.platform()}")


# --- the engines ---------------------------------------------------------------------------------

def add_user(proj):
    """The server's login (again: kbcrm.yaml may have been replaced to try a setting)."""
    sh(KBCRM, "user", "add", "bench", "--role", "admin", "--password-stdin", cwd=proj,
       input=PASSWORD.encode(), stdout=subprocess.DEVNULL)


def start_serve(proj, rollups=False):
    """`kbcrm serve` on a free loopback port; returns the process and a psycopg connection string."""
    env = dict(os.environ, KBCRM_ROLLUPS="on" if rollups else "off")
    p = subprocess.Popen([str(KBCRM), "serve", "--listen", "127.0.0.1:0", "-q"], cwd=proj,
                         stdout=subprocess.PIPE, text=True, env=env)
    line = p.stdout.readline()
    port = int(line.split("listening on ")[1].split(";")[0].rsplit(":", 1)[1])
    return p, f"host=127.0.0.1 port={port} user=bench password={PASSWORD} dbname=kbcrm"


def warm_serve(run, names, most=8):
    """Passes over the queries until one is no faster than the one before: the server loads the
    columns a query reads into its cache (`serve.cache`) in the background after the query."""
    last = float("inf")
    for _ in range(most):
        t = time.perf_counter()
        for name in names:
            run(name)
        took = time.perf_counter() - t
        if took >= last * 0.97:
            return
        last = took


def peak_rss(pid):
    """Peak resident memory of a running process, in bytes."""
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def duck(path=":memory:"):
    con = duckdb.connect(str(path))
    con.execute(f"set memory_limit = '{MEMORY}'")
    con.execute(f"set threads = {os.cpu_count()}")
    con.execute("set TimeZone = 'UTC'")
    return con


DUCK_TYPES = {"string": "VARCHAR", "int": "INTEGER", "bigint": "BIGINT", "double": "DOUBLE",
              "date": "DATE", "timestamp": "TIMESTAMP", "bool": "BOOLEAN"}


def duck_type(spec):
    """DuckDB's name for a type a kbcrm schema declares."""
    t = spec["type"] if isinstance(spec, dict) else spec
    m = re.fullmatch(r"decimal\((\d+),\s*(\d+)\)", t)
    return f"DECIMAL({m[1]},{m[2]})" if m else DUCK_TYPES[t]


# --- Delta tables as Parquet file lists ----------------------------------------------------------

def active_files(table_dir):
    """The Parquet files of a Delta table's current version (its log replayed)."""
    log_dir = table_dir / "_delta_log"
    files, start = set(), 0
    last = log_dir / "_last_checkpoint"
    if last.exists():
        version = json.loads(last.read_text())["version"]
        parts = sorted(log_dir.glob(f"{version:020d}.checkpoint*.parquet"))
        con = duckdb.connect()
        rows = con.execute("select add.path, remove.path from read_parquet(?)", [[str(p) for p in parts]])
        for add, remove in rows.fetchall():
            if add:
                files.add(add)
            if remove:
                files.discard(remove)
        start = version + 1
    for commit in sorted(log_dir.glob("*.json")):
        if int(commit.stem) < start:
            continue
        for line in commit.read_text().splitlines():
            action = json.loads(line)
            if "add" in action:
                files.add(action["add"]["path"])
            elif "remove" in action:
                files.discard(action["remove"]["path"])
    return [str(table_dir / f) for f in sorted(files)]


def register_views(con, warehouse, tables):
    for t in tables:
        files = active_files(warehouse / t)
        con.execute(f"create or replace view {t} as select * from read_parquet({files!r})")


# --- results -------------------------------------------------------------------------------------

def normal(rows):
    """Rows with numbers to six significant digits and dates as text, comparable across engines."""
    def cell(v):
        if isinstance(v, (float, Decimal)):
            v = float(v)
            return None if math.isnan(v) else float(f"{v:.6g}")
        if hasattr(v, "isoformat"):
            return v.isoformat()
        return v
    return [tuple(cell(v) for v in r) for r in rows]


def same_rows(a, b):
    """Equal results (numbers within the last of their six digits), in order or, for an order
    the query leaves open, as sets."""
    def close(x, y):
        numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (x, y))
        return math.isclose(x, y, rel_tol=2e-5, abs_tol=1e-9) if numbers else x == y

    def equal(p, q):
        return len(p) == len(q) and all(
            len(r) == len(s) and all(close(x, y) for x, y in zip(r, s)) for r, s in zip(p, q))
    return equal(a, b) or equal(sorted(a, key=repr), sorted(b, key=repr))


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def geomean(xs):
    xs = [x for x in xs if x > 0 and not math.isnan(x)]
    return math.exp(sum(map(math.log, xs)) / len(xs)) if xs else float("nan")
