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

/// A function answering `value` whatever its arguments (one or more of any type).
#[derive(Debug, PartialEq, Eq, Hash)]
struct Constant {
    name: String,
    signature: Signature,
    value: ScalarValue,
}

impl ScalarUDFImpl for Constant {
    fn name(&self) -> &str {
        &self.name
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, _: &[DataType]) -> Result<DataType> {
        Ok(self.value.data_type())
    }

    fn invoke_with_args(&self, _: ScalarFunctionArgs) -> Result<ColumnarValue> {
        Ok(ColumnarValue::Scalar(self.value.clone()))
    }
}

fn constant(name: &str, value: ScalarValue) -> ScalarUDF {
    ScalarUDF::new_from_impl(Constant {
        name: name.to_string(),
        signature: Signature::variadic_any(Volatility::Stable),
        value,
    })
}

/// The functions client catalog queries call that the engine lacks, answered as PostgreSQL
/// answers them for a database with no such objects.
pub fn register_functions(ctx: &SessionContext) {
    let yes = ScalarValue::Boolean(Some(true));
    let no_text = ScalarValue::Utf8(None);
    // Every object a client can name here is on the search path.
    for name in [
        "pg_function_is_visible",
        "pg_type_is_visible",
        "pg_conversion_is_visible",
        "pg_operator_is_visible",
        "pg_opclass_is_visible",
        "pg_opfamily_is_visible",
        "pg_ts_config_is_visible",
        "pg_ts_dict_is_visible",
        "pg_ts_parser_is_visible",
        "pg_ts_template_is_visible",
        "pg_statistics_obj_is_visible",
    ] {
        ctx.register_udf(constant(name, yes.clone()));
    }
    // No comments; no definitions of indexes, triggers, rules or views; functions are the
    // engine's own, without SQL signatures to show.
    for name in [
        "obj_description",
        "col_description",
        "shobj_description",
        "pg_get_triggerdef",
        "pg_get_indexdef",
        "pg_get_ruledef",
        "pg_get_viewdef",
        "pg_get_function_result",
        "pg_get_function_arguments",
        "pg_get_function_identity_arguments",
    ] {
        ctx.register_udf(constant(name, no_text.clone()));
    }
    // Default privileges: none granted inside the warehouse (pg_dump reads them as text).
    ctx.register_udf(constant("acldefault", no_text.clone()));
    ctx.register_udf(quote_literal_udf());
    ctx.register_udf(constant(
        "pg_tablespace_location",
        ScalarValue::Utf8(Some(String::new())),
    ));
    // Sizes the warehouse does not keep per table as PostgreSQL does.
    for name in ["pg_table_size", "pg_database_size", "pg_indexes_size"] {
        ctx.register_udf(constant(name, ScalarValue::Int64(None)));
    }
    ctx.register_udf(create_udf(
        "pg_is_in_recovery",
        vec![],
        DataType::Boolean,
        Volatility::Stable,
        Arc::new(|_: &[ColumnarValue]| {
            Ok(ColumnarValue::Scalar(ScalarValue::Boolean(Some(false))))
        }),
    ));
    ctx.register_udf(set_config_udf());
    ctx.register_udf(pg_size_pretty_udf(DataType::Int64));
    ctx.register_udf(ScalarUDF::new_from_impl(Format::new()));
}

/// `format(formatstr, args...)`: `%s` as text, `%I` as a quoted identifier, `%L` as a quoted
/// literal, `%%` a percent sign (positions such as `%1$s` are not supported).
#[derive(Debug, PartialEq, Eq, Hash)]
struct Format {
    signature: Signature,
}

impl Format {
    fn new() -> Self {
        Format {
            signature: Signature::variadic_any(Volatility::Stable),
        }
    }
}

impl ScalarUDFImpl for Format {
    fn name(&self) -> &str {
        "format"
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, _: &[DataType]) -> Result<DataType> {
        Ok(DataType::Utf8)
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        use datafusion::arrow::array::{Array, StringBuilder};
        use datafusion::arrow::util::display::FormatOptions;
        let arrays = ColumnarValue::values_to_arrays(&args.args)?;
        let options = FormatOptions::default();
        let formatters = text_formatters(&arrays, &options)?;
        let mut out = StringBuilder::new();
        for row in 0..args.number_rows {
            if arrays[0].is_null(row) {
                out.append_null();
                continue;
            }
            let text = |i: usize| -> Option<String> {
                (!arrays[i].is_null(row)).then(|| formatters[i].value(row).to_string())
            };
            let template = text(0).unwrap_or_default();
            let mut result = String::new();
            let mut next = 1;
            let mut chars = template.chars();
            while let Some(c) = chars.next() {
                if c != '%' {
                    result.push(c);
                    continue;
                }
                let spec = chars.next();
                if spec == Some('%') {
                    result.push('%');
                    continue;
                }
                if next >= arrays.len() {
                    return Err(DataFusionError::Execution(
                        "too few arguments for format()".into(),
                    ));
                }
                let value = text(next);
                next += 1;
                match (spec, value) {
                    (Some('s'), v) => result.push_str(&v.unwrap_or_default()),
                    (Some('I'), Some(v)) => result.push_str(&pg_quote_ident(&v)),
                    (Some('L'), Some(v)) => result.push_str(&crate::sql::quote_literal(&v)),
                    (Some('L'), None) => result.push_str("NULL"),
                    (Some('I'), None) => {
                        return Err(DataFusionError::Execution(
                            "null values cannot be formatted as an SQL identifier".into(),
                        ));
                    }
                    (other, _) => {
                        return Err(DataFusionError::Execution(format!(
                            "unrecognized format() type specifier \"{}\"",
                            other.map(String::from).unwrap_or_default()
                        )));
                    }
                }
            }
            out.append_value(result);
        }
        Ok(ColumnarValue::Array(Arc::new(out.finish())))
    }
}

/// A formatter of each array's values as text.
pub(super) fn text_formatters<'a>(
    arrays: &'a [datafusion::arrow::array::ArrayRef],
    options: &'a datafusion::arrow::util::display::FormatOptions<'a>,
) -> Result<Vec<datafusion::arrow::util::display::ArrayFormatter<'a>>> {
    arrays
        .iter()
        .map(|a| datafusion::arrow::util::display::ArrayFormatter::try_new(a.as_ref(), options))
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(Into::into)
}

/// `quote_literal(text)`: the text as a string literal, NULL for NULL.
fn quote_literal_udf() -> ScalarUDF {
    use datafusion::arrow::array::{Array, StringArray};
    create_udf(
        "quote_literal",
        vec![DataType::Utf8],
        DataType::Utf8,
        Volatility::Immutable,
        Arc::new(|args: &[ColumnarValue]| {
            let arrays = ColumnarValue::values_to_arrays(args)?;
            let texts = arrays[0]
                .as_any()
                .downcast_ref::<StringArray>()
                .ok_or_else(|| DataFusionError::Plan("quote_literal takes text".into()))?;
            let out: StringArray = (0..texts.len())
                .map(|i| (!texts.is_null(i)).then(|| crate::sql::quote_literal(texts.value(i))))
                .collect();
            Ok(ColumnarValue::Array(Arc::new(out)))
        }),
    )
}

/// `set_config(name, value, is_local)`: the value. Settings a client may change go through
/// `SET`; the catalog queries that call this (pg_dump's `search_path`) need only its answer.
fn set_config_udf() -> ScalarUDF {
    create_udf(
        "set_config",
        vec![DataType::Utf8, DataType::Utf8, DataType::Boolean],
        DataType::Utf8,
        Volatility::Volatile,
        Arc::new(|args: &[ColumnarValue]| Ok(args[1].clone())),
    )
}

/// `pg_size_pretty(bytes)`: 8192 bytes, 10 kB, 3 MB as PostgreSQL rounds them.
fn pg_size_pretty_udf(input: DataType) -> ScalarUDF {
    use datafusion::arrow::array::{Array, Int64Array, StringArray};
    create_udf(
        "pg_size_pretty",
        vec![input],
        DataType::Utf8,
        Volatility::Immutable,
        Arc::new(|args: &[ColumnarValue]| {
            let arrays = ColumnarValue::values_to_arrays(args)?;
            let sizes = arrays[0]
                .as_any()
                .downcast_ref::<Int64Array>()
                .ok_or_else(|| DataFusionError::Plan("pg_size_pretty takes bigint".into()))?;
            let out: StringArray = (0..sizes.len())
                .map(|i| (!sizes.is_null(i)).then(|| size_pretty(sizes.value(i))))
                .collect();
            Ok(ColumnarValue::Array(Arc::new(out)))
        }),
    )
}

/// PostgreSQL's `pg_size_pretty`: bytes below 10 kB, then the unit that keeps the number
/// under 10240, rounded half up.
pub fn size_pretty(bytes: i64) -> String {
    let mut size = bytes;
    let limit = 10 * 1024;
    let limit2 = limit * 2 - 1;
    if size.abs() < limit {
        return format!("{size} bytes");
    }
    for unit in ["kB", "MB", "GB", "TB"] {
        // Round half up, as PostgreSQL's half_rounded.
        let half = |v: i64| (v + v.signum()) / 2;
        size >>= 9;
        if size.abs() < limit2 || unit == "TB" {
            return format!("{} {unit}", half(size));
        }
        size >>= 1;
    }
    format!("{size} PB")
}

/// An identifier as PostgreSQL's `quote_ident` writes it: bare when it is lower case letters,
/// digits and underscores (not starting with a digit), else double-quoted.
fn pg_quote_ident(name: &str) -> String {
    let bare = name
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if bare {
        name.to_string()
    } else {
        crate::sql::quote_ident(name)
    }
}

/// Rewrite the constructs of client catalog queries the engine cannot plan:
/// - `ARRAY(SELECT x ...)` becomes `(SELECT array_agg(x) FROM (SELECT x ...))`;
/// - a table function over an options column (`pg_options_to_table(srvoptions)`, which the
///   engine cannot call with a column) becomes an empty table of its columns: no object here
///   has options;
/// - `to_regclass('name')` becomes a lookup in `pg_class`.
pub fn rewrite(stmt: &mut Statement) {
    let catalogs = reads_catalogs(stmt);
    let _ = visit_expressions_mut(stmt, |e: &mut Expr| {
        if let Some(new) = array_of_subquery(e)
            .or_else(|| to_regclass(e))
            .or_else(|| catalogs.then(|| null_array_comparison(e)).flatten())
        {
            *e = new;
        }
        catalog_expression(e, catalogs);
        // PostgreSQL's one-byte `"char"` type, which catalog queries cast codes to: text.
        if let Expr::Cast { data_type, .. } = e
            && let datafusion::sql::sqlparser::ast::DataType::Custom(name, args) = data_type
            && args.is_empty()
            && name.to_string() == "\"char\""
        {
            *data_type = datafusion::sql::sqlparser::ast::DataType::Text;
        }
        ControlFlow::<()>::Continue(())
    });
    struct Options;
    impl VisitorMut for Options {
        type Break = ();
        fn pre_visit_table_factor(&mut self, t: &mut TableFactor) -> ControlFlow<()> {
            // `UNNEST(c.evttags) AS t(x)` of an always-NULL catalog array: no rows.
            if let TableFactor::UNNEST {
                alias, array_exprs, ..
            } = t
                && let [arg] = array_exprs.as_slice()
                && is_null_array_column(arg)
            {
                let alias = alias.take();
                let column = alias
                    .as_ref()
                    .map(|a| match a.columns.first() {
                        Some(c) => c.name.value.clone(),
                        None => a.name.value.clone(),
                    })
                    .unwrap_or_else(|| "unnest".into());
                if let Ok(q) = parse_query(&format!(
                    "SELECT CAST(NULL AS TEXT) AS {} WHERE false",
                    crate::sql::quote_ident(&column)
                )) {
                    *t = TableFactor::Derived {
                        lateral: false,
                        subquery: Box::new(q),
                        alias,
                        sample: None,
                    };
                }
                return ControlFlow::Continue(());
            }
            let name = match t {
                TableFactor::Table {
                    name,
                    args: Some(_),
                    ..
                }
                | TableFactor::Function { name, .. } => name.to_string(),
                _ => return ControlFlow::Continue(()),
            };
            let bare = name.rsplit('.').next().unwrap_or_default().to_lowercase();
            let empty = match bare.as_str() {
                "pg_options_to_table" => Some(
                    "SELECT CAST(NULL AS TEXT) AS option_name, CAST(NULL AS TEXT) AS \
                     option_value WHERE false"
                        .to_string(),
                ),
                // `unnest(c.reloptions)` and the like: those arrays are always NULL here.
                "unnest" if unnests_null_array(t) => {
                    // A one-column function's alias names its column too (`unnest(a) x`).
                    let column = match t {
                        TableFactor::Table { alias: Some(a), .. }
                        | TableFactor::Function { alias: Some(a), .. }
                            if a.columns.is_empty() =>
                        {
                            a.name.value.clone()
                        }
                        _ => "unnest".to_string(),
                    };
                    Some(format!(
                        "SELECT CAST(NULL AS TEXT) AS {} WHERE false",
                        crate::sql::quote_ident(&column)
                    ))
                }
                _ => None,
            };
            if let Some(sql) = empty
                && let Ok(q) = parse_query(&sql)
            {
                let alias = match t {
                    TableFactor::Table { alias, .. } | TableFactor::Function { alias, .. } => {
                        alias.take()
                    }
                    _ => None,
                };
                *t = TableFactor::Derived {
                    lateral: false,
                    subquery: Box::new(q),
                    alias,
                    sample: None,
                };
            }
            ControlFlow::Continue(())
        }
    }
    let _ = stmt.visit(&mut Options);
    qualify_extra_tables(stmt);
    if catalogs {
        aggregate_scalar_subqueries(stmt);
    }
}

/// Rewrites of expressions in catalog queries (`catalogs`: the statement reads a catalog):
/// - a test of an always-NULL array for NOT NULL is false, and a CASE branch that is never
///   taken is dropped (pg_dump's `CASE WHEN pr.prattrs IS NOT NULL THEN (SELECT ... FROM
///   generate_series(0, array_upper(pr.prattrs, 1)))`, which the engine cannot plan);
/// - `typname[0]` (a `name`'s first character) is `substr(typname, 1, 1)`;
/// - a column cast to `oid` or a `reg*` type is a TRY_CAST: the emulation keeps some such
///   columns as names (pg_dump's `oprcode::oid`), and no system object is dumped anyway.
fn catalog_expression(e: &mut Expr, catalogs: bool) {
    use datafusion::sql::sqlparser::ast::{AccessExpr, CastKind, Subscript, Value};
    if catalogs
        && let Expr::IsNotNull(inner) = e
        && is_null_array_column(inner)
    {
        *e = Expr::Value(Value::Boolean(false).into());
        return;
    }
    if let Expr::Case {
        conditions,
        else_result,
        ..
    } = e
    {
        let never = |c: &Expr| matches!(c, Expr::Value(v) if v.value == Value::Boolean(false));
        if conditions.iter().any(|w| never(&w.condition)) {
            conditions.retain(|w| !never(&w.condition));
            if conditions.is_empty() {
                *e = else_result
                    .take()
                    .map(|b| *b)
                    .unwrap_or(Expr::Value(Value::Null.into()));
            }
        }
        return;
    }
    if !catalogs {
        return;
    }
    if let Expr::CompoundFieldAccess { root, access_chain } = e
        && matches!(root.as_ref(), Expr::Identifier(i) if i.value == "typname")
        && let [AccessExpr::Subscript(Subscript::Index { index })] = access_chain.as_slice()
        && index.to_string() == "0"
        && let Ok(first) = Parser::new(&PostgreSqlDialect {})
            .try_with_sql(&format!("substr({root}, 1, 1)"))
            .and_then(|mut p| p.parse_expr())
    {
        *e = first;
        return;
    }
    if let Expr::Cast {
        kind,
        expr,
        data_type,
        ..
    } = e
        && !matches!(expr.as_ref(), Expr::Value(_))
    {
        let target = data_type.to_string().to_lowercase();
        let target = target.trim_start_matches("pg_catalog.");
        if matches!(
            target,
            "oid"
                | "regproc"
                | "regprocedure"
                | "regtype"
                | "regclass"
                | "regnamespace"
                | "regrole"
        ) {
            *kind = CastKind::TryCast;
        }
    }
}

/// Whether a statement reads a system catalog (`pg_*`, `pg_catalog.*`, `information_schema.*`).
fn reads_catalogs(stmt: &Statement) -> bool {
    use datafusion::sql::sqlparser::ast::{ObjectName, visit_relations};
    visit_relations(stmt, |r: &ObjectName| {
        let text = r.to_string().to_lowercase();
        let last = text.rsplit('.').next().unwrap_or_default();
        if last.starts_with("pg_")
            || text.starts_with("pg_catalog.")
            || text.starts_with("information_schema.")
        {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    })
    .is_break()
}

/// Aggregate functions, which make a scalar subquery one row already.
const AGGREGATES: &[&str] = &[
    "count",
    "sum",
    "min",
    "max",
    "avg",
    "array_agg",
    "string_agg",
    "bool_and",
    "bool_or",
    "every",
];

/// Scalar subqueries of one plain column as `(SELECT max(x) ...)`. In catalog queries they look
/// an object up by its oid (one row or none), often correlated, and the engine decorrelates only
/// aggregated ones; the answer is the same.
fn aggregate_scalar_subqueries(stmt: &mut Statement) {
    use datafusion::sql::sqlparser::ast::{GroupByExpr, SelectItem, SetExpr};
    let _ = visit_expressions_mut(stmt, |e: &mut Expr| {
        if let Expr::Subquery(q) = e
            && q.limit_clause.is_none()
            && q.order_by.is_none()
            && let SetExpr::Select(select) = q.body.as_mut()
            && select.distinct.is_none()
            && select.having.is_none()
            && matches!(&select.group_by, GroupByExpr::Expressions(g, m) if g.is_empty() && m.is_empty())
            && let [item] = select.projection.as_mut_slice()
        {
            let (value, alias) = match item {
                SelectItem::UnnamedExpr(v) => (v.clone(), None),
                SelectItem::ExprWithAlias { expr, alias } => (expr.clone(), Some(alias.clone())),
                _ => return ControlFlow::Continue(()),
            };
            let text = value.to_string().to_lowercase();
            if AGGREGATES.iter().any(|a| text.contains(&format!("{a}("))) {
                return ControlFlow::Continue(());
            }
            if let Ok(max) = Parser::new(&PostgreSqlDialect {})
                .try_with_sql(&format!("max({value})"))
                .and_then(|mut p| p.parse_expr())
            {
                *item = match alias {
                    Some(alias) => SelectItem::ExprWithAlias { expr: max, alias },
                    None => SelectItem::UnnamedExpr(max),
                };
            }
        }
        ControlFlow::<()>::Continue(())
    });
}

/// A comparison of an always-NULL catalog array with an array literal (`pol.polroles =
/// '{0}'`): NULL, as PostgreSQL answers it.
fn null_array_comparison(e: &Expr) -> Option<Expr> {
    use datafusion::sql::sqlparser::ast::BinaryOperator;
    let null = || {
        Parser::new(&PostgreSqlDialect {})
            .try_with_sql(NULL_BOOLEAN)
            .and_then(|mut p| p.parse_expr())
            .ok()
    };
    let (left, right) = match e {
        Expr::BinaryOp {
            left,
            op: BinaryOperator::Eq | BinaryOperator::NotEq,
            right,
        } => (left, right),
        // `x = ANY(c.polroles)`, which the compatibility rewrites make `array_has(...)`.
        Expr::AnyOp { right, .. } | Expr::AllOp { right, .. } => {
            return is_null_array_column(right).then(null).flatten();
        }
        Expr::Function(f)
            if function_name(e).is_some_and(|n| n == "array_has" || n == "array_contains") =>
        {
            let FunctionArguments::List(list) = &f.args else {
                return None;
            };
            return match list.args.first() {
                Some(FunctionArg::Unnamed(FunctionArgExpr::Expr(a))) if is_null_array_column(a) => {
                    null()
                }
                _ => None,
            };
        }
        _ => return None,
    };
    let is_text = |x: &Expr| matches!(x, Expr::Value(v) if v.value.to_string().starts_with('\''));
    if (is_null_array_column(left) && is_text(right))
        || (is_null_array_column(right) && is_text(left))
    {
        null()
    } else {
        None
    }
}

/// How a NULL boolean is written by the rewrites here.
const NULL_BOOLEAN: &str = "CAST(NULL AS BOOLEAN)";

/// Whether `x` is a column of one of the always-NULL catalog arrays.
fn is_null_array_column(x: &Expr) -> bool {
    let x = match x {
        Expr::Nested(inner) => inner.as_ref(),
        other => other,
    };
    let column = match x {
        Expr::Identifier(i) => &i.value,
        Expr::CompoundIdentifier(parts) => match parts.last() {
            Some(i) => &i.value,
            None => return false,
        },
        _ => return false,
    };
    NULL_ARRAYS.iter().any(|(_, c)| c == column)
}

/// Whether a FROM-clause `unnest(...)` unnests one of the catalog arrays that are always NULL.
fn unnests_null_array(t: &TableFactor) -> bool {
    let arg = match t {
        TableFactor::Table {
            args: Some(args), ..
        } => match args.args.as_slice() {
            [FunctionArg::Unnamed(FunctionArgExpr::Expr(e))] => e.clone(),
            _ => return false,
        },
        TableFactor::Function { args, .. } => match args.as_slice() {
            [FunctionArg::Unnamed(FunctionArgExpr::Expr(e))] => e.clone(),
            _ => return false,
        },
        _ => return false,
    };
    let column = match &arg {
        Expr::Identifier(i) => i.value.clone(),
        Expr::CompoundIdentifier(parts) => {
            parts.last().map(|i| i.value.clone()).unwrap_or_default()
        }
        _ => return false,
    };
    NULL_ARRAYS.iter().any(|(_, c)| *c == column)
}

/// Unqualified names of the catalogs added here, as `pg_catalog.name` (the engine looks for
/// unqualified names in `public`; the emulation qualifies only its own).
fn qualify_extra_tables(stmt: &mut Statement) {
    use datafusion::sql::sqlparser::ast::{Ident, ObjectName, ObjectNamePart};
    let names: Vec<&str> = extra_tables().iter().map(|(n, _)| *n).collect();
    let _ = datafusion::sql::sqlparser::ast::visit_relations_mut(stmt, |r: &mut ObjectName| {
        if let [ObjectNamePart::Identifier(i)] = r.0.as_slice()
            && names.contains(&i.value.as_str())
        {
            *r = ObjectName(vec![
                ObjectNamePart::Identifier(Ident::new("pg_catalog")),
                ObjectNamePart::Identifier(i.clone()),
            ]);
        }
        ControlFlow::<()>::Continue(())
    });
}

fn parse_query(sql: &str) -> std::result::Result<Query, ()> {
    Parser::new(&PostgreSqlDialect {})
        .try_with_sql(sql)
        .and_then(|mut p| p.parse_query())
        .map(|q| *q)
        .map_err(|_| ())
}

fn function_name(e: &Expr) -> Option<String> {
    match e {
        Expr::Function(f) => Some(
            f.name
                .0
                .last()?
                .to_string()
                .trim_matches('"')
                .to_lowercase(),
        ),
        _ => None,
    }
}

fn array_of_subquery(e: &Expr) -> Option<Expr> {
    let Expr::Function(f) = e else {
        return None;
    };
    if function_name(e)? != "array" {
        return None;
    }
    let FunctionArguments::Subquery(q) = &f.args else {
        return None;
    };
    // A subquery filtered by a comparison with an always-NULL array has no rows.
    if let datafusion::sql::sqlparser::ast::SetExpr::Select(select) = q.body.as_ref()
        && select
            .selection
            .as_ref()
            .is_some_and(|w| w.to_string() == NULL_BOOLEAN)
    {
        return Some(Expr::Value(
            datafusion::sql::sqlparser::ast::Value::Null.into(),
        ));
    }
    if let Some(direct) = aggregated(q) {
        return Some(direct);
    }
    let sql = format!("(SELECT array_agg(__kbcrm_a.__v) FROM ({q}) AS __kbcrm_a(__v))");
    Parser::new(&PostgreSqlDialect {})
        .try_with_sql(&sql)
        .and_then(|mut p| p.parse_expr())
        .ok()
}

/// `ARRAY(SELECT x FROM ... WHERE ... ORDER BY y)` as `(SELECT array_agg(x ORDER BY y) FROM
/// ... WHERE ...)`: the same array, and a correlated subquery the engine can decorrelate (a
/// derived table in between hides the correlation from it). `None` when the subquery groups,
/// limits or is not one plain SELECT of one column.
fn aggregated(q: &Query) -> Option<Expr> {
    use datafusion::sql::sqlparser::ast::{GroupByExpr, OrderByKind, SelectItem, SetExpr};
    if q.limit_clause.is_some() || q.fetch.is_some() || q.with.is_some() {
        return None;
    }
    let SetExpr::Select(select) = q.body.as_ref() else {
        return None;
    };
    let plain_group =
        matches!(&select.group_by, GroupByExpr::Expressions(e, m) if e.is_empty() && m.is_empty());
    if select.distinct.is_some() || !plain_group || select.having.is_some() {
        return None;
    }
    let [item] = select.projection.as_slice() else {
        return None;
    };
    let (value, alias) = match item {
        SelectItem::UnnamedExpr(e) => (e.clone(), None),
        SelectItem::ExprWithAlias { expr, alias } => (expr.clone(), Some(alias.value.clone())),
        _ => return None,
    };
    let order = match q.order_by.as_ref().map(|o| &o.kind) {
        None => String::new(),
        Some(OrderByKind::Expressions(items)) => {
            let keys: Vec<String> = items
                .iter()
                .map(|o| {
                    let key = match &o.expr {
                        Expr::Value(v) if v.value.to_string() == "1" => value.to_string(),
                        Expr::Identifier(i) if alias.as_deref() == Some(i.value.as_str()) => {
                            value.to_string()
                        }
                        other => other.to_string(),
                    };
                    format!("{key} {}", o.options)
                })
                .collect();
            format!(" ORDER BY {}", keys.join(", "))
        }
        Some(_) => return None,
    };
    let mut select = select.as_ref().clone();
    let aggregate = Parser::new(&PostgreSqlDialect {})
        .try_with_sql(&format!("array_agg({value}{order})"))
        .and_then(|mut p| p.parse_expr())
        .ok()?;
    select.projection = vec![SelectItem::UnnamedExpr(aggregate)];
    let mut query = q.clone();
    query.order_by = None;
    query.body = Box::new(SetExpr::Select(Box::new(select)));
    Some(Expr::Subquery(Box::new(query)))
}

fn to_regclass(e: &Expr) -> Option<Expr> {
    let Expr::Function(f) = e else {
        return None;
    };
    if function_name(e)? != "to_regclass" {
        return None;
    }
    let FunctionArguments::List(list) = &f.args else {
        return None;
    };
    let [FunctionArg::Unnamed(FunctionArgExpr::Expr(arg))] = list.args.as_slice() else {
        return None;
    };
    let sql = format!(
        "(SELECT max(c.oid) FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON \
         c.relnamespace = n.oid WHERE c.relname = split_part(({arg}), '.', -1) AND \
         (strpos(({arg}), '.') = 0 OR n.nspname = split_part(({arg}), '.', 1)))"
    );
    Parser::new(&PostgreSqlDialect {})
        .try_with_sql(&sql)
        .and_then(|mut p| p.parse_expr())
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_are_pretty_as_postgresql_prints_them() {
        assert_eq!(size_pretty(0), "0 bytes");
        assert_eq!(size_pretty(10239), "10239 bytes");
        assert_eq!(size_pretty(10240), "10 kB");
        assert_eq!(size_pretty(1_000_000), "977 kB");
        assert_eq!(size_pretty(10_485_760), "10 MB");
        assert_eq!(size_pretty(123_456_789_012), "115 GB");
    }

    #[test]
    fn array_subqueries_and_option_tables_are_rewritten() {
        let sql = "SELECT ARRAY(SELECT b.rolname FROM pg_roles b WHERE b.oid = r.oid) AS m, \
                   (SELECT string_agg(option_name, ',') FROM pg_options_to_table(s.srvoptions)) \
                   FROM pg_roles r, pg_foreign_server s";
        let mut stmt = Parser::parse_sql(&PostgreSqlDialect {}, sql)
            .unwrap()
            .remove(0);
        rewrite(&mut stmt);
        let text = stmt.to_string();
        assert!(
            text.contains("(SELECT array_agg(b.rolname) FROM pg_roles b WHERE b.oid = r.oid)"),
            "{text}"
        );
        assert!(!text.contains("pg_options_to_table"), "{text}");
        // A subquery with a LIMIT keeps its rows in a derived table.
        let mut stmt = Parser::parse_sql(
            &PostgreSqlDialect {},
            "SELECT ARRAY(SELECT x FROM t ORDER BY x LIMIT 3)",
        )
        .unwrap()
        .remove(0);
        rewrite(&mut stmt);
        let text = stmt.to_string();
        assert!(
            text.contains("array_agg(__kbcrm_a.__v)") && text.contains("LIMIT 3"),
            "{text}"
        );
    }
}
