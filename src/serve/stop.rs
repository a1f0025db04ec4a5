//! Stopping a statement's work, not only its answer. Every node of a statement's physical plan
//! is wrapped in [`Stoppable`], whose stream checks the statement's token before each batch it
//! passes on and takes a unit of the task's scheduling budget for it. When the statement is
//! cancelled or times out, the next batch any operator asks its input for ends in an error, so
//! even an operator that loops without ever yielding (a cross join feeding an aggregate) stops
//! within a batch; and a statement that keeps the CPU busy gives the thread up regularly.

use std::fmt;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use datafusion::arrow::datatypes::SchemaRef;
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::common::tree_node::TreeNodeRecursion;
use datafusion::error::{DataFusionError, Result};
use datafusion::execution::TaskContext;
use datafusion::physical_expr::PhysicalExpr;
use datafusion::physical_plan::execution_plan::{ChildrenPropertiesMode, ReplaceChildrenOptions};
use datafusion::physical_plan::{
    DisplayAs, DisplayFormatType, ExecutionPlan, PlanProperties, RecordBatchStream,
    SendableRecordBatchStream,
};
use futures::{Stream, StreamExt};
use tokio_util::sync::CancellationToken;

/// The message of the error a stopped plan ends with.
pub const STOPPED: &str = "the statement was stopped";

/// `plan` with every node's output checked against `stop`. EXPLAIN ANALYZE plans are wrapped
/// at the top only, so that the plan they print is the engine's.
pub fn stoppable(
    plan: Arc<dyn ExecutionPlan>,
    stop: &CancellationToken,
) -> Result<Arc<dyn ExecutionPlan>> {
    if plan.name() == "AnalyzeExec" {
        return Ok(Arc::new(Stoppable::new(plan, stop.clone())));
    }
    wrap(plan, stop)
}

fn wrap(plan: Arc<dyn ExecutionPlan>, stop: &CancellationToken) -> Result<Arc<dyn ExecutionPlan>> {
    let children = plan
        .children()
        .into_iter()
        .map(|c| wrap(c.clone(), stop))
        .collect::<Result<Vec<_>>>()?;
    let plan = if children.is_empty() {
        plan
    } else {
        // The wrappers have their inputs' properties, so the parents' stand.
        plan.replace_children(
            children,
            ReplaceChildrenOptions::new(ChildrenPropertiesMode::Keep),
        )?
    };
    Ok(Arc::new(Stoppable::new(plan, stop.clone())))
}

/// Passes its input through until the statement stops.
#[derive(Debug)]
pub struct Stoppable {
    input: Arc<dyn ExecutionPlan>,
    stop: CancellationToken,
}

impl Stoppable {
    fn new(input: Arc<dyn ExecutionPlan>, stop: CancellationToken) -> Self {
        Stoppable { input, stop }
    }
}

impl DisplayAs for Stoppable {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Stoppable")
    }
}

impl ExecutionPlan for Stoppable {
    fn name(&self) -> &str {
        "Stoppable"
    }

    fn schema(&self) -> SchemaRef {
        self.input.schema()
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        self.input.properties()
    }

    fn maintains_input_order(&self) -> Vec<bool> {
        vec![true]
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        vec![&self.input]
    }

    fn apply_expressions(
        &self,
        _f: &mut dyn FnMut(&Arc<dyn PhysicalExpr>) -> Result<TreeNodeRecursion>,
    ) -> Result<TreeNodeRecursion> {
        Ok(TreeNodeRecursion::Continue)
    }

    fn replace_children(
        self: Arc<Self>,
        mut children: Vec<Arc<dyn ExecutionPlan>>,
        _options: ReplaceChildrenOptions,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        if children.len() != 1 {
            return Err(DataFusionError::Internal(
                "Stoppable has exactly one input".into(),
            ));
        }
        Ok(Arc::new(Stoppable::new(
            children.swap_remove(0),
            self.stop.clone(),
        )))
    }

    fn with_new_children(
        self: Arc<Self>,
        children: Vec<Arc<dyn ExecutionPlan>>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        self.replace_children(
            children,
            ReplaceChildrenOptions::new(ChildrenPropertiesMode::Recompute),
        )
    }

    fn execute(
        &self,
        partition: usize,
        context: Arc<TaskContext>,
    ) -> Result<SendableRecordBatchStream> {
        if self.stop.is_cancelled() {
            return Err(DataFusionError::Execution(STOPPED.into()));
        }
        let input = self.input.execute(partition, context)?;
        Ok(Box::pin(StoppableStream {
            input,
            stop: self.stop.clone(),
        }))
    }
}

struct StoppableStream {
    input: SendableRecordBatchStream,
    stop: CancellationToken,
}

impl Stream for StoppableStream {
    type Item = Result<RecordBatch>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.stop.is_cancelled() {
            return Poll::Ready(Some(Err(DataFusionError::Execution(STOPPED.into()))));
        }
        let coop = std::task::ready!(tokio::task::coop::poll_proceed(cx));
        let next = self.input.poll_next_unpin(cx);
        if next.is_ready() {
            coop.made_progress();
        }
        next
    }
}

impl RecordBatchStream for StoppableStream {
    fn schema(&self) -> SchemaRef {
        self.input.schema()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::prelude::SessionContext;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stopped_plan_ends_within_a_batch_and_answers_as_before() {
        let ctx = SessionContext::new();
        let sql = "select count(*) from generate_series(1, 3000) a, generate_series(1, 3000) b \
                   where a.value % 7 = b.value % 5";
        let df = ctx.sql(sql).await.unwrap();
        let expected = df.clone().collect().await.unwrap();
        let stop = CancellationToken::new();
        let plan = stoppable(df.clone().create_physical_plan().await.unwrap(), &stop).unwrap();
        let got = datafusion::physical_plan::collect(plan, ctx.task_ctx())
            .await
            .unwrap();
        assert_eq!(
            datafusion::arrow::util::pretty::pretty_format_batches(&got)
                .unwrap()
                .to_string(),
            datafusion::arrow::util::pretty::pretty_format_batches(&expected)
                .unwrap()
                .to_string()
        );

        // A cross join of 10^16 rows: stopped after 200 ms, it ends at once.
        let df = ctx
            .sql(
                "select count(*) from generate_series(1, 100000000) a, \
                 generate_series(1, 100000000) b",
            )
            .await
            .unwrap();
        let plan = stoppable(df.create_physical_plan().await.unwrap(), &stop).unwrap();
        let stopper = stop.clone();
        tokio::spawn(async move {
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            stopper.cancel();
        });
        let started = std::time::Instant::now();
        let e = datafusion::physical_plan::collect(plan, ctx.task_ctx())
            .await
            .unwrap_err();
        assert!(e.to_string().contains(STOPPED), "{e}");
        assert!(
            started.elapsed() < std::time::Duration::from_secs(5),
            "took {:?}",
            started.elapsed()
        );
    }
}
