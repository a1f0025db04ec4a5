//! What common PostgreSQL clients ask of the system catalogs beyond what datafusion-postgres
//! emulates: psql's `\d+ \df \du \dT \dp \l` queries, pg_dump's catalog reads, DuckDB's
//! postgres extension. A warehouse has no indexes, constraints, triggers, ACLs, comments or
//! extensions of its own, so most of the answers are "none"; what matters is that the queries
//! plan and answer as PostgreSQL would for such a database.
//!
//! - Every `pg_catalog` table gains the columns clients read that the emulation lacks
//!   (`tableoid`, the `*acl` columns, pg_dump's `attoptions` and friends), as NULL or the
//!   value PostgreSQL gives an object without any; `pg_class.relpages` reads 0 (never
//!   analysed), which keeps DuckDB from scanning by `ctid`.
//! - Catalogs and views it lacks (`pg_indexes`, `pg_transform`, `pg_seclabels`) exist, empty.
//! - The functions those queries call exist ([`register_functions`]).
//! - `ARRAY(subquery)`, a table function over an options column, and `to_regclass('name')`
//!   are rewritten into forms the engine plans ([`rewrite`]).

mod functions;
mod rewrite;

pub(crate) use functions::text_formatters;
pub use functions::{register_functions, size_pretty};
pub use rewrite::rewrite;
use std::collections::BTreeMap;
use std::ops::ControlFlow;
use std::sync::Arc;

use async_trait::async_trait;
use datafusion::arrow::datatypes::{DataType, Field, Schema};
use datafusion::catalog::{SchemaProvider, TableProvider};
use datafusion::common::{Column, ScalarValue};
use datafusion::datasource::{MemTable, ViewTable, provider_as_source};
use datafusion::error::{DataFusionError, Result};
use datafusion::logical_expr::{
    ColumnarValue, Expr as PlanExpr, LogicalPlanBuilder, ScalarFunctionArgs, ScalarUDF,
    ScalarUDFImpl, Signature, Volatility, create_udf, lit,
};
use datafusion::prelude::SessionContext;
use datafusion::sql::sqlparser::ast::{
    Expr, FunctionArg, FunctionArgExpr, FunctionArguments, Query, Statement, TableFactor, VisitMut,
    VisitorMut, visit_expressions_mut,
};
use datafusion::sql::sqlparser::dialect::PostgreSqlDialect;
use datafusion::sql::sqlparser::parser::Parser;
use datafusion_postgres::datafusion_pg_catalog::pg_catalog::context::{
    PgCatalogContextProvider, Role,
};

/// Catalogs of things attached to tables that a warehouse's tables never have (rules,
/// triggers, indexes, constraints, inheritance, defaults, policies, comments, dependencies,
/// security labels): empty. The emulation fills some with rows of PostgreSQL's own system
/// objects that its `pg_class` does not list, which pg_dump rejects.
const EMPTY_CATALOGS: &[&str] = &[
    "pg_rewrite",
    "pg_trigger",
    "pg_index",
    "pg_constraint",
    "pg_inherits",
    "pg_attrdef",
    "pg_policy",
    "pg_statistic_ext",
    "pg_publication_rel",
    "pg_depend",
    "pg_description",
    "pg_init_privs",
    "pg_seclabel",
    "pg_event_trigger",
    "pg_default_acl",
];

/// The oid PostgreSQL gives each system catalog (what `tableoid` reads).
const CATALOG_OIDS: &[(&str, i32)] = &[
    ("pg_aggregate", 2600),
    ("pg_am", 2601),
    ("pg_amop", 2602),
    ("pg_amproc", 2603),
    ("pg_attrdef", 2604),
    ("pg_attribute", 1249),
    ("pg_auth_members", 1261),
    ("pg_authid", 1260),
    ("pg_cast", 2605),
    ("pg_class", 1259),
    ("pg_collation", 3456),
    ("pg_constraint", 2606),
    ("pg_conversion", 2607),
    ("pg_database", 1262),
    ("pg_db_role_setting", 2964),
    ("pg_default_acl", 826),
    ("pg_depend", 2608),
    ("pg_description", 2609),
    ("pg_enum", 3501),
    ("pg_event_trigger", 3466),
    ("pg_extension", 3079),
    ("pg_foreign_data_wrapper", 2328),
    ("pg_foreign_server", 1417),
    ("pg_foreign_table", 3118),
    ("pg_index", 2610),
    ("pg_inherits", 2611),
    ("pg_init_privs", 3394),
    ("pg_language", 2612),
    ("pg_largeobject_metadata", 2995),
    ("pg_namespace", 2615),
    ("pg_opclass", 2616),
    ("pg_operator", 2617),
    ("pg_opfamily", 2753),
    ("pg_partitioned_table", 3350),
    ("pg_policy", 3256),
    ("pg_proc", 1255),
    ("pg_publication", 6104),
    ("pg_publication_namespace", 6237),
    ("pg_publication_rel", 6106),
    ("pg_range", 3541),
    ("pg_rewrite", 2618),
    ("pg_seclabel", 3596),
    ("pg_sequence", 2224),
    ("pg_shdepend", 1214),
    ("pg_shdescription", 2396),
    ("pg_statistic", 2619),
    ("pg_statistic_ext", 3381),
    ("pg_subscription", 6100),
    ("pg_tablespace", 1213),
    ("pg_transform", 3576),
    ("pg_trigger", 2620),
    ("pg_ts_config", 3602),
    ("pg_ts_dict", 3600),
    ("pg_ts_parser", 3601),
    ("pg_ts_template", 3764),
    ("pg_type", 1247),
    ("pg_user_mapping", 1418),
];

/// Array columns of PostgreSQL 15's catalogs that clients read and that are always NULL in a
/// warehouse: privileges (no grants inside it), options and settings (none set). The
/// emulation lacks some and types others as text; here all are NULL text arrays.
const NULL_ARRAYS: &[(&str, &str)] = &[
    ("pg_policy", "polroles"),
    ("pg_publication_rel", "prattrs"),
    ("pg_statistic_ext", "stxkind"),
    ("pg_extension", "extconfig"),
    ("pg_extension", "extcondition"),
    ("pg_class", "relacl"),
    ("pg_class", "reloptions"),
    ("pg_attribute", "attacl"),
    ("pg_attribute", "attoptions"),
    ("pg_attribute", "attfdwoptions"),
    ("pg_type", "typacl"),
    ("pg_proc", "proacl"),
    ("pg_proc", "proconfig"),
    ("pg_language", "lanacl"),
    ("pg_namespace", "nspacl"),
    ("pg_database", "datacl"),
    ("pg_tablespace", "spcacl"),
    ("pg_tablespace", "spcoptions"),
    ("pg_foreign_data_wrapper", "fdwacl"),
    ("pg_foreign_data_wrapper", "fdwoptions"),
    ("pg_foreign_server", "srvacl"),
    ("pg_foreign_server", "srvoptions"),
    ("pg_foreign_table", "ftoptions"),
    ("pg_user_mapping", "umoptions"),
    ("pg_largeobject_metadata", "lomacl"),
    ("pg_db_role_setting", "setconfig"),
    ("pg_event_trigger", "evttags"),
    ("pg_default_acl", "defaclacl"),
    ("pg_init_privs", "initprivs"),
];

/// Other columns clients read that the emulation lacks, always NULL here.
fn missing_columns(table: &str) -> Vec<(&'static str, DataType)> {
    let mut columns: Vec<(&'static str, DataType)> = NULL_ARRAYS
        .iter()
        .filter(|(t, _)| *t == table)
        .map(|(_, c)| {
            // Arrays of oids hold numbers, the others text.
            let element = match *c {
                "polroles" | "extconfig" => DataType::Int32,
                "prattrs" => DataType::Int16,
                _ => DataType::Utf8,
            };
            (
                *c,
                DataType::List(Arc::new(Field::new_list_field(element, true))),
            )
        })
        .collect();
    if table == "pg_attribute" {
        columns.push(("attmissingval", DataType::Utf8));
        columns.push(("attcompression", DataType::Utf8));
    }
    columns
}

/// Views and catalogs clients read that the emulation does not have; empty here.
fn extra_tables() -> Vec<(&'static str, Vec<(&'static str, DataType)>)> {
    let text = || DataType::Utf8;
    let oid = || DataType::Int32;
    vec![
        (
            "pg_indexes",
            vec![
                ("schemaname", text()),
                ("tablename", text()),
                ("indexname", text()),
                ("tablespace", text()),
                ("indexdef", text()),
            ],
        ),
        (
            "pg_transform",
            vec![
                ("oid", oid()),
                ("trftype", oid()),
                ("trflang", oid()),
                ("trffromsql", oid()),
                ("trftosql", oid()),
            ],
        ),
        (
            "pg_seclabels",
            vec![
                ("objoid", oid()),
                ("classoid", oid()),
                ("objsubid", DataType::Int32),
                ("objtype", text()),
                ("objnamespace", oid()),
                ("objname", text()),
                ("provider", text()),
                ("label", text()),
            ],
        ),
        (
            "pg_stat_wal_receiver",
            vec![("pid", DataType::Int32), ("status", text())],
        ),
    ]
}

/// The server's users as `pg_roles` lists them: each a login role, none a superuser.
#[derive(Debug, Clone)]
pub struct Users(pub Arc<Vec<String>>);

#[async_trait]
impl PgCatalogContextProvider for Users {
    async fn roles(&self) -> Vec<String> {
        self.0.as_ref().clone()
    }

    async fn role(&self, name: &str) -> Option<Role> {
        self.0.iter().any(|u| u == name).then(|| Role {
            name: name.to_string(),
            is_superuser: false,
            can_login: true,
            can_create_db: false,
            can_create_role: false,
            can_create_user: false,
            can_replication: false,
            grants: Vec::new(),
            inherited_roles: Vec::new(),
        })
    }
}

/// The oid PostgreSQL gives its bootstrap superuser, which owns every object here.
const OWNER_OID: i32 = 10;

/// `pg_roles`: the owner of every object (`postgres`, as in PostgreSQL, no login) and the
/// server's users, each a login role without privileges beyond reading.
fn pg_roles(users: &[String]) -> Result<MemTable> {
    use datafusion::arrow::array::{
        ArrayRef, BooleanArray, Int32Array, StringArray, TimestampMicrosecondArray,
    };
    use datafusion::arrow::datatypes::TimeUnit;
    let names: Vec<&str> = std::iter::once("postgres")
        .chain(
            users
                .iter()
                .map(String::as_str)
                .filter(|u| *u != "postgres"),
        )
        .collect();
    let n = names.len();
    let owner: Vec<bool> = (0..n).map(|i| i == 0).collect();
    let login: Vec<bool> = (0..n).map(|i| i != 0).collect();
    let never = vec![false; n];
    let utc = DataType::Timestamp(TimeUnit::Microsecond, Some(Arc::from("UTC")));
    let list = DataType::List(Arc::new(Field::new("item", DataType::Utf8, true)));
    let schema = Arc::new(Schema::new(vec![
        Field::new("rolname", DataType::Utf8, true),
        Field::new("rolsuper", DataType::Boolean, true),
        Field::new("rolinherit", DataType::Boolean, true),
        Field::new("rolcreaterole", DataType::Boolean, true),
        Field::new("rolcreatedb", DataType::Boolean, true),
        Field::new("rolcanlogin", DataType::Boolean, true),
        Field::new("rolreplication", DataType::Boolean, true),
        Field::new("rolconnlimit", DataType::Int32, true),
        Field::new("rolpassword", DataType::Utf8, true),
        Field::new("rolvaliduntil", utc.clone(), true),
        Field::new("rolbypassrls", DataType::Boolean, true),
        Field::new("rolconfig", list.clone(), true),
        Field::new("oid", DataType::Int32, true),
    ]));
    let columns: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from(names.clone())),
        Arc::new(BooleanArray::from(owner.clone())),
        Arc::new(BooleanArray::from(vec![true; n])),
        Arc::new(BooleanArray::from(owner.clone())),
        Arc::new(BooleanArray::from(owner)),
        Arc::new(BooleanArray::from(login)),
        Arc::new(BooleanArray::from(never.clone())),
        Arc::new(Int32Array::from(vec![-1; n])),
        Arc::new(StringArray::from(vec![Some("********"); n])),
        Arc::new(TimestampMicrosecondArray::from(vec![None; n]).with_timezone("UTC")),
        Arc::new(BooleanArray::from(never)),
        datafusion::arrow::array::new_null_array(&list, n),
        Arc::new(Int32Array::from(
            (0..n)
                .map(|i| if i == 0 { OWNER_OID } else { 16_384 + i as i32 })
                .collect::<Vec<_>>(),
        )),
    ];
    let batch = datafusion::arrow::record_batch::RecordBatch::try_new(schema.clone(), columns)?;
    MemTable::try_new(schema, vec![vec![batch]])
}

/// Put the wider `pg_catalog` in place of the one `setup_pg_catalog` registered in `ctx`'s
/// catalog `database`; `users` are the server's users.
pub fn install(ctx: &SessionContext, database: &str, users: &[String]) -> Result<()> {
    let catalog = ctx.catalog(database).ok_or_else(|| {
        DataFusionError::Configuration(format!("no catalog {database} to extend"))
    })?;
    let inner = catalog
        .schema("pg_catalog")
        .ok_or_else(|| DataFusionError::Configuration("pg_catalog is not set up".to_string()))?;
    let mut extra: BTreeMap<String, Arc<dyn TableProvider>> = BTreeMap::new();
    for (name, columns) in extra_tables() {
        let schema = Arc::new(Schema::new(
            columns
                .into_iter()
                .map(|(n, t)| Field::new(n, t, true))
                .collect::<Vec<_>>(),
        ));
        extra.insert(
            name.to_string(),
            Arc::new(MemTable::try_new(schema, vec![vec![]])?),
        );
    }
    extra.insert("pg_roles".into(), Arc::new(pg_roles(users)?));
    catalog.register_schema("pg_catalog", Arc::new(Wider { inner, extra }))?;
    register_functions(ctx);
    Ok(())
}

/// `pg_catalog` with the missing columns and tables.
#[derive(Debug)]
struct Wider {
    inner: Arc<dyn SchemaProvider>,
    extra: BTreeMap<String, Arc<dyn TableProvider>>,
}

#[async_trait]
impl SchemaProvider for Wider {
    fn table_names(&self) -> Vec<String> {
        let mut names = self.inner.table_names();
        names.extend(self.extra.keys().cloned());
        names
    }

    async fn table(&self, name: &str) -> Result<Option<Arc<dyn TableProvider>>> {
        if let Some(t) = self.extra.get(name) {
            return Ok(Some(widened(name, t.clone())?));
        }
        match self.inner.table(name).await? {
            Some(t) if EMPTY_CATALOGS.contains(&name) => {
                let empty = MemTable::try_new(t.schema(), vec![vec![]])?;
                Ok(Some(widened(name, Arc::new(empty))?))
            }
            Some(t) => Ok(Some(widened(name, t)?)),
            None => Ok(None),
        }
    }

    fn table_exist(&self, name: &str) -> bool {
        self.extra.contains_key(name) || self.inner.table_exist(name)
    }
}

/// `table` as a view with `tableoid` and the missing columns added.
fn widened(name: &str, table: Arc<dyn TableProvider>) -> Result<Arc<dyn TableProvider>> {
    let schema = table.schema();
    let has = |c: &str| schema.field_with_name(c).is_ok();
    let missing = missing_columns(name);
    // One owner of everything: the bootstrap superuser `postgres`, listed in pg_roles.
    let is_owner = |c: &str| c.ends_with("owner") || c == "datdba";
    let mut exprs: Vec<PlanExpr> = schema
        .fields()
        .iter()
        .map(|f| {
            // Page counts of never-analysed tables: clients (DuckDB) then scan them whole
            // instead of by physical row position.
            if name == "pg_class" && f.name() == "relpages" {
                return Ok(lit(0i32).alias("relpages"));
            }
            if let Some((c, t)) = missing.iter().find(|(c, _)| c == f.name()) {
                return Ok(lit(ScalarValue::try_from(t)?).alias(*c));
            }
            if is_owner(f.name()) && f.data_type() == &DataType::Int32 {
                return Ok(lit(OWNER_OID).alias(f.name()));
            }
            Ok(PlanExpr::Column(Column::new(Some(name), f.name())))
        })
        .collect::<Result<_>>()?;
    if !has("tableoid") {
        let oid = CATALOG_OIDS
            .iter()
            .find(|(n, _)| *n == name)
            .map_or(0, |(_, o)| *o);
        exprs.push(lit(oid).alias("tableoid"));
    }
    for (column, data_type) in missing {
        if !has(column) {
            exprs.push(lit(ScalarValue::try_from(&data_type)?).alias(column));
        }
    }
    let mut plan =
        LogicalPlanBuilder::scan(name, provider_as_source(table), None)?.project(exprs)?;
    if name == "pg_namespace" {
        plan = with_system_schemas(plan)?;
    }
    Ok(Arc::new(ViewTable::new(plan.build()?, None)))
}

/// The schemas PostgreSQL always has that the emulation does not list, though its `pg_type`
/// and `pg_proc` name them (pg_dump refuses objects of a schema it cannot find).
const SYSTEM_SCHEMAS: &[(&str, i32)] = &[("information_schema", 13_283), ("pg_toast", 99)];

/// `pg_namespace` with [`SYSTEM_SCHEMAS`] added.
fn with_system_schemas(plan: LogicalPlanBuilder) -> Result<LogicalPlanBuilder> {
    use datafusion::logical_expr::col;
    let names: Vec<PlanExpr> = SYSTEM_SCHEMAS.iter().map(|(n, _)| lit(*n)).collect();
    let plan = plan.filter(col("nspname").in_list(names, true))?;
    let schema = plan.schema().as_arrow().clone();
    let mut columns = Vec::with_capacity(schema.fields().len());
    for f in schema.fields() {
        let values: Vec<ScalarValue> = SYSTEM_SCHEMAS
            .iter()
            .map(|(nspname, oid)| match f.name().as_str() {
                "oid" => ScalarValue::Int32(Some(*oid)).cast_to(f.data_type()),
                "nspname" => ScalarValue::Utf8(Some(nspname.to_string())).cast_to(f.data_type()),
                "nspowner" => ScalarValue::Int32(Some(OWNER_OID)).cast_to(f.data_type()),
                "tableoid" => ScalarValue::Int32(Some(2615)).cast_to(f.data_type()),
                _ => ScalarValue::try_from(f.data_type()),
            })
            .collect::<Result<_>>()?;
        columns.push(ScalarValue::iter_to_array(values)?);
    }
    let rows =
        datafusion::arrow::record_batch::RecordBatch::try_new(Arc::new(schema.clone()), columns)?;
    let extra = MemTable::try_new(Arc::new(schema), vec![vec![rows]])?;
    plan.union(
        LogicalPlanBuilder::scan("pg_namespace", provider_as_source(Arc::new(extra)), None)?
            .build()?,
    )
}

#[cfg(test)]
mod tests;
