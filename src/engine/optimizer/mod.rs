//! kbcrm's own logical optimizer rules, added to every session.
//!
//! [`CountBesideDistinct`]: a BI query such as
//! `select customer_id, count(*), sum(amount), count(distinct product_id) ... group by customer_id`
//! is planned by DataFusion 55 with one hash set of product ids per customer (its rewrite of a
//! single DISTINCT into a two-level GROUP BY accepts `sum`, `min` and `max` beside it, not
//! `count`). Those sets are far larger than the engine accounts for them: at scale 10 the query
//! above held 15 GB under a 1 GiB memory limit. Counting is summing ones, so this rule writes
//! each plain `count` beside a single DISTINCT as a `sum`, and DataFusion's rewrite then applies:
//! the distinct values become a GROUP BY key, which the engine accounts for and spills.
//!
//! [`EagerAggregate`] groups a fact by its join key before the join with a dimension;
//! [`KeyReduction`] reduces an aggregate's input to the join keys a filtered relation can match.

use std::sync::Arc;

mod eager;
pub use eager::EagerAggregate;
mod semi;
pub use semi::KeyReduction;

use datafusion::common::tree_node::Transformed;
use datafusion::common::{Column, Result};
use datafusion::functions_aggregate::expr_fn::sum;
use datafusion::logical_expr::expr::{AggregateFunction, AggregateFunctionParams};
use datafusion::logical_expr::{Aggregate, Expr, LogicalPlan, Projection, case, lit};
use datafusion::optimizer::{ApplyOrder, OptimizerConfig, OptimizerRule};

/// Writes `count(...)` beside a single `count(DISTINCT x)` (or any aggregate over one distinct
/// argument set) as `sum` of ones, so that DataFusion's single-distinct rewrite applies.
#[derive(Debug, Default)]
pub struct CountBesideDistinct;

/// What an aggregate of the node becomes.
enum Plain<'a> {
    /// Kept as it is (sum, min, max, distinct aggregates).
    Kept,
    /// A count of these arguments, written as a sum; the result is that sum or, over no
    /// rows, 0.
    Count(&'a [Expr]),
}

/// How each aggregate expression is rewritten, or `None` when the node does not qualify: one
/// set of distinct arguments, no filters or orderings, no grouping sets, and besides the
/// distinct aggregates only counts, sums, minima and maxima, at least one of them a count.
fn plan_rewrite(agg: &Aggregate) -> Option<Vec<Plain<'_>>> {
    if matches!(agg.group_expr.first(), Some(Expr::GroupingSet(_))) {
        return None;
    }
    let mut distinct_args = None;
    let mut kinds = Vec::with_capacity(agg.aggr_expr.len());
    for e in &agg.aggr_expr {
        let Expr::AggregateFunction(AggregateFunction {
            func,
            params:
                AggregateFunctionParams {
                    distinct,
                    args,
                    filter: None,
                    order_by,
                    ..
                },
        }) = e
        else {
            return None;
        };
        if !order_by.is_empty() {
            return None;
        }
        let name = func.name().to_lowercase();
        if *distinct {
            match &distinct_args {
                None => distinct_args = Some(args.clone()),
                Some(seen) if seen == args => {}
                Some(_) => return None,
            }
            kinds.push(Plain::Kept);
        } else if name == "count" && args.len() <= 1 {
            kinds.push(Plain::Count(args));
        } else if matches!(name.as_str(), "sum" | "min" | "max") {
            kinds.push(Plain::Kept);
        } else {
            return None;
        }
    }
    let counts = kinds.iter().any(|k| matches!(k, Plain::Count(_)));
    (distinct_args.is_some() && counts).then_some(kinds)
}

/// `count(arg)` as a sum of ones: `sum(1)` for `count(*)` and constants, else
/// `sum(case when arg is not null then 1 else 0 end)`.
fn count_as_sum(args: &[Expr]) -> Result<Expr> {
    Ok(match args.first() {
        Some(Expr::Literal(v, _)) if v.is_null() => sum(lit(0i64)),
        None | Some(Expr::Literal(..)) => sum(lit(1i64)),
        Some(arg) => sum(case(arg.clone().is_not_null())
            .when(lit(true), lit(1i64))
            .otherwise(lit(0i64))?),
    })
}

impl OptimizerRule for CountBesideDistinct {
    fn name(&self) -> &str {
        "kbcrm_count_beside_distinct"
    }

    fn apply_order(&self) -> Option<ApplyOrder> {
        Some(ApplyOrder::TopDown)
    }

    fn supports_rewrite(&self) -> bool {
        true
    }

    fn rewrite(
        &self,
        plan: LogicalPlan,
        _config: &dyn OptimizerConfig,
    ) -> Result<Transformed<LogicalPlan>> {
        let LogicalPlan::Aggregate(agg) = &plan else {
            return Ok(Transformed::no(plan));
        };
        let Some(kinds) = plan_rewrite(agg) else {
            return Ok(Transformed::no(plan));
        };
        let mut aggr_expr = Vec::with_capacity(kinds.len());
        for (e, kind) in agg.aggr_expr.iter().zip(&kinds) {
            aggr_expr.push(match kind {
                Plain::Kept => e.clone(),
                Plain::Count(args) => count_as_sum(args)?,
            });
        }
        // Two counts of the same argument, or a count beside the same sum, would name two
        // output columns alike.
        let names: std::collections::HashSet<String> = aggr_expr
            .iter()
            .map(|e| e.schema_name().to_string())
            .collect();
        if names.len() != aggr_expr.len() {
            return Ok(Transformed::no(plan));
        }
        let rewritten = Aggregate::try_new(agg.input.clone(), agg.group_expr.clone(), aggr_expr)?;
        // The columns under their old names (and a count of no rows as 0, not NULL).
        let groups = agg.group_expr.len();
        let old = agg.schema.clone();
        let new = rewritten.schema.clone();
        let mut columns = Vec::with_capacity(old.fields().len());
        for i in 0..old.fields().len() {
            let (new_qualifier, new_field) = new.qualified_field(i);
            let (old_qualifier, old_field) = old.qualified_field(i);
            let mut e = Expr::Column(Column::new(new_qualifier.cloned(), new_field.name()));
            if i >= groups && matches!(kinds[i - groups], Plain::Count(_)) {
                e = datafusion::functions::expr_fn::coalesce(vec![e, lit(0i64)]);
            }
            columns.push(e.alias_qualified(old_qualifier.cloned(), old_field.name()));
        }
        let projection = Projection::try_new(columns, Arc::new(LogicalPlan::Aggregate(rewritten)))?;
        Ok(Transformed::yes(LogicalPlan::Projection(projection)))
    }
}

/// Add kbcrm's rules to a session.
pub fn register(ctx: &datafusion::prelude::SessionContext) {
    ctx.add_optimizer_rule(Arc::new(CountBesideDistinct));
    ctx.add_optimizer_rule(Arc::new(EagerAggregate));
    ctx.add_optimizer_rule(Arc::new(KeyReduction));
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::arrow::util::pretty::pretty_format_batches;
    use datafusion::prelude::SessionContext;

    /// The optimized plan of `sql` and its rows, printed.
    pub(super) async fn run(ctx: &SessionContext, sql: &str) -> (String, String) {
        let df = ctx.sql(sql).await.expect("plans");
        let plan = format!(
            "{}",
            df.clone()
                .into_optimized_plan()
                .expect("optimises")
                .display_indent()
        );
        let rows = pretty_format_batches(&df.collect().await.expect("runs"))
            .expect("prints")
            .to_string();
        (plan, rows)
    }

    #[tokio::test]
    async fn counts_beside_one_distinct_become_a_group_by_with_the_same_result() {
        let plain = SessionContext::new();
        let ruled = SessionContext::new();
        register(&ruled);
        for ctx in [&plain, &ruled] {
            ctx.sql(
                "create table t (c varchar, p varchar, a double) as values \
                 ('x', 'p1', 1.0), ('x', 'p1', 2.0), ('x', 'p2', null), ('y', null, 4.0), \
                 ('y', 'p3', 5.0), ('z', null, null)",
            )
            .await
            .expect("create")
            .collect()
            .await
            .expect("created");
        }
        let queries = [
            "select c, count(*) as n, count(a) as na, sum(a) as s, count(distinct p) as d \
             from t group by c order by c",
            "select count(*), count(p), max(a), count(distinct p) from t",
            "select count(*), count(distinct p) from t where a > 100",
            // Not rewritten: two distinct argument sets, or another aggregate beside.
            "select c, count(*), count(distinct p), count(distinct a) from t group by c order by c",
            "select c, count(*), avg(a), count(distinct p) from t group by c order by c",
        ];
        for (i, sql) in queries.iter().enumerate() {
            let (plain_plan, want) = run(&plain, sql).await;
            let (plan, got) = run(&ruled, sql).await;
            assert_eq!(got, want, "{sql}");
            // DataFusion's single-distinct rewrite groups by the distinct argument as `alias1`.
            let grouped = plan.contains("AS alias1");
            assert!(!plain_plan.contains("AS alias1"), "{sql}:\n{plain_plan}");
            assert_eq!(grouped, i < 3, "{sql}:\n{plan}");
        }
        let (_, empty) = run(&ruled, queries[2]).await;
        assert!(empty.contains("| 0 "), "a count of no rows is 0: {empty}");
    }
}
