//! A role's view of the warehouse: only the tables the role may read, PII columns masked and
//! row filters applied inside each table's definition, so every way a query reaches a table
//! (joins, subqueries, CTEs, catalog tables) sees the same restricted rows. The SQL server and
//! the extracts both read through it.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use datafusion::arrow::datatypes::{DataType, SchemaRef};
use datafusion::catalog::{Session, TableProvider};
use datafusion::logical_expr::{Expr, TableProviderFilterPushDown, TableType};
use datafusion::physical_plan::ExecutionPlan;
use datafusion::prelude::SessionContext;

use crate::error::{Error, Result};
use crate::plan::Project;
use crate::plan::access::Role;

/// What replaces a masked text value.
pub const MASK: &str = "***";

/// Register in `ctx` the role's view of each table of `base` named in `tables`. Returns the
/// tables the role may not read.
pub async fn register_views<V>(
    base: &SessionContext,
    ctx: &SessionContext,
    tables: &BTreeMap<String, V>,
    role_name: &str,
    role: &Role,
    project: &Project,
) -> Result<BTreeSet<String>> {
    let mut hidden = BTreeSet::new();
    for table in tables.keys() {
        if !role.may_read(table) {
            hidden.insert(table.clone());
            continue;
        }
        let provider = restricted(base, table, role, project).await.map_err(|e| {
            Error::Usage(format!(
                "kbcrm.yaml: role '{role_name}', table '{table}': {e}; fix \
                 roles.{role_name}.row_filter or pii.{table}"
            ))
        })?;
        ctx.register_table(table.as_str(), provider)?;
    }
    Ok(hidden)
}

/// The table as the role sees it: the committed table itself, or a view over it with PII
/// masked and the role's row filter applied.
async fn restricted(
    base: &SessionContext,
    table: &str,
    role: &Role,
    project: &Project,
) -> std::result::Result<Arc<dyn TableProvider>, String> {
    let provider = base
        .table_provider(table)
        .await
        .map_err(|e| e.to_string())?;
    let pii: BTreeSet<&str> = if role.pii {
        BTreeSet::new()
    } else {
        project
            .access
            .pii
            .get(table)
            .map(|cols| cols.iter().map(String::as_str).collect())
            .unwrap_or_default()
    };
    let filter = role.row_filter.get(table);
    if pii.is_empty() && filter.is_none() {
        return Ok(provider);
    }
    let schema = provider.schema();
    let cols: Vec<String> = schema
        .fields()
        .iter()
        .map(|f| {
            let name = f.name();
            let quoted = crate::sql::quote_ident(name);
            if !pii.contains(name.as_str()) {
                return quoted;
            }
            match f.data_type() {
                DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => {
                    format!("case when {quoted} is null then null else '{MASK}' end as {quoted}")
                }
                other => format!("cast(null as {}) as {quoted}", sql_type(other)),
            }
        })
        .collect();
    let sql = format!(
        "select {} from {}{}",
        cols.join(", "),
        crate::sql::quote_ident(table),
        filter.map(|f| format!(" where {f}")).unwrap_or_default()
    );
    let df = base.sql(&sql).await.map_err(|e| e.strip_backtrace())?;
    Ok(Arc::new(AsTable(df.into_view())))
}

/// A restricted view that clients see as the table it stands for (psql's `\dt`, JDBC's
/// `getTables` and SQLAlchemy list base tables only).
#[derive(Debug)]
struct AsTable(Arc<dyn TableProvider>);

#[async_trait::async_trait]
impl TableProvider for AsTable {
    fn schema(&self) -> SchemaRef {
        self.0.schema()
    }

    fn table_type(&self) -> TableType {
        TableType::Base
    }

    /// The view's plan, so the planner inlines and optimises it with the query as a whole.
    fn get_logical_plan(
        &self,
    ) -> Option<std::borrow::Cow<'_, datafusion::logical_expr::LogicalPlan>> {
        self.0.get_logical_plan()
    }

    fn supports_filters_pushdown(
        &self,
        filters: &[&Expr],
    ) -> datafusion::error::Result<Vec<TableProviderFilterPushDown>> {
        self.0.supports_filters_pushdown(filters)
    }

    async fn scan(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        filters: &[Expr],
        limit: Option<usize>,
    ) -> datafusion::error::Result<Arc<dyn ExecutionPlan>> {
        self.0.scan(state, projection, filters, limit).await
    }
}

fn sql_type(t: &DataType) -> String {
    match t {
        DataType::Int8 | DataType::Int16 => "smallint".into(),
        DataType::Int32 => "int".into(),
        DataType::Int64 => "bigint".into(),
        DataType::Float32 => "real".into(),
        DataType::Float64 => "double".into(),
        DataType::Boolean => "boolean".into(),
        DataType::Date32 | DataType::Date64 => "date".into(),
        DataType::Decimal128(p, s) | DataType::Decimal256(p, s) => format!("decimal({p},{s})"),
        DataType::Timestamp(_, Some(_)) => "timestamptz".into(),
        DataType::Timestamp(_, None) => "timestamp".into(),
        _ => "varchar".into(),
    }
}
