//! Where statements are parsed, planned and run: a runtime of their own, apart from the one
//! that accepts connections, logs clients in and moves bytes. A heavy query keeps the query
//! threads busy; the operating system still schedules the protocol threads, so logins, cancel
//! requests and timeouts are answered on time. Each job stops, its plan's streams and tasks
//! dropped, the moment its handle is dropped.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use pgwire::error::{PgWireError, PgWireResult};
use tokio_util::task::AbortOnDropHandle;

use super::auth::pg_error;

/// Stack of each query thread. The walks, clones and drops of a syntax tree recurse once per
/// level; [`super::complexity::MAX_DEPTH`] bounds the levels, this leaves room for them (the
/// pages are only reserved until used).
pub const STACK_SIZE: usize = 256 << 20;

/// Stack of the threads that speak the protocol: they move statements and plans between the
/// connection and the pool, and drop them (which recurses too).
pub const PROTOCOL_STACK_SIZE: usize = 64 << 20;

/// The query runtime. Its threads (one per core) bound the CPU all statements use together;
/// each connection runs one statement at a time, each statement in a memory pool of its own
/// ([`super::catalog::RoleSession::for_connection`]). A statement's work yields between
/// batches ([`super::stop`]), so a short query is answered beside long ones, and a statement
/// waiting for a slow client to read its rows takes no thread.
pub struct QueryPool {
    runtime: Option<tokio::runtime::Runtime>,
    handle: tokio::runtime::Handle,
}

impl QueryPool {
    /// A pool of `threads` threads.
    pub fn new(threads: usize) -> std::io::Result<QueryPool> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads.max(1))
            .max_blocking_threads(64)
            .thread_name("kbcrm-query")
            .thread_stack_size(STACK_SIZE)
            .enable_all()
            .build()?;
        Ok(QueryPool {
            handle: runtime.handle().clone(),
            runtime: Some(runtime),
        })
    }

    /// Run `work` on the pool. Dropping the returned job stops it.
    pub fn spawn<T, F>(&self, work: F) -> Job<T>
    where
        T: Send + 'static,
        F: Future<Output = T> + Send + 'static,
    {
        Job(AbortOnDropHandle::new(self.handle.spawn(work)))
    }
}

impl Drop for QueryPool {
    fn drop(&mut self) {
        // Dropping a runtime waits for its threads, which an async context must not do.
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

/// Work running on the pool; aborted when dropped.
pub struct Job<T>(AbortOnDropHandle<T>);

impl<T> Future for Job<T> {
    type Output = PgWireResult<T>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.0).poll(cx).map(|r| {
            r.map_err(|e| {
                if e.is_panic() {
                    tracing::error!("a statement's work panicked: {e}");
                    pg_error(
                        "ERROR",
                        "XX000",
                        "internal error while running the statement",
                    )
                } else {
                    PgWireError::QueryCanceled
                }
            })
        })
    }
}
