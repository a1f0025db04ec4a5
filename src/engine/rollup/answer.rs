//! Reading a rollup's shape from its plan, and answering an aggregate query from a rollup.

use super::*;

impl Rollup {
    /// Read a rollup's definition from its analyzed plan. Errors say why the SQL is not one.
    pub(super) fn from_plan(name: &str, plan: &LogicalPlan) -> std::result::Result<Self, String> {
        let mut top = plan;
        while let LogicalPlan::Sort(s) = top {
            top = &s.input;
        }
        let LogicalPlan::Projection(proj) = top else {
            return Err("it is not one SELECT ... GROUP BY".into());
        };
        let LogicalPlan::Aggregate(agg) = proj.input.as_ref() else {
            return Err("it is not one SELECT ... GROUP BY (HAVING is not allowed either)".into());
        };
        if matches!(agg.group_expr.first(), Some(Expr::GroupingSet(_))) {
            return Err("it uses GROUPING SETS, ROLLUP or CUBE".into());
        }
        let tree = JoinTree::of(&agg.input)?;
        let mut tables = BTreeSet::new();
        for leaf in &tree.leaves {
            let Some(t) = &leaf.table else {
                return Err("it reads something other than tables (a subquery or view)".into());
            };
            if !tables.insert(t.clone()) {
                return Err(format!("it reads table '{t}' twice"));
            }
        }
        let mut edges = BTreeSet::new();
        for c in &tree.conjuncts {
            match tree.edge(c) {
                Some((a, b)) => {
                    edges.insert((a.1, b.1));
                }
                None => {
                    return Err(format!(
                        "it filters rows ({c}); a rollup keeps every row of its tables: filter \
                         in the queries instead"
                    ));
                }
            }
        }
        let ngroups = agg.group_expr.len();
        let mut groups = HashMap::new();
        let mut measures = HashMap::new();
        for (i, e) in proj.expr.iter().enumerate() {
            let out = proj.schema.field(i).name().clone();
            let Expr::Column(c) = strip_cast(e) else {
                continue;
            };
            let Ok(j) = agg.schema.index_of_column(c) else {
                continue;
            };
            if j < ngroups {
                if let Expr::Column(g) = strip_cast(&agg.group_expr[j])
                    && let Some((_, r)) = tree.col_ref(g)
                {
                    groups.insert(r, out);
                }
            } else if let Some(m) = measure_of(&agg.aggr_expr[j - ngroups], &tree) {
                measures.insert(m, out);
            }
        }
        if groups.is_empty() {
            return Err("it keeps no column of its tables (GROUP BY plain columns)".into());
        }
        if measures.is_empty() {
            return Err("it has no sum, count, min or max of a column of its tables".into());
        }
        Ok(Rollup {
            name: name.to_string(),
            tables,
            edges,
            groups,
            measures,
            rows: 0,
            types: HashMap::new(),
            stale: None,
        })
    }

    pub(super) fn rollup_col(&self, col: &str) -> Expr {
        Expr::Column(Column::new(
            Some(TableReference::bare(self.name.as_str())),
            col,
        ))
    }

    /// The plan answering `agg` from this rollup, or why it cannot.
    pub(super) fn answer(
        &self,
        agg: &Aggregate,
        source: &Arc<dyn TableSource>,
    ) -> std::result::Result<LogicalPlan, String> {
        if matches!(agg.group_expr.first(), Some(Expr::GroupingSet(_))) {
            return Err("the query uses GROUPING SETS, ROLLUP or CUBE".into());
        }
        let tree = JoinTree::of(&agg.input)?;
        // The rollup's tables among the query's relations, each exactly once.
        let mut mine: BTreeSet<usize> = BTreeSet::new();
        for t in &self.tables {
            let at: Vec<usize> = (0..tree.leaves.len())
                .filter(|&i| tree.leaves[i].table.as_deref() == Some(t.as_str()))
                .collect();
            match at.as_slice() {
                [i] => {
                    mine.insert(*i);
                }
                [] => {
                    let through_view = tree.leaves.iter().any(|l| {
                        l.table.is_none()
                            && l.plan
                                .exists(|n| {
                                    Ok(matches!(n, LogicalPlan::TableScan(ts)
                                        if ts.table_name.table() == t.as_str()))
                                })
                                .unwrap_or(false)
                    });
                    return Err(if through_view {
                        format!(
                            "the query reads '{t}' through a view (the role's row filter or masking)"
                        )
                    } else {
                        format!("the query does not read '{t}'")
                    });
                }
                _ => return Err(format!("the query reads '{t}' more than once")),
            }
        }
        if tree
            .leaves
            .iter()
            .any(|l| l.qualifier.as_ref().is_some_and(|q| q.table() == self.name))
        {
            return Err("the query reads the rollup itself".into());
        }
        // Join conditions among the rollup's tables must be the rollup's own; everything else
        // becomes a condition on the rollup's kept columns.
        let mut joined = BTreeSet::new();
        let mut rest = Vec::new();
        for c in &tree.conjuncts {
            match tree.edge(c) {
                Some((a, b)) if mine.contains(&a.0) && mine.contains(&b.0) => {
                    if !self.edges.contains(&(a.1.clone(), b.1.clone())) {
                        return Err(format!(
                            "the query joins {}.{} = {}.{}, which the rollup does not",
                            a.1.0, a.1.1, b.1.0, b.1.1
                        ));
                    }
                    joined.insert((a.1, b.1));
                }
                _ => rest.push(c.clone()),
            }
        }
        if joined != self.edges {
            return Err("the query joins the rollup's tables on fewer columns than it".into());
        }
        let rewrite = |e: &Expr| self.rewrite_kept(e, &tree, &mine);
        let predicates = rest.iter().map(rewrite).collect::<Result<Vec<_>, _>>()?;
        let group_expr = agg
            .group_expr
            .iter()
            .map(rewrite)
            .collect::<Result<Vec<_>, _>>()?;
        // Each aggregate becomes aggregates over the rollup and an expression over those.
        let mut new_aggs: Vec<Expr> = Vec::new();
        let mut finals: Vec<Expr> = Vec::new();
        for e in &agg.aggr_expr {
            let fin = self.aggregate(e, &tree, &mine, &mut new_aggs)?;
            finals.push(fin);
        }
        // The rollup, then the query's other relations, with every condition.
        let mut builder = LogicalPlanBuilder::scan(self.name.as_str(), source.clone(), None)
            .map_err(|e| e.to_string())?;
        for (i, leaf) in tree.leaves.iter().enumerate() {
            if !mine.contains(&i) {
                builder = builder
                    .cross_join(leaf.plan.clone())
                    .map_err(|e| e.to_string())?;
            }
        }
        if let Some(p) = conjunction(predicates) {
            builder = builder.filter(p).map_err(|e| e.to_string())?;
        }
        let input = builder.build().map_err(|e| e.to_string())?;
        let new_agg = Aggregate::try_new(Arc::new(input), group_expr, new_aggs)
            .map_err(|e| format!("the rewritten aggregate does not plan: {e}"))?;
        let ngroups = agg.group_expr.len();
        let mut exprs = Vec::with_capacity(agg.schema.fields().len());
        for i in 0..agg.schema.fields().len() {
            let (qualifier, field) = agg.schema.qualified_field(i);
            let value = if i < ngroups {
                let (q, f) = new_agg.schema.qualified_field(i);
                Expr::Column(Column::new(q.cloned(), f.name()))
            } else {
                finals[i - ngroups].clone()
            };
            let typed = match value.get_type(new_agg.schema.as_ref()) {
                Ok(t) if &t == field.data_type() => value,
                Ok(_) => cast(value, field.data_type().clone()),
                Err(e) => return Err(e.to_string()),
            };
            exprs.push(typed.alias_qualified(qualifier.cloned(), field.name()));
        }
        let projection = Projection::try_new(exprs, Arc::new(LogicalPlan::Aggregate(new_agg)))
            .map_err(|e| format!("the rewritten aggregate does not plan: {e}"))?;
        Ok(LogicalPlan::Projection(projection))
    }

    /// `e` with the columns of the rollup's tables replaced by the rollup's kept columns.
    pub(super) fn rewrite_kept(
        &self,
        e: &Expr,
        tree: &JoinTree,
        mine: &BTreeSet<usize>,
    ) -> std::result::Result<Expr, String> {
        if has_subquery(e) {
            return Err("the query uses a subquery inside the aggregate's input".into());
        }
        e.clone()
            .transform(|e| match &e {
                Expr::Column(c) => match tree.col_ref(c) {
                    Some((i, r)) if mine.contains(&i) => match self.groups.get(&r) {
                        Some(col) => {
                            // The kept column as the query's column was typed.
                            let kept = self.rollup_col(col);
                            let want = tree.leaves[i]
                                .schema
                                .field_from_column(c)
                                .map(|f| f.data_type().clone());
                            Ok(Transformed::yes(match (want, self.types.get(col)) {
                                (Ok(want), Some(have)) if &want != have => cast(kept, want),
                                _ => kept,
                            }))
                        }
                        None => Err(DataFusionError::Plan(format!(
                            "the query uses {}.{} (to group, join, filter or count distinct \
                             values), which the rollup does not keep",
                            r.0, r.1
                        ))),
                    },
                    _ => Ok(Transformed::no(e)),
                },
                _ => Ok(Transformed::no(e)),
            })
            .map(|t| t.data)
            .map_err(|e| {
                e.strip_backtrace()
                    .trim_start_matches("Error during planning: ")
                    .to_string()
            })
    }

    /// Aggregates over the rollup computing `e` (pushed to `out`), and the expression over
    /// their results that gives its value.
    pub(super) fn aggregate(
        &self,
        e: &Expr,
        tree: &JoinTree,
        mine: &BTreeSet<usize>,
        out: &mut Vec<Expr>,
    ) -> std::result::Result<Expr, String> {
        let cannot = || format!("the rollup cannot give {e}");
        let (f, name, args, distinct) = aggregate_parts(e).ok_or_else(cannot)?;
        let touches_mine = |a: &Expr| {
            a.column_refs()
                .iter()
                .any(|c| tree.leaf_of(c).is_some_and(|i| mine.contains(&i)))
        };
        let mut push = |agg: Expr| {
            let alias = format!("__kbcrm_rollup_{}", out.len());
            out.push(agg.alias(alias.as_str()));
            Expr::Column(Column::from_name(alias))
        };
        let call = |func, args: Vec<Expr>, distinct| {
            Expr::AggregateFunction(AggregateFunction::new_udf(
                func,
                args,
                distinct,
                None,
                vec![],
                None,
            ))
        };
        // Set functions of kept columns (or of the other relations' columns) are the same over
        // the rollup's rows: each group stands for at least one joined row.
        let set_function = distinct
            && matches!(name.as_str(), "count" | "sum" | "avg" | "min" | "max")
            || (!distinct && matches!(name.as_str(), "min" | "max"));
        if set_function {
            if let Some(m) = measure_of(e, tree).and_then(|m| self.measures.get(&m)) {
                return Ok(push(call(f.func.clone(), vec![self.rollup_col(m)], false)));
            }
            let new_args = args
                .iter()
                .map(|a| self.rewrite_kept(a, tree, mine))
                .collect::<Result<Vec<_>, _>>()?;
            return Ok(push(call(f.func.clone(), new_args, distinct)));
        }
        if distinct {
            return Err(cannot());
        }
        if !args.iter().all(touches_mine)
            && !matches!(
                (name.as_str(), args),
                ("count", [Expr::Literal(..)]) | ("count", [])
            )
        {
            return Err(format!(
                "{e} is over columns of tables the rollup does not aggregate"
            ));
        }
        let measure = |m: (Kind, Option<ColRef>)| {
            self.measures.get(&m).cloned().ok_or_else(|| {
                let what = match &m.1 {
                    Some((t, c)) => format!("{t}.{c}"),
                    None => "*".to_string(),
                };
                let kind = match m.0 {
                    Kind::Sum => "sum",
                    Kind::Count | Kind::CountStar => "count",
                    Kind::Min => "min",
                    Kind::Max => "max",
                };
                format!("the rollup has no {kind}({what}) for {e}")
            })
        };
        let summed = |col: String| call(sum_udaf(), vec![self.rollup_col(&col)], false);
        match name.as_str() {
            "sum" => {
                let (k, c) = measure_of(e, tree).ok_or_else(cannot)?;
                Ok(push(summed(measure((k, c))?)))
            }
            "count" => {
                let m = measure_of(e, tree).ok_or_else(cannot)?;
                let total = push(summed(measure(m)?));
                // A count over no rows is 0, a sum over no rows NULL.
                Ok(datafusion::functions::expr_fn::coalesce(vec![
                    total,
                    lit(0i64),
                ]))
            }
            "avg" => {
                let [arg] = args else { return Err(cannot()) };
                let Expr::Column(c) = strip_cast(arg) else {
                    return Err(cannot());
                };
                let (_, r) = tree.col_ref(c).ok_or_else(cannot)?;
                let s = measure((Kind::Sum, Some(r.clone())))?;
                let n = match measure((Kind::Count, Some(r.clone()))) {
                    Ok(n) => n,
                    Err(err) => {
                        let nullable = tree
                            .leaf_of(c)
                            .and_then(|i| tree.leaves[i].schema.field_from_column(c).ok())
                            .is_none_or(|f| f.is_nullable());
                        if nullable {
                            return Err(err);
                        }
                        measure((Kind::CountStar, None))?
                    }
                };
                let s = push(summed(s));
                let n = push(summed(n));
                Ok(cast(s, DataType::Float64) / cast(n, DataType::Float64))
            }
            _ => Err(cannot()),
        }
    }
}
