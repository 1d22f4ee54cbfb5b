//! Work a plugin starts in the host and collects later (a gRPC call, a
//! Kubernetes watch): each runs as a task on the plugin's own runtime and hands
//! its results over one at a time. Every hand-over is a `ready(handle)` event, so
//! a plugin waiting for a slow server is idle, not busy; it takes the result with
//! the capability's `next`. One incarnation's calls live here and are all
//! cancelled when it ends, so a restarted plugin holds nothing.
//!
//! Bytes handed over and not yet taken count against the plugin's memory cap.

use std::any::Any;
use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use tokio::sync::mpsc;

use super::memory_cap::HostMemory;

/// A result a call hands to the plugin.
pub trait HandOver: Send + 'static {
    /// Host memory it takes while it waits to be taken.
    fn bytes(&self) -> usize;
}

pub struct HostCalls {
    next_handle: u32,
    ready_tx: mpsc::UnboundedSender<u32>,
    ready_rx: mpsc::UnboundedReceiver<u32>,
    memory: Arc<HostMemory>,
    open: HashMap<u32, OpenCall>,
}

struct OpenCall {
    kind: &'static str,
    events: Box<dyn Queue>,
    task: tokio::task::JoinHandle<()>,
}

/// A call's queue of results, whatever their type.
trait Queue: Send {
    fn as_any(&mut self) -> &mut dyn Any;
    /// Takes everything left; returns the bytes it held.
    fn drain(&mut self) -> usize;
}

impl<E: HandOver> Queue for mpsc::Receiver<E> {
    fn as_any(&mut self) -> &mut dyn Any {
        self
    }

    fn drain(&mut self) -> usize {
        let mut bytes = 0;
        while let Ok(event) = self.try_recv() {
            bytes += event.bytes();
        }
        bytes
    }
}

/// Where a call's task puts its results.
pub struct Outbox<E> {
    handle: u32,
    events: mpsc::Sender<E>,
    ready: mpsc::UnboundedSender<u32>,
    memory: Arc<HostMemory>,
}

impl<E: HandOver> Outbox<E> {
    /// Hands one result over, waiting until the plugin took the previous one.
    /// False once the plugin closed the call.
    pub async fn send(&self, event: E) -> bool {
        let Ok(permit) = self.events.reserve().await else {
            return false;
        };
        self.memory
            .in_transit
            .fetch_add(event.bytes(), Ordering::Relaxed);
        permit.send(event);
        self.ready.send(self.handle).is_ok()
    }
}

impl HostCalls {
    pub fn new(memory: Arc<HostMemory>) -> HostCalls {
        let (ready_tx, ready_rx) = mpsc::unbounded_channel();
        HostCalls {
            next_handle: 1,
            ready_tx,
            ready_rx,
            memory,
            open: HashMap::new(),
        }
    }

    /// A handle no call of this incarnation uses (also for other handles the
    /// plugin holds, such as gRPC channels).
    pub fn handle(&mut self) -> u32 {
        let handle = self.next_handle;
        self.next_handle = self.next_handle.wrapping_add(1).max(1);
        handle
    }

    /// Starts `work` as a call of `kind`, at most `max` of that kind open at once.
    pub fn start<E, F, Fut>(
        &mut self,
        kind: &'static str,
        max: usize,
        work: F,
    ) -> Result<u32, String>
    where
        E: HandOver,
        F: FnOnce(Outbox<E>) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        if self.open.values().filter(|c| c.kind == kind).count() >= max {
            return Err(format!(
                "too many open {kind} calls (at most {max}); close finished ones"
            ));
        }
        let handle = self.handle();
        // One result at a time: the call goes on only once the plugin took the
        // last one, so a server's flow control holds the rest.
        let (events_tx, events) = mpsc::channel::<E>(1);
        let outbox = Outbox {
            handle,
            events: events_tx,
            ready: self.ready_tx.clone(),
            memory: self.memory.clone(),
        };
        let task = tokio::spawn(work(outbox));
        self.open.insert(
            handle,
            OpenCall {
                kind,
                events: Box::new(events),
                task,
            },
        );
        Ok(handle)
    }

    /// The next result of call `handle`, if it has one of type `E`.
    pub fn next<E: HandOver>(&mut self, handle: u32) -> Option<E> {
        let call = self.open.get_mut(&handle)?;
        let events = call.events.as_any().downcast_mut::<mpsc::Receiver<E>>()?;
        let event = events.try_recv().ok()?;
        self.memory
            .in_transit
            .fetch_sub(event.bytes(), Ordering::Relaxed);
        Some(event)
    }

    /// Cancels a call and gives back what it held.
    pub fn close(&mut self, handle: u32) {
        if let Some(mut call) = self.open.remove(&handle) {
            // Stop it first (on the plugin's single-threaded runtime it is not
            // running now), then give back what it still held.
            call.task.abort();
            let bytes = call.events.drain();
            self.memory.in_transit.fetch_sub(bytes, Ordering::Relaxed);
        }
    }

    /// The next call with something to take.
    pub async fn ready(&mut self) -> u32 {
        match self.ready_rx.recv().await {
            Some(handle) => handle,
            // Unreachable: `self` holds a sender.
            None => std::future::pending().await,
        }
    }
}

impl Drop for HostCalls {
    fn drop(&mut self) {
        let handles: Vec<u32> = self.open.keys().copied().collect();
        for handle in handles {
            self.close(handle);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    struct Bytes(Vec<u8>);

    impl HandOver for Bytes {
        fn bytes(&self) -> usize {
            self.0.len()
        }
    }

    #[tokio::test]
    async fn results_arrive_one_at_a_time_and_are_counted_until_taken() {
        let memory = Arc::new(HostMemory::default());
        let mut calls = HostCalls::new(memory.clone());
        let call = calls
            .start("test", 2, |out: Outbox<Bytes>| async move {
                for n in 0..3 {
                    if !out.send(Bytes(vec![n; 100])).await {
                        return;
                    }
                }
            })
            .unwrap();
        for n in 0..3u8 {
            let ready = tokio::time::timeout(Duration::from_secs(5), calls.ready())
                .await
                .unwrap();
            assert_eq!(ready, call);
            assert_eq!(memory.total(), 100, "one result in hand");
            let taken = calls.next::<Bytes>(call).unwrap();
            assert_eq!(taken.0, vec![n; 100]);
            assert_eq!(calls.next::<Bytes>(call).map(|b| b.0), None);
        }
        assert_eq!(memory.total(), 0);
        assert!(
            calls.next::<String>(call).is_none(),
            "another type is not there"
        );
    }

    impl HandOver for String {
        fn bytes(&self) -> usize {
            self.len()
        }
    }

    #[tokio::test]
    async fn calls_are_bounded_per_kind_and_closing_gives_memory_back() {
        let memory = Arc::new(HostMemory::default());
        let mut calls = HostCalls::new(memory.clone());
        let mut open = Vec::new();
        for _ in 0..2 {
            open.push(
                calls
                    .start("a", 2, |out: Outbox<String>| async move {
                        out.send("x".repeat(10)).await;
                        std::future::pending::<()>().await
                    })
                    .unwrap(),
            );
        }
        let refused = calls
            .start("a", 2, |_: Outbox<String>| async {})
            .unwrap_err();
        assert_eq!(
            refused,
            "too many open a calls (at most 2); close finished ones"
        );
        calls.start("b", 2, |_: Outbox<String>| async {}).unwrap();
        for _ in 0..2 {
            tokio::time::timeout(Duration::from_secs(5), calls.ready())
                .await
                .unwrap();
        }
        assert_eq!(memory.total(), 20);
        calls.close(open[0]);
        assert_eq!(memory.total(), 10);
        drop(calls);
        assert_eq!(memory.total(), 0);
    }
}
