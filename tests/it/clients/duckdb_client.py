"""DuckDB's postgres extension against `kbcrm serve` (port in KBCRM_PORT), as the analyst user:
ATTACH, the catalog it loads, a table read over binary COPY, a join and a pushed-down filter.
Prints one line per check for the Rust test to compare with values from the fixture."""
import glob
import os

import duckdb
import duckdb_extension_postgres_scanner as ext_pkg

ext = glob.glob(os.path.join(os.path.dirname(ext_pkg.__file__), "extensions", "*",
                             "postgres_scanner.duckdb_extension"))[0]
con = duckdb.connect()
con.execute("SET autoinstall_known_extensions = false")
con.execute(f"LOAD '{ext}'")
port = os.environ["KBCRM_PORT"]
con.execute(f"ATTACH 'host=127.0.0.1 port={port} user=ann password=ann-pw-2025 dbname=kbcrm' "
            "AS pg (TYPE postgres, READ_ONLY)")


def cell(v):
    return "None" if v is None else str(v).lower() if isinstance(v, bool) else str(v)


def line(label, rows):
    print(label, " ".join("|".join(cell(v) for v in r) for r in rows))


tables = sorted(r[2] for r in con.sql("SHOW ALL TABLES").fetchall() if r[0] == "pg")
print("tables", ",".join(tables))
line("customers", con.sql("SELECT * FROM pg.public.customers ORDER BY customer_id").fetchall())
line("by region", con.sql(
    "SELECT c.region, count(*), sum(s.amount) FROM pg.public.sales s "
    "JOIN pg.public.customers c USING (customer_id) GROUP BY c.region ORDER BY 1").fetchall())
line("filtered", con.sql(
    "SELECT order_id, order_date, paid FROM pg.public.sales WHERE amount > 9 AND paid "
    "ORDER BY order_id").fetchall())
