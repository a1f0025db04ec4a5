//! A server on a Ballista cluster: which statements go there.
//!
//! Queries over the warehouse's tables run on the cluster, in a session holding the role's
//! tables (PII masked, rows filtered) as Parquet listings. Everything the cluster cannot be sent
//! runs in the role's local session, with the same table versions: the PostgreSQL catalog
//! (`pg_catalog`, `information_schema`) that BI tools query as they connect, the run history
//! (`kbcrm_runs`), table functions, PostgreSQL's own functions that kbcrm emulates, and queries
//! that read no table at all.

use std::collections::BTreeSet;
use std::ops::ControlFlow;
use std::sync::Arc;

use datafusion::prelude::SessionContext;
use datafusion::sql::sqlparser::ast::{
    Expr, Ident, ObjectName, Query, Statement, TableFactor, Visit, Visitor,
};
use datafusion_postgres::DfSessionService;

/// One role's session on the cluster.
pub struct ClusterSide {
    /// The cluster session.
    pub ctx: Arc<SessionContext>,
    /// The PostgreSQL-protocol service over the cluster session.
    pub service: Arc<DfSessionService>,
    /// The role's tables, as the cluster session holds them.
    tables: BTreeSet<String>,
    /// Functions the cluster knows (names and aliases, lower case).
    functions: BTreeSet<String>,
    /// The session's own catalog and schema, which a qualified name may spell out.
    catalog: String,
    schema: String,
}

impl ClusterSide {
    /// The cluster side of a role whose tables `ctx` holds.
    pub fn new(ctx: SessionContext) -> Self {
        let state = ctx.state();
        let functions = state
            .scalar_functions()
            .keys()
            .chain(state.aggregate_functions().keys())
            .chain(state.window_functions().keys())
            .map(|n| n.to_lowercase())
            .collect();
        let options = state.config().options();
        let catalog = options.catalog.default_catalog.clone();
        let schema = options.catalog.default_schema.clone();
        let tables = ctx
            .catalog(&catalog)
            .and_then(|c| c.schema(&schema))
            .map(|s| s.table_names().into_iter().collect())
            .unwrap_or_default();
        let ctx = Arc::new(ctx);
        ClusterSide {
            service: Arc::new(DfSessionService::new(ctx.clone())),
            ctx,
            tables,
            functions,
            catalog,
            schema,
        }
    }

    /// Whether the statement runs on the cluster: a query (or its `EXPLAIN`) that reads at
    /// least one of the role's tables, nothing else but its own CTEs, and calls only functions
    /// the cluster knows.
    pub fn takes(&self, stmt: &Statement) -> bool {
        let query = match stmt {
            Statement::Query(_) => stmt,
            Statement::Explain { statement, .. } if matches!(**statement, Statement::Query(_)) => {
                statement
            }
            _ => return false,
        };
        let mut check = Check {
            side: self,
            ctes: BTreeSet::new(),
            tables: 0,
        };
        query.visit(&mut check).is_continue() && check.tables > 0
    }

    /// The table a relation name stands for, if it is one of the role's tables on the cluster
    /// (`t`, `public.t` or `datafusion.public.t`).
    fn table<'a>(&self, parts: &'a [String]) -> Option<&'a String> {
        let (table, qualifiers) = parts.split_last()?;
        let qualified = match qualifiers {
            [] => true,
            [schema] => *schema == self.schema,
            [catalog, schema] => *catalog == self.catalog && *schema == self.schema,
            _ => false,
        };
        (qualified && self.tables.contains(table)).then_some(table)
    }
}

/// An identifier as the planner resolves it: unquoted ones in lower case.
fn normal(ident: &Ident) -> String {
    match ident.quote_style {
        Some(_) => ident.value.clone(),
        None => ident.value.to_lowercase(),
    }
}

fn parts(name: &ObjectName) -> Option<Vec<String>> {
    name.0.iter().map(|p| p.as_ident().map(normal)).collect()
}

struct Check<'a> {
    side: &'a ClusterSide,
    /// Names of the common table expressions met so far.
    ctes: BTreeSet<String>,
    /// Warehouse tables read.
    tables: usize,
}

impl Visitor for Check<'_> {
    type Break = ();

    fn pre_visit_query(&mut self, query: &Query) -> ControlFlow<()> {
        if let Some(with) = &query.with {
            self.ctes
                .extend(with.cte_tables.iter().map(|c| normal(&c.alias.name)));
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_relation(&mut self, relation: &ObjectName) -> ControlFlow<()> {
        let Some(parts) = parts(relation) else {
            return ControlFlow::Break(());
        };
        if let [single] = parts.as_slice()
            && self.ctes.contains(single)
        {
            return ControlFlow::Continue(());
        }
        match self.side.table(&parts) {
            Some(_) => {
                self.tables += 1;
                ControlFlow::Continue(())
            }
            None => ControlFlow::Break(()),
        }
    }

    fn pre_visit_table_factor(&mut self, factor: &TableFactor) -> ControlFlow<()> {
        match factor {
            TableFactor::Table { args: None, .. }
            | TableFactor::Derived { .. }
            | TableFactor::NestedJoin { .. } => ControlFlow::Continue(()),
            // Table functions, UNNEST, PIVOT and the like: the cluster is sent table scans only.
            _ => ControlFlow::Break(()),
        }
    }

    fn pre_visit_expr(&mut self, expr: &Expr) -> ControlFlow<()> {
        if let Expr::Function(f) = expr {
            let known = parts(&f.name)
                .and_then(|p| p.last().cloned())
                .is_some_and(|name| self.side.functions.contains(&name));
            if !known {
                return ControlFlow::Break(());
            }
        }
        ControlFlow::Continue(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::sql::sqlparser::dialect::PostgreSqlDialect;
    use datafusion::sql::sqlparser::parser::Parser;

    fn side() -> ClusterSide {
        let ctx = SessionContext::new();
        for t in ["fact_sales", "dim_customer"] {
            ctx.register_table(
                t,
                Arc::new(datafusion::datasource::empty::EmptyTable::new(Arc::new(
                    arrow::datatypes::Schema::empty(),
                ))),
            )
            .expect("register");
        }
        ClusterSide::new(ctx)
    }

    fn takes(sql: &str) -> bool {
        let stmt = Parser::parse_sql(&PostgreSqlDialect {}, sql)
            .expect("parses")
            .remove(0);
        side().takes(&stmt)
    }

    #[test]
    fn queries_over_warehouse_tables_go_to_the_cluster() {
        assert!(takes("select count(*) from fact_sales"));
        assert!(takes(
            "select c.segment, sum(s.net_amount) from public.fact_sales s \
             join datafusion.public.dim_customer c using (customer_key) group by 1"
        ));
        assert!(takes(
            "with recent as (select * from fact_sales where order_date > date '2024-01-01') \
             select upper(x.customer_id), avg(x.net_amount) over () from recent x"
        ));
        assert!(takes("explain select * from \"fact_sales\""));
        assert!(takes(
            "select * from dim_customer where customer_id in (select customer_id from fact_sales)"
        ));
    }

    #[test]
    fn catalog_history_and_emulated_functions_stay_local() {
        assert!(!takes("select 1"));
        assert!(!takes("select * from pg_catalog.pg_type"));
        assert!(!takes("select * from information_schema.tables"));
        assert!(!takes("select * from kbcrm_runs"));
        assert!(!takes("select * from other.fact_sales"));
        assert!(!takes("select \"FACT_SALES\".x from \"FACT_SALES\""));
        assert!(!takes(
            "select s.*, t.relname from fact_sales s, pg_class t where t.oid = 1"
        ));
        assert!(!takes("select * from fact_sales, generate_series(1, 3)"));
        assert!(!takes("select pg_get_userbyid(1) from fact_sales"));
        assert!(!takes("show tables"));
        assert!(!takes("explain analyze select 1"));
    }
}
