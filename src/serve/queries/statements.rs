//! Statements answered apart from plain queries: DECLARE CURSOR, SHOW ALL, EXPLAIN with the
//! rollup a query is routed to.

use super::*;

/// The name and query of `DECLARE name CURSOR FOR query`.
pub(super) fn declared_cursor(stmt: &Statement) -> Option<(String, Statement)> {
    use datafusion::sql::sqlparser::ast::DeclareType;
    let Statement::Declare { stmts } = stmt else {
        return None;
    };
    let [d] = stmts.as_slice() else {
        return None;
    };
    if d.declare_type != Some(DeclareType::Cursor) {
        return None;
    }
    let name = d.names.first()?.value.clone();
    let query = d.for_query.as_ref()?;
    Some((name, Statement::Query(query.clone())))
}

impl Queries {
    /// `DECLARE name CURSOR FOR query`: the query planned and its rows computed on the query
    /// threads as `FETCH` asks for them (datafusion-postgres answers `FETCH` and `CLOSE` from
    /// the cursor's portal; the rows it pulls come from the pool).
    pub(super) async fn declare_cursor<C>(
        &self,
        client: &mut C,
        conn: &ConnSession,
        role: &Arc<RoleSession>,
        stmt: &Statement,
        options: &Arc<FormatOptions>,
        limits: Limits<'_>,
    ) -> PgWireResult<Response>
    where
        C: ClientInfo + ClientPortalStore + Send + Sync,
        C::PortalStore: PortalStore,
    {
        let Limits { token, deadline } = limits;
        use pgwire::api::stmt::StoredStatement;
        use pgwire::api::store::MemPortalStore;
        let Some((name, query)) = declared_cursor(stmt) else {
            return Err(pg_error(
                "ERROR",
                "42601",
                "DECLARE CURSOR requires a FOR query",
            ));
        };
        let names = execute::column_names(&query);
        let (ctx, _) = service_for(&self.shared, conn, role, &query)?;
        let plan = plan_query(&self.shared, role, ctx.clone(), query, token, deadline).await?;
        let fields = Arc::new(execute::fields(
            &plan,
            &names,
            &Format::UnifiedText,
            Some(options.clone()),
        )?);
        // Not bounded by this statement's timeout: the rows are computed as later FETCHes ask,
        // each bounded by its own; closing the cursor stops the work.
        let rows = execute::rows(self.shared.pool.clone(), ctx, plan, fields.clone());
        let portal = Portal::new_cursor(
            name.clone(),
            Arc::new(StoredStatement::new(
                name.clone(),
                (stmt.to_string(), None),
                vec![],
            )),
        );
        portal.start(QueryResponse::new(fields, rows)).await;
        let store = client
            .portal_store()
            .as_any()
            .downcast_ref::<MemPortalStore<Stmt>>()
            .ok_or_else(|| pg_error("ERROR", "XX000", "cursors are not available here"))?;
        store.put_portal(Arc::new(portal));
        Ok(Response::Execution(Tag::new("DECLARE CURSOR")))
    }
}

pub(super) fn is_show_all(stmt: &Statement) -> bool {
    matches!(stmt, Statement::ShowVariable { variable } if variable.len() == 1
        && variable[0].value.eq_ignore_ascii_case("all"))
}

/// `SHOW ALL`: the session's settings as PostgreSQL lists them (name, setting, description).
pub(super) fn show_all<C: ClientInfo + ?Sized>(
    shared: &Shared,
    conn: &ConnSession,
    client: &C,
) -> PgWireResult<LogicalPlan> {
    let meta = client.metadata();
    let get = |key: &str, default: &str| meta.get(key).cloned().unwrap_or(default.to_string());
    let timeout = meta
        .get(TIMEOUT_KEY)
        .and_then(|ms| ms.parse::<u64>().ok())
        .map_or("0".to_string(), |ms| {
            humantime::format_duration(Duration::from_millis(ms)).to_string()
        });
    let rows: Vec<(&str, String, &str)> = vec![
        (
            "application_name",
            get("application_name", ""),
            "Sets the application name to be reported in statistics and logs.",
        ),
        (
            "client_encoding",
            "UTF8".into(),
            "Sets the client's character set encoding.",
        ),
        (
            "DateStyle",
            get("datestyle", super::super::default_setting("datestyle")),
            "Sets the display format for date and time values.",
        ),
        (
            "default_transaction_read_only",
            "on".into(),
            "Sets the default read-only status of new transactions.",
        ),
        (
            "extra_float_digits",
            get("extra_float_digits", "1"),
            "Sets the number of digits displayed for floating-point values.",
        ),
        (
            "integer_datetimes",
            "on".into(),
            "Shows whether datetimes are integer based.",
        ),
        (
            "IntervalStyle",
            get(
                "intervalstyle",
                super::super::default_setting("intervalstyle"),
            ),
            "Sets the display format for interval values.",
        ),
        (
            "is_superuser",
            "off".into(),
            "Shows whether the current user is a superuser.",
        ),
        (
            "max_connections",
            shared.serve.max_connections.to_string(),
            "Sets the maximum number of concurrent connections.",
        ),
        (
            "search_path",
            get("search_path", "\"$user\", public"),
            "Sets the schema search order for names that are not schema-qualified.",
        ),
        (
            "server_encoding",
            "UTF8".into(),
            "Shows the server (database) character set encoding.",
        ),
        (
            "server_version",
            super::super::SERVER_VERSION.into(),
            "Shows the server version.",
        ),
        (
            "session_authorization",
            conn.user.clone(),
            "Sets the session user name.",
        ),
        (
            "standard_conforming_strings",
            "on".into(),
            "Causes '...' strings to treat backslashes literally.",
        ),
        (
            "statement_timeout",
            timeout,
            "Sets the maximum allowed duration of any statement.",
        ),
        (
            "TimeZone",
            get("timezone", super::super::default_setting("timezone")),
            "Sets the time zone for displaying and interpreting time stamps.",
        ),
        (
            "transaction_read_only",
            "on".into(),
            "Shows whether the current transaction is read-only.",
        ),
    ];
    settings_table(&rows)
}

/// A plan reading the settings rows as a table of name, setting and description.
fn settings_table(rows: &[(&str, String, &str)]) -> PgWireResult<LogicalPlan> {
    use datafusion::arrow::array::StringArray;
    use datafusion::arrow::datatypes::{DataType, Field, Schema};
    let schema = Arc::new(Schema::new(vec![
        Field::new("name", DataType::Utf8, false),
        Field::new("setting", DataType::Utf8, false),
        Field::new("description", DataType::Utf8, false),
    ]));
    let batch = datafusion::arrow::record_batch::RecordBatch::try_new(
        schema,
        vec![
            Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.0))),
            Arc::new(StringArray::from_iter_values(
                rows.iter().map(|r| r.1.as_str()),
            )),
            Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.2))),
        ],
    )
    .map_err(|e| pg_error("ERROR", "XX000", e.to_string()))?;
    let ctx = SessionContext::new();
    let df = ctx.read_batch(batch).map_err(execute::engine_error)?;
    Ok(df.into_unoptimized_plan())
}

/// The plan of an `EXPLAIN` (without ANALYZE) in a role session with rollups: DataFusion's
/// plan rows and the `rollup_routing` row saying which rollup answered each aggregate or why
/// none did. `None` for any other statement.
pub(super) async fn explain_with_routing(
    role: &RoleSession,
    stmt: &Statement,
) -> PgWireResult<Option<LogicalPlan>> {
    let Some(inner) = crate::engine::rollup::explained(stmt) else {
        return Ok(None);
    };
    if role.cluster_for(stmt).is_some() {
        return Ok(None);
    }
    let fail = |e: String| pg_error("ERROR", "XX000", e);
    let ctx = &role.ctx;
    let Some(row) = crate::engine::rollup::explain_row(ctx, &inner)
        .await
        .map_err(|e| fail(e.to_string()))?
    else {
        return Ok(None);
    };
    let df = ctx
        .sql(&stmt.to_string())
        .await
        .map_err(|e| fail(e.strip_backtrace()))?;
    let batches = df.collect().await.map_err(|e| fail(e.strip_backtrace()))?;
    let batches =
        crate::engine::rollup::with_explain_row(batches, &row).map_err(|e| fail(e.to_string()))?;
    let df = ctx
        .read_batches(batches)
        .map_err(|e| fail(e.strip_backtrace()))?;
    Ok(Some(df.into_unoptimized_plan()))
}

/// The PostgreSQL column names of a prepared statement's text (one statement).
pub(super) fn written_names(sql: &str) -> Vec<Option<String>> {
    execute::column_names_of(sql)
        .and_then(|mut all| (all.len() == 1).then(|| all.remove(0)))
        .unwrap_or_default()
}

pub(super) fn empty_plan() -> LogicalPlan {
    LogicalPlan::EmptyRelation(EmptyRelation {
        produce_one_row: false,
        schema: Arc::new(DFSchema::empty()),
    })
}
