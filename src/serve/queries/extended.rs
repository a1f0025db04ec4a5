//! The extended protocol: statements parsed and judged, then planned in the role's session;
//! portals executed with the same limits as simple queries.

use super::*;

/// Parses extended-protocol statements: judged first, then planned in the role's session.
pub struct Parser {
    pub(super) shared: Arc<Shared>,
}

#[async_trait]
impl QueryParser for Parser {
    type Statement = Stmt;

    async fn parse_sql<C>(
        &self,
        client: &C,
        sql: &str,
        types: &[Option<Type>],
    ) -> PgWireResult<Option<Stmt>>
    where
        C: ClientInfo + Unpin + Send + Sync,
    {
        let (conn, role) = session(&self.shared, client)?;
        let token = conn.start_statement();
        let deadline = deadline(client);
        let mut statements = prepare(&self.shared, &role, sql, &token, deadline).await?;
        if statements.is_empty() {
            return Ok(None);
        }
        let execute::Prepared { stmt, verdict, .. } = statements.remove(0);
        match verdict {
            Verdict::Refuse(code, msg) => Err(pg_error("ERROR", code, msg)),
            Verdict::Reply(_) | Verdict::Set { .. } => {
                Ok(Some((sql.to_string(), Some((stmt, empty_plan())))))
            }
            Verdict::Run if execute::is_query(&stmt) => {
                // Planned where it will run: a plan of the role's local tables cannot be sent
                // to the cluster.
                let (ctx, _) = service_for(&self.shared, &conn, &role, &stmt)?;
                let plan =
                    plan_query(&self.shared, &role, ctx, stmt.clone(), &token, deadline).await?;
                // The text as the client wrote it: its column names are PostgreSQL's.
                Ok(Some((sql.to_string(), Some((stmt, plan)))))
            }
            Verdict::Run => {
                let service = match role.cluster_for(&stmt) {
                    Some(cluster) => &cluster.service,
                    None => &role.service,
                };
                service
                    .query_parser()
                    .parse_sql(client, &stmt.to_string(), types)
                    .await
                    .map_err(engine_error)
            }
        }
    }

    fn get_parameter_types(&self, stmt: &Stmt) -> PgWireResult<Vec<Type>> {
        match self.shared.any_role() {
            Some(r) => r.service.query_parser().get_parameter_types(stmt),
            None => Ok(vec![]),
        }
    }

    fn get_result_schema(
        &self,
        stmt: &Stmt,
        column_format: Option<&Format>,
    ) -> PgWireResult<Vec<FieldInfo>> {
        if let (_, Some((s, _))) = stmt
            && super::super::copy::is_copy_out(s)
        {
            return Ok(vec![]);
        }
        if let (sql, Some((s, plan))) = stmt
            && execute::is_query(s)
        {
            let names = written_names(sql);
            return execute::fields(
                plan,
                &names,
                column_format.unwrap_or(&Format::UnifiedText),
                None,
            );
        }
        match self.shared.any_role() {
            Some(r) => r
                .service
                .query_parser()
                .get_result_schema(stmt, column_format),
            None => Ok(vec![]),
        }
    }
}

#[async_trait]
impl ExtendedQueryHandler for Queries {
    type Statement = Stmt;
    type QueryParser = Parser;

    fn query_parser(&self) -> Arc<Parser> {
        self.parser.clone()
    }

    /// An Execute without a row limit streams its rows as they are computed; pgwire's own
    /// path would first collect the whole result in memory. Row-limited executes (cursors)
    /// keep pgwire's suspended-portal handling.
    async fn on_execute<C>(&self, client: &mut C, message: Execute) -> PgWireResult<()>
    where
        C: ClientInfo + ClientPortalStore + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::PortalStore: PortalStore<Statement = Stmt>,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        let name = message.name.as_deref().unwrap_or(DEFAULT_NAME).to_string();
        let portal = match client.portal_store().get_portal(&name) {
            Some(Entry::Value(p)) => p,
            _ => return self._on_execute(client, message).await,
        };
        let fresh = matches!(*portal.state().lock().await, PortalExecutionState::Initial);
        if message.max_rows != 0 || !fresh {
            return self._on_execute(client, message).await;
        }
        if !matches!(client.state(), PgWireConnectionState::ReadyForQuery) {
            return Err(PgWireError::NotReadyForQuery);
        }
        let mut status = client.transaction_status();
        client.set_state(PgWireConnectionState::QueryInProgress);
        let response =
            <Self as ExtendedQueryHandler>::do_query(self, client, portal.as_ref(), 0).await?;
        *portal.state().lock().await = PortalExecutionState::Finished;
        match response {
            Response::Query(mut q) => {
                let mut rows = 0usize;
                while let Some(row) = q.data_rows.next().await {
                    client.feed(PgWireBackendMessage::DataRow(row?)).await?;
                    rows += 1;
                }
                let tag = Tag::new(&q.command_tag).with_rows(rows);
                client
                    .send(PgWireBackendMessage::CommandComplete(tag.into()))
                    .await?;
            }
            Response::EmptyQuery => {
                client
                    .feed(PgWireBackendMessage::EmptyQueryResponse(
                        EmptyQueryResponse::new(),
                    ))
                    .await?;
            }
            Response::Execution(tag) => send_execution_response(client, tag).await?,
            Response::TransactionStart(tag) => {
                send_execution_response(client, tag).await?;
                status = status.to_in_transaction_state();
            }
            Response::TransactionEnd(tag) => {
                send_execution_response(client, tag).await?;
                status = status.to_idle_state();
                client.portal_store().rm_portal(DEFAULT_NAME);
            }
            Response::Error(e) => {
                client
                    .send(PgWireBackendMessage::ErrorResponse((*e).into()))
                    .await?;
                status = status.to_error_state();
            }
            Response::CopyOut(copy) => {
                pgwire::api::copy::send_copy_out_response(client, copy).await?;
            }
            _ => {
                return Err(pg_error(
                    "ERROR",
                    "0A000",
                    "COPY from a client is not supported by the kbcrm server",
                ));
            }
        }
        client.set_state(PgWireConnectionState::ReadyForQuery);
        client.set_transaction_status(status);
        Ok(())
    }

    async fn do_query<C>(
        &self,
        client: &mut C,
        portal: &Portal<Stmt>,
        max_rows: usize,
    ) -> PgWireResult<Response>
    where
        C: ClientInfo + ClientPortalStore + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::PortalStore: PortalStore<Statement = Stmt>,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        let (conn, role) = session(&self.shared, client)?;
        if let (_, Some((stmt, _))) = &portal.statement.statement {
            match super::super::policy::judge(stmt, &role.hidden) {
                Verdict::Refuse(code, msg) => return Err(pg_error("ERROR", code, msg)),
                Verdict::Reply(tag) => return Ok(Response::Execution(Tag::new(tag))),
                Verdict::Set {
                    name,
                    value,
                    report,
                } => {
                    return apply_setting(&self.shared, client, &conn.role, &name, value, report)
                        .await;
                }
                Verdict::Run => {}
            }
        }
        let token = conn.start_statement();
        let deadline = deadline(client);
        match &portal.statement.statement {
            (_, Some((stmt, plan))) if execute::is_query(stmt) => {
                let (ctx, _) = service_for(&self.shared, &conn, &role, stmt)?;
                let wire = self
                    .parser
                    .get_parameter_types(&portal.statement.statement)?;
                let inferred = execute::parameter_types(plan)?;
                let inferred: Vec<_> = inferred.iter().map(Option::as_ref).collect();
                let wire: Vec<_> = wire.iter().map(Some).collect();
                let params = datafusion_postgres::arrow_pg::datatypes::df::deserialize_parameters_with_server_types(
                    portal, &inferred, &wire,
                )?;
                let plan = plan.clone();
                let job = self.shared.pool.spawn(async move {
                    plan.replace_params_with_values(&params)
                        .map_err(execute::engine_error)
                });
                let plan = bounded(job, &token, deadline).await??;
                let options = Arc::new(FormatOptions::from_client_metadata(client.metadata()));
                query_response(
                    &self.shared,
                    ctx,
                    plan,
                    stmt,
                    Encoding {
                        names: &written_names(&portal.statement.statement.0),
                        format: &portal.result_column_format,
                        options,
                    },
                    Limits {
                        token: &token,
                        deadline,
                    },
                )
            }
            statement => {
                let (_, service) = match statement {
                    (_, Some((stmt, _))) => service_for(&self.shared, &conn, &role, stmt)?,
                    _ => statement_service(&self.shared, &conn, &role)?,
                };
                let response = bounded(
                    <DfSessionService as ExtendedQueryHandler>::do_query(
                        &service, client, portal, max_rows,
                    ),
                    &token,
                    deadline,
                )
                .await?;
                Ok(bound_response(response, &token, deadline))
            }
        }
    }
}
