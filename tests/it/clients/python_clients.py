"""BI-style Python clients against `kbcrm serve`: psycopg 3 (simple and extended protocol,
server-side parameters), SQLAlchemy's PostgreSQL dialect (inspect: table names, columns and
types) and pandas read_sql.
Run by tests/it/serve.rs with KBCRM_PORT set; the fixture's users and tables are there."""

import datetime
import decimal
import os
import sys

import pandas as pd
import psycopg
import sqlalchemy

PORT = int(os.environ["KBCRM_PORT"])
DSN = f"host=127.0.0.1 port={PORT} dbname=kbcrm user=ann password=ann-pw-2025"


def check(cond, what):
    if not cond:
        print(f"FAILED: {what}", file=sys.stderr)
        sys.exit(1)


with psycopg.connect(DSN) as conn:
    check(conn.info.parameter_status("server_version").startswith("15"), "server_version")
    with conn.cursor() as cur:
        # Simple protocol.
        cur.execute("select count(*) from sales", prepare=False)
        check(cur.fetchone()[0] == 5, "count over the simple protocol")
        # Extended protocol with a server-side parameter, typed results.
        cur.execute(
            "select customer_id, credit_limit, order_date, amount, paid from customers "
            "join sales using (customer_id) where order_id = %s",
            ("O2",),
            prepare=True,
        )
        row = cur.fetchone()
        check(row[0] == "C1", f"customer of O2: {row}")
        check(row[1] == decimal.Decimal("1000.50"), f"numeric: {row[1]!r}")
        check(row[2] == datetime.date(2025, 2, 5), f"date: {row[2]!r}")
        check(row[3] == 50.75, f"double: {row[3]!r}")
        check(row[4] is False, f"bool: {row[4]!r}")
        check([d.name for d in cur.description] == ["customer_id", "credit_limit", "order_date", "amount", "paid"], "description")
        # Wire types: text, numeric, date, float8, bool.
        check([d.type_code for d in cur.description] == [25, 1700, 1082, 701, 16], f"type oids {[d.type_code for d in cur.description]}")
        # PII is masked for this role.
        cur.execute("select name from customers where customer_id = %s", ("C2",))
        check(cur.fetchone()[0] == "***", "masked name")
        # Refused statements raise the PostgreSQL error classes.
        try:
            cur.execute("delete from sales")
            check(False, "delete was accepted")
        except psycopg.errors.ReadOnlySqlTransaction:
            pass
    conn.rollback()

engine = sqlalchemy.create_engine(f"postgresql+psycopg://ann:ann-pw-2025@127.0.0.1:{PORT}/kbcrm")
insp = sqlalchemy.inspect(engine)
tables = sorted(insp.get_table_names())
check(tables == ["customers", "sales"], f"inspect tables: {tables}")
check(insp.has_table("sales") and not insp.has_table("secrets"), "has_table")
cols = {c["name"]: c["type"] for c in insp.get_columns("sales")}
check(list(cols) == ["order_id", "customer_id", "order_date", "amount", "paid"], f"columns: {cols}")
check(isinstance(cols["order_date"], sqlalchemy.types.Date), f"date type: {cols['order_date']!r}")
check(isinstance(cols["paid"], sqlalchemy.types.Boolean), f"bool type: {cols['paid']!r}")
check(isinstance(cols["amount"], sqlalchemy.types.Float), f"double type: {cols['amount']!r}")
masked = {c["name"] for c in insp.get_columns("customers")}
check("email" in masked and "credit_limit" in masked, f"customers columns: {masked}")
# What BI tools (Superset, DBeaver through SQLAlchemy) ask next: schemas, keys, constraints.
check("public" in insp.get_schema_names(), f"schemas: {insp.get_schema_names()}")
pk = insp.get_pk_constraint("sales")
check(pk["constrained_columns"] == [], f"primary key: {pk}")
check(insp.get_foreign_keys("sales") == [], "foreign keys")
check(insp.get_unique_constraints("sales") == [], "unique constraints")
check(insp.get_check_constraints("sales") == [], "check constraints")
check(insp.get_table_comment("sales")["text"] is None, "table comment")

with engine.connect() as c:
    df = pd.read_sql("select customer_id, sum(amount) as total from sales group by customer_id order by customer_id", c)
check(list(df["customer_id"]) == ["C1", "C2", "C3", "C4"], f"pandas rows: {df}")
check(abs(df["total"][0] - 151.0) < 1e-9, f"pandas total: {df}")

print("all python client checks passed")
