//! One DataFusion session per role, holding only the tables the role may read: PII columns
//! masked and row filters applied inside each table's definition, so every way a query can
//! reach a table (joins, subqueries, CTEs, `information_schema`, `pg_catalog`) sees the same
//! restricted view. Rebuilt when a run commits new table versions.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use datafusion::arrow::datatypes::DataType;
use datafusion::catalog::TableProvider;
use datafusion::common::ScalarValue;
use datafusion::execution::runtime_env::RuntimeEnv;
use datafusion::logical_expr::{ColumnarValue, ScalarUDF, Volatility, create_udf};
use datafusion::prelude::SessionContext;
use datafusion_postgres::DfSessionService;
use datafusion_postgres::datafusion_pg_catalog::setup_pg_catalog;

use super::cache::{CachedTable, ColumnCache};
use crate::engine;
use crate::engine::roles;
use crate::error::{Error, Result};
use crate::plan::{MemoryPoolKind, Project};
use crate::warehouse::{DataFile, Warehouse};

/// The sessions of every role, built from one set of table versions.
pub struct Catalog {
    /// Table versions the sessions read.
    pub versions: BTreeMap<String, u64>,
    /// Per role.
    pub roles: HashMap<String, Arc<RoleSession>>,
}

/// One role's view of the warehouse.
pub struct RoleSession {
    /// The session; its catalog holds only the role's tables.
    pub ctx: Arc<SessionContext>,
    /// The PostgreSQL-protocol service over that session.
    pub service: Arc<DfSessionService>,
    /// Tables that exist but the role may not read.
    pub hidden: BTreeSet<String>,
    /// The role's session on the project's Ballista cluster, when it has one.
    pub cluster: Option<super::cluster::ClusterSide>,
}

impl RoleSession {
    /// The role's cluster session when `stmt` runs there ([`super::cluster::ClusterSide::takes`]).
    pub fn cluster_for(
        &self,
        stmt: &datafusion::sql::sqlparser::ast::Statement,
    ) -> Option<&super::cluster::ClusterSide> {
        self.cluster.as_ref().filter(|c| c.takes(stmt))
    }

    /// The role's session for one connection of `user`: the same tables and settings, the
    /// login as `current_user`, its process id as `pg_backend_pid()`, and with `memory_limit` a memory pool of its own of that many
    /// bytes (a connection runs one statement at a time, so the engine limit applies per
    /// query, and one heavy query cannot starve the others).
    pub fn for_connection(
        &self,
        user: &str,
        pid: i32,
        memory_limit: Option<usize>,
        memory_pool: MemoryPoolKind,
    ) -> Result<(Arc<SessionContext>, Arc<DfSessionService>)> {
        let mut state =
            datafusion::execution::session_state::SessionStateBuilder::new_from_existing(
                self.ctx.state(),
            );
        if let Some(limit) = memory_limit {
            let runtime = datafusion::execution::runtime_env::RuntimeEnvBuilder::from_runtime_env(
                &self.ctx.runtime_env(),
            )
            .with_memory_pool(crate::engine::memory_pool(memory_pool, limit))
            .build_arc()?;
            state = state.with_runtime_env(runtime);
        }
        let ctx = SessionContext::new_with_state(state.build());
        // `current_user` reaches the engine as `session_user` (the compatibility rewrites).
        for name in ["session_user", "current_role", "user"] {
            ctx.register_udf(constant_text_udf(name, user));
        }
        ctx.register_udf(create_udf(
            "pg_backend_pid",
            vec![],
            DataType::Int32,
            Volatility::Stable,
            Arc::new(move |_: &[ColumnarValue]| {
                Ok(ColumnarValue::Scalar(ScalarValue::Int32(Some(pid))))
            }),
        ));
        let ctx = Arc::new(ctx);
        Ok((ctx.clone(), Arc::new(DfSessionService::new(ctx))))
    }
}

/// Build every role's session from the warehouse as it is now, its tables read through
/// `cache`; with `cluster` (a session on the project's Ballista cluster), each role also gets
/// a session there over the same table versions.
pub async fn build(
    project: &Project,
    runtime: &Arc<RuntimeEnv>,
    cluster: Option<&SessionContext>,
    cache: &Arc<ColumnCache>,
) -> Result<Catalog> {
    let params = engine::today_params();
    let database = &project.access.serve.database;
    let base = engine::session_with_runtime(&project.engine, &params, runtime.clone())?;
    let wh = Warehouse::open(&project.warehouse)?;
    let cluster_base = cluster.map(|root| on_cluster(root, &params));
    let cached = |name: &str, version: u64, files: &[DataFile], inner| {
        Arc::new(CachedTable::new(name, version, files, inner, cache.clone()))
            as Arc<dyn TableProvider>
    };
    let versions: BTreeMap<String, u64> = match &cluster_base {
        Some(cb) => {
            wh.register_snapshots_and_for_cluster(&base, cb, Some(&cached))
                .await?
        }
        None => wh.register_snapshots_wrapped(&base, &cached).await?,
    };
    cache.retain(&versions);
    // The run history is served too (to roles granted `kbcrm_runs`), read afresh per query.
    wh.register_runs(&base).await?;
    let mut tables = versions.clone();
    tables.insert(crate::warehouse::history::RUNS_TABLE.to_string(), 0);
    let rollups = if project.engine.rollups && crate::engine::rollup::Rollups::declared(project) {
        let version_of = |t: &str| versions.get(t).copied();
        let state = crate::warehouse::state::read_state(&base).await?;
        crate::engine::rollup::Rollups::load(&base, project, &version_of, &state).await?
    } else {
        crate::engine::rollup::Rollups::default()
    };
    let users = super::pgcompat::Users(Arc::new(project.access.users.keys().cloned().collect()));
    let mut roles = HashMap::new();
    for (name, role) in &project.access.roles {
        // The session's catalog is the database clients connect to: `current_database()`,
        // `pg_database` and `information_schema` name it.
        let ctx = engine::session_in_catalog(&project.engine, &params, runtime.clone(), database)?;
        let hidden = roles::register_views(&base, &ctx, &tables, name, role, project).await?;
        // A rollup answers for a role only when the role reads it as it is: unmasked and
        // unfiltered (the tables it stands for must be plain too; the routing checks that).
        rollups
            .attach(&ctx, |r| {
                role.may_read(r)
                    && !role.row_filter.contains_key(r)
                    && (role.pii || project.access.pii.get(r).is_none_or(|c| c.is_empty()))
            })
            .await?;
        setup_pg_catalog(&ctx, database, users.clone())
            .map_err(|e| Error::Usage(format!("pg_catalog: {e}")))?;
        super::pgcompat::install(&ctx, database, &users.0)?;
        ctx.register_udf(version_udf());
        ctx.register_udf(to_regtype_udf());
        ctx.register_udf(no_serial_sequence_udf());
        ctx.register_udf(create_udf(
            "pg_collation_is_visible",
            vec![DataType::Int64],
            DataType::Boolean,
            Volatility::Stable,
            Arc::new(|_: &[ColumnarValue]| {
                Ok(ColumnarValue::Scalar(ScalarValue::Boolean(Some(true))))
            }),
        ));
        ctx.register_udf(ScalarUDF::new_from_impl(JsonBuildObject::new()));
        let ctx = Arc::new(ctx);
        let cluster = match (cluster, &cluster_base) {
            (Some(root), Some(cb)) => {
                let on = on_cluster(root, &params);
                roles::register_views(cb, &on, &versions, name, role, project).await?;
                Some(super::cluster::ClusterSide::new(on))
            }
            _ => None,
        };
        roles.insert(
            name.clone(),
            Arc::new(RoleSession {
                service: Arc::new(DfSessionService::new(ctx.clone())),
                ctx,
                hidden,
                cluster,
            }),
        );
    }
    Ok(Catalog { versions, roles })
}

/// A session on the cluster of `root` with an empty catalog and kbcrm's functions as of today.
fn on_cluster(root: &SessionContext, params: &crate::engine::udf::RunParams) -> SessionContext {
    let ctx = engine::with_empty_catalog(root);
    crate::engine::udf::register(&ctx, params);
    ctx
}

/// A function of no arguments returning `value`.
fn constant_text_udf(name: &str, value: &str) -> ScalarUDF {
    let value = value.to_string();
    create_udf(
        name,
        vec![],
        DataType::Utf8,
        Volatility::Stable,
        Arc::new(move |_: &[ColumnarValue]| {
            Ok(ColumnarValue::Scalar(ScalarValue::Utf8(Some(
                value.clone(),
            ))))
        }),
    )
}

/// `to_regtype(name)`: the type's oid, or NULL for a type the server does not have (psycopg
/// and SQLAlchemy look up types such as `hstore` with it when they connect).
fn to_regtype_udf() -> ScalarUDF {
    use datafusion::arrow::array::{Array, Int32Array, StringArray};
    use pgwire::api::Type;
    let known = [
        Type::BOOL,
        Type::BYTEA,
        Type::CHAR,
        Type::NAME,
        Type::INT8,
        Type::INT2,
        Type::INT4,
        Type::TEXT,
        Type::OID,
        Type::JSON,
        Type::FLOAT4,
        Type::FLOAT8,
        Type::BPCHAR,
        Type::VARCHAR,
        Type::DATE,
        Type::TIME,
        Type::TIMESTAMP,
        Type::TIMESTAMPTZ,
        Type::INTERVAL,
        Type::NUMERIC,
        Type::UUID,
        Type::JSONB,
    ];
    let aliases = [
        ("integer", "int4"),
        ("int", "int4"),
        ("bigint", "int8"),
        ("smallint", "int2"),
        ("real", "float4"),
        ("double precision", "float8"),
        ("boolean", "bool"),
        ("character varying", "varchar"),
        ("character", "bpchar"),
        ("timestamp without time zone", "timestamp"),
        ("timestamp with time zone", "timestamptz"),
        ("decimal", "numeric"),
    ];
    let oid_of = move |name: &str| -> Option<i32> {
        let n = name.trim().trim_start_matches("pg_catalog.").to_lowercase();
        let n = aliases
            .iter()
            .find(|(a, _)| *a == n)
            .map(|(_, t)| t.to_string())
            .unwrap_or(n);
        known.iter().find(|t| t.name() == n).map(|t| t.oid() as i32)
    };
    create_udf(
        "to_regtype",
        vec![DataType::Utf8],
        DataType::Int32,
        Volatility::Stable,
        Arc::new(move |args: &[ColumnarValue]| {
            let arrays = ColumnarValue::values_to_arrays(args)?;
            let names = arrays[0]
                .as_any()
                .downcast_ref::<StringArray>()
                .ok_or_else(|| {
                    datafusion::error::DataFusionError::Plan("to_regtype takes text".into())
                })?;
            let oids: Int32Array = (0..names.len())
                .map(|i| {
                    if names.is_null(i) {
                        None
                    } else {
                        oid_of(names.value(i))
                    }
                })
                .collect();
            Ok(ColumnarValue::Array(Arc::new(oids)))
        }),
    )
}

/// `pg_get_serial_sequence(table, column)`: warehouse tables have no sequences, so NULL.
fn no_serial_sequence_udf() -> ScalarUDF {
    create_udf(
        "pg_get_serial_sequence",
        vec![DataType::Utf8, DataType::Utf8],
        DataType::Utf8,
        Volatility::Stable,
        Arc::new(|_: &[ColumnarValue]| Ok(ColumnarValue::Scalar(ScalarValue::Utf8(None)))),
    )
}

/// `version()` as PostgreSQL words it: clients such as SQLAlchemy parse the number from it.
fn version_udf() -> ScalarUDF {
    let text = format!(
        "PostgreSQL {} (kbcrm {}, Apache DataFusion) on {}-linux, 64-bit",
        super::SERVER_VERSION,
        env!("CARGO_PKG_VERSION"),
        std::env::consts::ARCH
    );
    create_udf(
        "version",
        vec![],
        DataType::Utf8,
        Volatility::Immutable,
        Arc::new(move |_: &[ColumnarValue]| {
            Ok(ColumnarValue::Scalar(ScalarValue::Utf8(Some(text.clone()))))
        }),
    )
}

/// `json_build_object(k1, v1, ...)`: the JSON text of an object (catalog queries of SQLAlchemy
/// and other clients build their results with it).
#[derive(Debug, PartialEq, Eq, Hash)]
struct JsonBuildObject {
    signature: datafusion::logical_expr::Signature,
}

impl JsonBuildObject {
    fn new() -> Self {
        JsonBuildObject {
            signature: datafusion::logical_expr::Signature::variadic_any(Volatility::Immutable),
        }
    }
}

impl datafusion::logical_expr::ScalarUDFImpl for JsonBuildObject {
    fn name(&self) -> &str {
        "json_build_object"
    }

    fn signature(&self) -> &datafusion::logical_expr::Signature {
        &self.signature
    }

    fn return_type(&self, _: &[DataType]) -> datafusion::error::Result<DataType> {
        Ok(DataType::Utf8)
    }

    fn invoke_with_args(
        &self,
        args: datafusion::logical_expr::ScalarFunctionArgs,
    ) -> datafusion::error::Result<ColumnarValue> {
        use datafusion::arrow::array::{Array, StringBuilder};
        use datafusion::arrow::util::display::FormatOptions;
        let n = args.number_rows;
        if !args.args.len().is_multiple_of(2) {
            return Err(datafusion::error::DataFusionError::Plan(
                "json_build_object needs key/value pairs".into(),
            ));
        }
        let arrays = ColumnarValue::values_to_arrays(&args.args)?;
        let options = FormatOptions::default();
        let formatters = super::pgcompat::text_formatters(&arrays, &options)?;
        let mut out = StringBuilder::new();
        for row in 0..n {
            let mut obj = serde_json::Map::new();
            for pair in 0..arrays.len() / 2 {
                let (k, v) = (2 * pair, 2 * pair + 1);
                let key = formatters[k].value(row).to_string();
                let value = if arrays[v].is_null(row) {
                    serde_json::Value::Null
                } else {
                    let text = formatters[v].value(row).to_string();
                    match arrays[v].data_type() {
                        DataType::Boolean => serde_json::Value::Bool(text == "true"),
                        t if t.is_numeric() => {
                            serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text))
                        }
                        _ => serde_json::Value::String(text),
                    }
                };
                obj.insert(key, value);
            }
            out.append_value(serde_json::Value::Object(obj).to_string());
        }
        Ok(ColumnarValue::Array(Arc::new(out.finish())))
    }
}
