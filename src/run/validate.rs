//! Planning every model against the declared schemas, without data: column typos, type errors
//! and bad keys are found before anything runs.

use std::sync::Arc;

use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use datafusion::datasource::MemTable;
use datafusion::error::DataFusionError;
use datafusion::prelude::SessionContext;

mod files;
pub use files::check_source_files;

use crate::config::types::UTC;
use crate::error::{Error, Position, Problem, Result};
use crate::identity::map_schema;
use crate::plan::{Model, ModelWrite, Pipeline, Project, Step};
use crate::run::{QUARANTINE_TABLE, quarantine_schema};
use crate::warehouse::{delta_compatible, state};

/// Plan every model, identity resolution and data test of the project on empty tables of the
/// right schemas.
pub async fn check_models(project: &Project) -> Result<()> {
    let config = datafusion::prelude::SessionConfig::new()
        .set_bool("datafusion.sql_parser.collect_spans", true);
    let ctx = SessionContext::new_with_config(config);
    crate::engine::udf::register(&ctx, &crate::engine::today_params());
    register_empty(&ctx, QUARANTINE_TABLE, quarantine_schema())?;
    register_empty(&ctx, state::STATE_TABLE, state::state_schema())?;
    register_empty(&ctx, state::LOADED_FILES_TABLE, state::files_schema())?;
    register_empty(
        &ctx,
        state::TEST_RESULTS_TABLE,
        state::test_results_schema(),
    )?;
    let mut problems = Vec::new();
    for p in &project.pipelines {
        for s in &p.sources {
            register_empty(&ctx, &s.table, crate::sources::table_schema(s))?;
        }
    }
    // Pipelines and their steps are in dependency order.
    for p in &project.pipelines {
        let mut params = crate::engine::today_params();
        params.vars = p.vars.clone();
        crate::engine::udf::register(&ctx, &params);
        for step in &p.steps {
            match *step {
                Step::Model(i) => check_model(&ctx, p, &p.models[i], &mut problems).await?,
                Step::Identity(i) => {
                    let id = &p.identities[i];
                    register_empty(&ctx, &id.map_table, map_schema(&id.id_column))?;
                    match plan_sql(&ctx, &id.golden_sql()).await {
                        Ok(schema) => register_empty(&ctx, &id.golden_table, schema)?,
                        Err(e) => {
                            problems.push(Problem::new(
                                &p.file,
                                format!(
                                    "identity '{}': the golden record cannot be built: {}",
                                    id.entity,
                                    first_line(&e)
                                ),
                            ));
                            register_empty(&ctx, &id.golden_table, Arc::new(Schema::empty()))?;
                        }
                    }
                }
            }
        }
    }
    for p in &project.pipelines {
        for t in &p.tests {
            if let Err(e) = ctx
                .sql(&t.query)
                .await
                .and_then(|df| df.into_optimized_plan())
            {
                problems.push(Problem::new(
                    &p.file,
                    format!("data test {} is not valid: {}", t.name, first_line(&e)),
                ));
            }
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(Error::Invalid(problems))
    }
}

async fn check_model(
    ctx: &SessionContext,
    p: &Pipeline,
    m: &Model,
    problems: &mut Vec<Problem>,
) -> Result<()> {
    let schema = match plan_sql(ctx, &m.sql).await {
        Ok(schema) => schema,
        Err(e) => {
            problems.push(model_problem(m, &e));
            // Stand-in so later models report their own problems, not this one's.
            return register_empty(ctx, &m.name, Arc::new(Schema::empty()));
        }
    };
    if m.rollup
        && let Err(why) = crate::engine::rollup::check(ctx, m).await
    {
        problems.push(Problem::new(
            &m.file,
            format!(
                "model '{}': {why} ({})",
                m.name,
                crate::engine::rollup::SHAPE
            ),
        ));
    }
    if let Some(expr) = &m.files_by {
        let valid = datafusion::common::DFSchema::try_from(schema.as_ref().clone()).and_then(|s| {
            ctx.parse_sql_expr(expr, &s).and_then(|e| {
                use datafusion::logical_expr::ExprSchemable;
                e.get_type(&s)
            })
        });
        if let Err(e) = valid {
            problems.push(Problem::new(
                &m.file,
                format!(
                    "model '{}': files_by '{expr}' is not an expression over the columns of its \
                     result: {e}",
                    m.name
                ),
            ));
        }
    }
    let mut missing = |what: &str, col: &str| {
        if schema.field_with_name(col).is_err() {
            problems.push(Problem::new(
                &p.file,
                format!(
                    "model '{}': {what} '{col}' is not a column of its result",
                    m.name
                ),
            ));
        }
    };
    for k in m.write.keys() {
        missing("key", k);
    }
    for c in &m.cluster_by {
        missing("cluster_by column", c);
    }
    let mut table_schema = schema.clone();
    if let ModelWrite::Scd2(opts) = &m.write {
        for c in &opts.tracked {
            missing("tracked column", c);
        }
        if let Some(v) = &opts.valid_from {
            missing("valid_from column", v);
        }
        let ts = DataType::Timestamp(TimeUnit::Microsecond, Some(Arc::from(UTC)));
        let mut fields: Vec<Field> = Vec::new();
        if let Some(sk) = &opts.surrogate_key {
            fields.push(Field::new(sk, DataType::Int64, false));
        }
        fields.extend(schema.fields().iter().map(|f| f.as_ref().clone()));
        fields.push(Field::new("valid_from", ts.clone(), false));
        fields.push(Field::new("valid_to", ts, false));
        fields.push(Field::new("is_current", DataType::Boolean, false));
        table_schema = Arc::new(Schema::new(fields));
    }
    register_empty(ctx, &m.name, table_schema)
}

fn register_empty(ctx: &SessionContext, name: &str, schema: SchemaRef) -> Result<()> {
    ctx.deregister_table(name)?;
    ctx.register_table(name, Arc::new(MemTable::try_new(schema, vec![vec![]])?))?;
    Ok(())
}

async fn plan_sql(ctx: &SessionContext, sql: &str) -> Result<SchemaRef, DataFusionError> {
    let plan = ctx.sql(sql).await?.into_optimized_plan()?;
    Ok(delta_compatible(plan.schema().as_arrow()))
}

/// A planning error as a problem in the model file, at the position DataFusion reports.
pub fn model_problem(m: &Model, e: &DataFusionError) -> Problem {
    let mut problem = Problem::new(&m.file, format!("model '{}': {}", m.name, first_line(e)));
    if let Some(d) = e.diagnostic() {
        if let Some(span) = d.span
            && span.start.line > 0
        {
            let len = if span.end.line == span.start.line {
                (span.end.column.saturating_sub(span.start.column)) as usize
            } else {
                1
            };
            problem = problem.at(
                Position::of_line_col(
                    &m.sql,
                    span.start.line as usize,
                    span.start.column as usize,
                    len,
                ),
                &m.sql,
            );
        }
        if let Some(h) = d.helps.first() {
            problem = problem.help(h.message.clone());
        }
    } else if let Some((line, col)) = crate::plan::dag::find_line_col(&e.to_string()) {
        problem = problem.at(Position::of_line_col(&m.sql, line, col, 1), &m.sql);
    }
    problem
}

fn first_line(e: &DataFusionError) -> String {
    let s = e.strip_backtrace();
    let s = s
        .trim_start_matches("Error during planning: ")
        .trim_start_matches("Schema error: ");
    s.lines().next().unwrap_or_default().to_string()
}
