//! Each plugin runs on a thread of its own, with its own single-threaded tokio
//! runtime and a blocking pool of a few threads.
//!
//! Why: WASI filesystem calls run on the runtime's blocking pool. A call that
//! hangs (a dead network mount) keeps its thread busy after the plugin is
//! restarted; on the daemon's shared pool enough of them would stall all blocking
//! work, and dropping a runtime waits for its blocking threads, so SIGTERM would
//! hang. Here a plugin can pin at most its own pool's threads, its wasm never
//! runs on the threads that serve the local API, and its runtime is abandoned,
//! not awaited, when it stops.

use std::future::Future;
use std::time::Duration;

use tokio::sync::oneshot;

use crate::limits;

/// A running plugin thread.
pub struct PluginThread {
    name: String,
    done: oneshot::Receiver<()>,
}

/// Starts `work` (built on the new thread, so it need not be `Send`) on a thread
/// named after the plugin.
pub fn spawn<F, Fut>(name: &str, work: F) -> std::io::Result<PluginThread>
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = ()>,
{
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .max_blocking_threads(limits::PLUGIN_BLOCKING_THREADS)
        .thread_name(format!("plugin-{name}-io"))
        .build()?;
    let (finished, done) = oneshot::channel();
    std::thread::Builder::new()
        .name(format!("plugin-{name}"))
        .spawn(move || {
            runtime.block_on(work());
            // Blocking calls still stuck are abandoned, not awaited.
            runtime.shutdown_background();
            let _ = finished.send(());
        })?;
    Ok(PluginThread {
        name: name.to_string(),
        done,
    })
}

impl PluginThread {
    /// Waits up to `deadline` for the plugin's work to end; returns whether it did.
    pub async fn join(self, deadline: Duration) -> bool {
        match tokio::time::timeout(deadline, self.done).await {
            Ok(_) => true,
            Err(_) => {
                tracing::warn!(plugin = %self.name, "plugin did not stop within {deadline:?}; abandoning it");
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    #[tokio::test]
    async fn a_stuck_blocking_call_does_not_hold_up_the_end() {
        let (started, mut started_rx) = tokio::sync::mpsc::unbounded_channel();
        let thread = spawn("stuck", move || async move {
            // A read from a dead mount, as far as the runtime can tell.
            tokio::task::spawn_blocking(move || {
                let _ = started.send(());
                std::thread::park();
            });
            // The plugin is done even though its blocking call is not.
        })
        .unwrap();
        started_rx.recv().await.unwrap();
        assert!(thread.join(Duration::from_secs(5)).await);
    }

    #[tokio::test]
    async fn blocking_calls_share_a_small_pool() {
        let running = Arc::new(AtomicUsize::new(0));
        let (started, mut started_rx) = tokio::sync::mpsc::unbounded_channel();
        let counter = running.clone();
        let thread = spawn("pool", move || async move {
            for _ in 0..limits::PLUGIN_BLOCKING_THREADS + 3 {
                let (counter, started) = (counter.clone(), started.clone());
                tokio::task::spawn_blocking(move || {
                    counter.fetch_add(1, Ordering::SeqCst);
                    let _ = started.send(());
                    std::thread::park();
                });
            }
            std::future::pending::<()>().await
        })
        .unwrap();
        for _ in 0..limits::PLUGIN_BLOCKING_THREADS {
            tokio::time::timeout(Duration::from_secs(5), started_rx.recv())
                .await
                .expect("the pool's threads start");
        }
        // The rest queue behind the stuck ones instead of taking more threads.
        let more = tokio::time::timeout(Duration::from_millis(300), started_rx.recv()).await;
        assert!(more.is_err(), "a blocking call ran beyond the pool");
        assert_eq!(
            running.load(Ordering::SeqCst),
            limits::PLUGIN_BLOCKING_THREADS
        );
        drop(thread);
    }
}
