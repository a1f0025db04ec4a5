//! Planning every model against the declared schemas, without data: column typos, type errors
//! and bad merge keys are found before anything runs.

use std::sync::Arc;

use arrow::datatypes::SchemaRef;
use datafusion::datasource::MemTable;
use datafusion::error::DataFusionError;
use datafusion::prelude::SessionContext;

use crate::error::{Error, Position, Problem, Result};
use crate::plan::{Model, Project};
use crate::run::QUARANTINE_TABLE;
use crate::sources::convert::declared_schema;
use crate::warehouse::delta_compatible;

/// Plan every model and data test of the project on empty tables of the right schemas.
pub async fn check_models(project: &Project) -> Result<()> {
    let config = datafusion::prelude::SessionConfig::new()
        .set_bool("datafusion.sql_parser.collect_spans", true);
    let ctx = SessionContext::new_with_config(config);
    register_empty(&ctx, QUARANTINE_TABLE, crate::run::quarantine_schema())?;
    let mut problems = Vec::new();
    for p in &project.pipelines {
        for s in &p.sources {
            register_empty(
                &ctx,
                &s.table,
                delta_compatible(&declared_schema(&s.columns)),
            )?;
        }
    }
    // Pipelines and their models are in dependency order.
    for p in &project.pipelines {
        for m in &p.models {
            match plan_model(&ctx, m).await {
                Ok(schema) => {
                    if let Some(missing) =
                        m.keys.iter().find(|k| schema.field_with_name(k).is_err())
                    {
                        problems.push(Problem::new(
                            &p.file,
                            format!(
                                "model '{}': merge key '{missing}' is not a column of its result",
                                m.name
                            ),
                        ));
                    }
                    register_empty(&ctx, &m.name, schema)?;
                }
                Err(problem) => {
                    problems.push(problem);
                    // Stand-in so later models report their own problems, not this one's.
                    register_empty(&ctx, &m.name, Arc::new(arrow::datatypes::Schema::empty()))?;
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

fn register_empty(ctx: &SessionContext, name: &str, schema: SchemaRef) -> Result<()> {
    ctx.deregister_table(name)?;
    ctx.register_table(name, Arc::new(MemTable::try_new(schema, vec![vec![]])?))?;
    Ok(())
}

async fn plan_model(ctx: &SessionContext, m: &Model) -> Result<SchemaRef, Problem> {
    let planned = match ctx.sql(&m.sql).await {
        Ok(df) => df.into_optimized_plan(),
        Err(e) => Err(e),
    };
    match planned {
        Ok(plan) => Ok(delta_compatible(plan.schema().as_arrow())),
        Err(e) => Err(model_problem(m, &e)),
    }
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
