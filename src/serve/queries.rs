//! Statements of a logged-in connection: measured, parsed and judged by the policy, then
//! queries planned and run on the query pool ([`super::execute`]) in the role's session, and
//! settings, cursors and transactions answered through datafusion-postgres; bounded by the
//! statement timeout and cancel requests while they wait for a turn, plan and stream.

mod extended;
mod statements;

pub use extended::Parser;
use statements::*;
use std::fmt::Debug;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use datafusion::common::DFSchema;
use datafusion::logical_expr::{EmptyRelation, LogicalPlan};
use datafusion::prelude::SessionContext;
use datafusion::sql::sqlparser::ast::Statement;
use datafusion_postgres::DfSessionService;
use futures::{Sink, SinkExt, Stream, StreamExt};
use pgwire::api::portal::{Format, Portal, PortalExecutionState};
use pgwire::api::query::{ExtendedQueryHandler, SimpleQueryHandler, send_execution_response};
use pgwire::api::results::{FieldInfo, QueryResponse, Response, Tag};
use pgwire::api::stmt::QueryParser;
use pgwire::api::store::{Entry, PortalStore};
use pgwire::api::{ClientInfo, ClientPortalStore, DEFAULT_NAME, PgWireConnectionState, Type};
use pgwire::error::{PgWireError, PgWireResult};
use pgwire::messages::PgWireBackendMessage;
use pgwire::messages::data::DataRow;
use pgwire::messages::extendedquery::Execute;
use pgwire::messages::response::EmptyQueryResponse;
use pgwire::messages::startup::ParameterStatus;
use pgwire::types::format::FormatOptions;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::Shared;
use super::auth::{ConnSession, TIMEOUT_KEY, pg_error};
use super::catalog::RoleSession;
use super::execute;
use super::policy::Verdict;
use crate::plan::access::parse_duration;

/// A parsed statement as the extended protocol keeps it (the type datafusion-postgres uses).
pub type Stmt = (String, Option<(Statement, LogicalPlan)>);

/// Where a statement runs: a session and the PostgreSQL-protocol service over it.
pub type Service = (Arc<SessionContext>, Arc<DfSessionService>);

/// Query handlers of one connection.
pub struct Queries {
    pub(super) shared: Arc<Shared>,
    parser: Arc<Parser>,
}

impl Queries {
    pub(super) fn new(shared: Arc<Shared>) -> Self {
        Queries {
            parser: Arc::new(Parser {
                shared: shared.clone(),
            }),
            shared,
        }
    }
}

fn session<C: ClientInfo + ?Sized>(
    shared: &Shared,
    client: &C,
) -> PgWireResult<(Arc<ConnSession>, Arc<RoleSession>)> {
    let conn = client
        .session_extensions()
        .get::<ConnSession>()
        .ok_or_else(|| pg_error("FATAL", "28000", "not logged in"))?;
    let role = shared
        .catalog()
        .roles
        .get(&conn.role)
        .cloned()
        .ok_or_else(|| {
            pg_error(
                "FATAL",
                "28000",
                format!("role \"{}\" is not declared in kbcrm.yaml", conn.role),
            )
        })?;
    Ok((conn, role))
}

/// The session a connection's statements run in ([`RoleSession::for_connection`]), made once
/// per connection and role-session version.
fn statement_service(
    shared: &Shared,
    conn: &ConnSession,
    role: &Arc<RoleSession>,
) -> PgWireResult<Service> {
    let mut own = conn.own.lock().expect("session lock");
    if let Some((made_from, service)) = own.as_ref()
        && Arc::ptr_eq(made_from, role)
    {
        return Ok(service.clone());
    }
    let service = role
        .for_connection(
            &conn.user,
            conn.pid,
            shared.project().engine.memory_limit,
            shared.project().engine.query_memory_pool(),
        )
        .map_err(|e| pg_error("ERROR", "XX000", e.to_string()))?;
    *own = Some((role.clone(), service.clone()));
    Ok(service)
}

/// Where a statement runs: the role's session on the cluster when the statement goes there
/// ([`super::cluster::ClusterSide::takes`]), else the connection's own.
fn service_for(
    shared: &Shared,
    conn: &ConnSession,
    role: &Arc<RoleSession>,
    stmt: &Statement,
) -> PgWireResult<Service> {
    match role.cluster_for(stmt) {
        Some(cluster) => {
            tracing::debug!("on the Ballista cluster: {stmt}");
            Ok((cluster.ctx.clone(), cluster.service.clone()))
        }
        None => statement_service(shared, conn, role),
    }
}

/// `sql`'s statements, measured, parsed and judged on the query pool (walking a syntax tree
/// recurses once per level, which the pool's threads have the stack for).
async fn prepare(
    shared: &Arc<Shared>,
    role: &Arc<RoleSession>,
    sql: &str,
    token: &CancellationToken,
    deadline: Option<Instant>,
) -> PgWireResult<Vec<execute::Prepared>> {
    let (s, r, text) = (shared.clone(), role.clone(), sql.to_string());
    let job = shared
        .pool
        .spawn(async move { execute::prepare(&s, &text, &r.hidden) });
    bounded(job, token, deadline).await?
}

/// Plan a query on the pool: EXPLAIN with the rollup routing row where rollups answer, else
/// the statement's own plan.
async fn plan_query(
    shared: &Arc<Shared>,
    role: &Arc<RoleSession>,
    ctx: Arc<SessionContext>,
    stmt: Statement,
    token: &CancellationToken,
    deadline: Option<Instant>,
) -> PgWireResult<LogicalPlan> {
    let role = role.clone();
    let job = shared.pool.spawn(async move {
        if let Some(plan) = explain_with_routing(&role, &stmt).await? {
            return Ok(plan);
        }
        execute::plan(&ctx, stmt).await
    });
    bounded(job, token, deadline).await?
}

fn deadline<C: ClientInfo + ?Sized>(client: &C) -> Option<Instant> {
    client
        .metadata()
        .get(TIMEOUT_KEY)
        .and_then(|v| v.parse::<u64>().ok())
        .filter(|ms| *ms > 0)
        .map(|ms| Instant::now() + Duration::from_millis(ms))
}

fn timed_out() -> PgWireError {
    pg_error(
        "ERROR",
        "57014",
        "canceling statement due to statement timeout",
    )
}

fn cancelled() -> PgWireError {
    pg_error("ERROR", "57014", "canceling statement due to user request")
}

async fn until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// Run `fut` unless the statement is cancelled or times out first.
async fn bounded<T>(
    fut: impl std::future::Future<Output = PgWireResult<T>>,
    token: &CancellationToken,
    deadline: Option<Instant>,
) -> PgWireResult<T> {
    tokio::select! {
        biased;
        _ = token.cancelled() => Err(cancelled()),
        _ = until(deadline) => Err(timed_out()),
        r = fut => r.map_err(engine_error),
    }
}

/// The rows of a response, ended by an error when the statement is cancelled or times out
/// while they stream.
fn bounded_rows(
    rows: impl Stream<Item = PgWireResult<DataRow>> + Send + Unpin + 'static,
    token: CancellationToken,
    deadline: Option<Instant>,
) -> impl Stream<Item = PgWireResult<DataRow>> + Send + 'static {
    futures::stream::unfold(Some(rows), move |state| {
        let token = token.clone();
        async move {
            let mut rows = state?;
            tokio::select! {
                biased;
                _ = token.cancelled() => Some((Err(cancelled()), None)),
                _ = until(deadline) => Some((Err(timed_out()), None)),
                item = rows.next() => item.map(|i| (i.map_err(engine_error), Some(rows))),
            }
        }
    })
}

fn bound_response(r: Response, token: &CancellationToken, deadline: Option<Instant>) -> Response {
    match r {
        Response::Query(mut q) => {
            let rows = std::mem::replace(&mut q.data_rows, Box::pin(futures::stream::empty()));
            q.data_rows = Box::pin(bounded_rows(rows, token.clone(), deadline));
            Response::Query(q)
        }
        other => other,
    }
}

/// Give engine errors PostgreSQL's SQLSTATEs so clients react as they would to PostgreSQL.
pub(super) fn engine_error(e: PgWireError) -> PgWireError {
    let PgWireError::ApiError(inner) = &e else {
        return e;
    };
    let text = inner.to_string();
    let text = text.split("\n\nbacktrace").next().unwrap_or(&text).trim();
    let code = if text.contains("Resources exhausted") {
        "53200"
    } else if text.contains("not found") && text.to_lowercase().contains("table") {
        "42P01"
    } else if text.contains("No field named") || text.contains("Schema error") {
        "42703"
    } else if text.contains("SQL error") || text.contains("ParserError") {
        "42601"
    } else if text.contains("Invalid function") {
        "42883"
    } else {
        "XX000"
    };
    pg_error("ERROR", code, text.to_string())
}

/// Apply a client setting to this connection only. `statement_timeout` may go down from the
/// role's limit, never up or off: a larger value keeps the limit, with a warning.
async fn apply_setting<C>(
    shared: &Shared,
    client: &mut C,
    role: &str,
    name: &str,
    value: Option<String>,
    report: Option<&'static str>,
) -> PgWireResult<Response>
where
    C: ClientInfo + Sink<PgWireBackendMessage> + Unpin + Send,
    PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
{
    if name == "statement_timeout" {
        let ceiling = shared.timeout_ceiling(role);
        let timeout = match &value {
            None => ceiling,
            Some(v) => parse_duration(v).map_err(|m| {
                pg_error(
                    "ERROR",
                    "22023",
                    format!("invalid value for parameter \"statement_timeout\": {m}"),
                )
            })?,
        };
        // The role's limit is a ceiling: a longer timeout, or none (pg_dump sets 0 before
        // it starts), keeps the limit, and the client is warned.
        let timeout = match ceiling {
            Some(limit) if timeout.is_none_or(|t| t > limit) => {
                let notice = pgwire::error::ErrorInfo::new(
                    "WARNING".into(),
                    "01000".into(),
                    format!(
                        "statement_timeout stays at {}: role \"{role}\" may lower it, not \
                         raise or switch it off (kbcrm.yaml)",
                        humantime::format_duration(limit)
                    ),
                );
                client
                    .send(PgWireBackendMessage::NoticeResponse(notice.into()))
                    .await?;
                Some(limit)
            }
            _ => timeout,
        };
        match timeout {
            Some(t) => client
                .metadata_mut()
                .insert(TIMEOUT_KEY.into(), t.as_millis().to_string()),
            None => client.metadata_mut().remove(TIMEOUT_KEY),
        };
        return Ok(Response::Execution(Tag::new("SET")));
    }
    let shown = match value {
        Some(v) => {
            client.metadata_mut().insert(name.to_string(), v.clone());
            v
        }
        None => {
            client.metadata_mut().remove(name);
            super::default_setting(name).to_string()
        }
    };
    if let Some(report) = report {
        client
            .send(PgWireBackendMessage::ParameterStatus(ParameterStatus::new(
                report.to_string(),
                shown,
            )))
            .await?;
    }
    Ok(Response::Execution(Tag::new("SET")))
}

/// How a statement's rows are written: the column names the client wrote, the format it asked
/// for, and its session's formatting options.
struct Encoding<'a> {
    names: &'a [Option<String>],
    format: &'a Format,
    options: Arc<FormatOptions>,
}

/// What stops a statement: its token (cancelled by a cancel request, a timeout or a closed
/// connection) and its deadline.
#[derive(Clone, Copy)]
struct Limits<'a> {
    token: &'a CancellationToken,
    deadline: Option<Instant>,
}

/// A query's response: its columns, and rows computed on the pool as they are read, ended by
/// an error when the statement is cancelled or times out.
fn query_response(
    shared: &Shared,
    ctx: Arc<SessionContext>,
    plan: LogicalPlan,
    stmt: &Statement,
    encoding: Encoding<'_>,
    limits: Limits<'_>,
) -> PgWireResult<Response> {
    let Encoding {
        names,
        format,
        options,
    } = encoding;
    let Limits { token, deadline } = limits;
    if super::copy::is_copy_out(stmt) {
        let (_, copy) = super::copy::query_of(stmt)?;
        // Rows encoded as the copy format needs them: binary fields, or text to escape.
        let format = match copy {
            super::copy::CopyFormat::Binary => Format::UnifiedBinary,
            _ => Format::UnifiedText,
        };
        let fields = Arc::new(execute::fields(&plan, names, &format, Some(options))?);
        let columns = fields.len();
        let mut writer = super::copy::CopyWriter::new(
            copy.clone(),
            fields.iter().map(|f| f.name().to_string()).collect(),
        );
        let head = writer.start();
        let rows = execute::rows(shared.pool.clone(), ctx, plan, fields);
        let writer = Arc::new(std::sync::Mutex::new(writer));
        let end = writer.clone();
        let data = futures::stream::iter(head.map(Ok))
            .chain(
                bounded_rows(Box::pin(rows), token.clone(), deadline)
                    .map(move |row| row.and_then(|r| writer.lock().expect("copy writer").row(&r))),
            )
            .chain(
                futures::stream::once(async move { end.lock().expect("copy writer").finish() })
                    .filter_map(|last| async move { last.map(Ok) }),
            );
        // Made as a text copy and then marked binary: for a binary one, `new` would add a
        // trailer of its own, apart from the header when there are no rows.
        let mut response = pgwire::api::results::CopyResponse::new(0, columns, data);
        response.format = copy.code();
        return Ok(Response::CopyOut(response));
    }
    let fields = Arc::new(execute::fields(&plan, names, format, Some(options))?);
    let rows = execute::rows(shared.pool.clone(), ctx, plan, fields.clone());
    let mut response = QueryResponse::new(
        fields,
        bounded_rows(Box::pin(rows), token.clone(), deadline),
    );
    if matches!(stmt, Statement::Explain { .. }) {
        response.set_command_tag("EXPLAIN");
    }
    Ok(Response::Query(response))
}

#[async_trait]
impl SimpleQueryHandler for Queries {
    async fn do_query<C>(&self, client: &mut C, query: &str) -> PgWireResult<Vec<Response>>
    where
        C: ClientInfo + ClientPortalStore + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::PortalStore: PortalStore,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        let (conn, role) = session(&self.shared, client)?;
        let token = conn.start_statement();
        let deadline = deadline(client);
        let statements = prepare(&self.shared, &role, query, &token, deadline).await?;
        if statements.is_empty() {
            return Ok(vec![Response::EmptyQuery]);
        }
        let options = Arc::new(FormatOptions::from_client_metadata(client.metadata()));
        let mut out = Vec::new();
        for execute::Prepared {
            stmt,
            verdict,
            names,
        } in statements
        {
            match verdict {
                Verdict::Refuse(code, msg) => return Err(pg_error("ERROR", code, msg)),
                Verdict::Reply(tag) => out.push(Response::Execution(Tag::new(tag))),
                Verdict::Set {
                    name,
                    value,
                    report,
                } => out.push(
                    apply_setting(&self.shared, client, &conn.role, &name, value, report).await?,
                ),
                Verdict::Run if declared_cursor(&stmt).is_some() => {
                    out.push(
                        self.declare_cursor(
                            client,
                            &conn,
                            &role,
                            &stmt,
                            &options,
                            Limits {
                                token: &token,
                                deadline,
                            },
                        )
                        .await?,
                    );
                }
                Verdict::Run if is_show_all(&stmt) => {
                    let (ctx, _) = statement_service(&self.shared, &conn, &role)?;
                    let plan = show_all(&self.shared, &conn, client)?;
                    out.push(query_response(
                        &self.shared,
                        ctx,
                        plan,
                        &stmt,
                        Encoding {
                            names: &[],
                            format: &Format::UnifiedText,
                            options: options.clone(),
                        },
                        Limits {
                            token: &token,
                            deadline,
                        },
                    )?);
                }
                Verdict::Run if execute::is_query(&stmt) => {
                    let (ctx, _) = service_for(&self.shared, &conn, &role, &stmt)?;
                    let plan = plan_query(
                        &self.shared,
                        &role,
                        ctx.clone(),
                        stmt.clone(),
                        &token,
                        deadline,
                    )
                    .await?;
                    out.push(query_response(
                        &self.shared,
                        ctx,
                        plan,
                        &stmt,
                        Encoding {
                            names: &names,
                            format: &Format::UnifiedText,
                            options: options.clone(),
                        },
                        Limits {
                            token: &token,
                            deadline,
                        },
                    )?);
                }
                Verdict::Run => {
                    let sql = stmt.to_string();
                    let (_, service) = service_for(&self.shared, &conn, &role, &stmt)?;
                    let responses = bounded(
                        <DfSessionService as SimpleQueryHandler>::do_query(&service, client, &sql),
                        &token,
                        deadline,
                    )
                    .await?;
                    out.extend(
                        responses
                            .into_iter()
                            .map(|r| bound_response(r, &token, deadline)),
                    );
                }
            }
        }
        Ok(out)
    }
}
