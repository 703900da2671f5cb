//! One ordered worker per key: items with the same key are handled one at a time, in the order
//! they were sent; items with different keys are handled in parallel.
//!
//! The dispatcher keys chat messages by thread (so a slow `start` in one thread never holds up
//! another), and the marker router keys agent markers by session. Each worker has a bounded
//! queue; [`OrderedWorkers::send`] waits while it is full (back-pressure, never a drop), and
//! [`OrderedWorkers::try_send`] hands the item back at once instead (the caller tells the
//! sender, so one flooded key never holds up the others). A worker
//! with nothing to do for the idle time stops taking items, finishes what it holds and exits; a
//! new worker for the same key starts only after the old one finished, so order holds across
//! that too. Every worker runs on the set's [`TaskTracker`], and [`OrderedWorkers::shutdown`]
//! waits for all of them.

use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::task::TaskTracker;

type Handler<T> = Arc<dyn Fn(T) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync>;

struct Worker<T> {
    tx: mpsc::Sender<T>,
    handle: JoinHandle<()>,
}

/// A set of ordered workers, one per key, all running `handler`.
pub struct OrderedWorkers<K, T> {
    workers: HashMap<K, Worker<T>>,
    tasks: TaskTracker,
    handler: Handler<T>,
    capacity: usize,
    idle: Duration,
}

impl<K, T> OrderedWorkers<K, T>
where
    K: Eq + Hash + Clone,
    T: Send + 'static,
{
    /// Workers whose queues hold `capacity` items (at least 1) and that exit after `idle`
    /// without an item. `handler` handles one item; it should not panic (a panic ends that
    /// worker's task, and the next item for the key starts a new worker).
    pub fn new<F, Fut>(capacity: usize, idle: Duration, handler: F) -> Self
    where
        F: Fn(T) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        Self {
            workers: HashMap::new(),
            tasks: TaskTracker::new(),
            handler: Arc::new(move |item| Box::pin(handler(item))),
            capacity: capacity.max(1),
            idle,
        }
    }

    /// Hands `item` to `key`'s worker, starting one if needed, and waits while its queue is
    /// full.
    pub async fn send(&mut self, key: K, item: T) {
        let mut item = Some(item);
        while let Some(next) = item.take() {
            let worker = match self.workers.remove(&key) {
                Some(worker) => worker,
                None => self.spawn(None),
            };
            match worker.tx.send(next).await {
                Ok(()) => {
                    self.workers.insert(key.clone(), worker);
                }
                // The worker went idle and closed: start its successor after it.
                Err(mpsc::error::SendError(back)) => {
                    let successor = self.spawn(Some(worker.handle));
                    self.workers.insert(key.clone(), successor);
                    item = Some(back);
                }
            }
        }
        self.workers.retain(|_, w| !w.handle.is_finished());
    }

    /// Hands `item` to `key`'s worker without waiting: `Err(item)` when that worker's queue
    /// is full (the caller decides what to tell), so one flooded key never holds up the others.
    ///
    /// # Errors
    /// The item back, when `key`'s queue is full.
    pub fn try_send(&mut self, key: K, item: T) -> Result<(), T> {
        let mut item = item;
        loop {
            let worker = match self.workers.remove(&key) {
                Some(worker) => worker,
                None => self.spawn(None),
            };
            match worker.tx.try_send(item) {
                Ok(()) => {
                    self.workers.insert(key, worker);
                    break;
                }
                Err(mpsc::error::TrySendError::Full(back)) => {
                    self.workers.insert(key, worker);
                    return Err(back);
                }
                // The worker went idle and closed: start its successor after it.
                Err(mpsc::error::TrySendError::Closed(back)) => {
                    let successor = self.spawn(Some(worker.handle));
                    self.workers.insert(key.clone(), successor);
                    item = back;
                }
            }
        }
        self.workers.retain(|_, w| !w.handle.is_finished());
        Ok(())
    }

    /// How many workers are alive.
    pub fn len(&self) -> usize {
        self.workers.len()
    }

    /// Whether no worker is alive.
    pub fn is_empty(&self) -> bool {
        self.workers.is_empty()
    }

    /// Stops taking items and waits until every worker has handled what it holds.
    pub async fn shutdown(mut self) {
        self.workers.clear(); // drops every sender: each worker drains its queue and exits
        self.tasks.close();
        self.tasks.wait().await;
    }

    fn spawn(&self, predecessor: Option<JoinHandle<()>>) -> Worker<T> {
        let (tx, mut rx) = mpsc::channel::<T>(self.capacity);
        let handler = Arc::clone(&self.handler);
        let idle = self.idle;
        let handle = self.tasks.spawn(async move {
            if let Some(previous) = predecessor {
                let _ = previous.await;
            }
            loop {
                match tokio::time::timeout(idle, rx.recv()).await {
                    Ok(Some(item)) => handler(item).await,
                    Ok(None) => return,
                    Err(_) => {
                        // Idle: refuse new items, then finish what was already queued.
                        rx.close();
                        while let Some(item) = rx.recv().await {
                            handler(item).await;
                        }
                        return;
                    }
                }
            }
        });
        Worker { tx, handle }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[tokio::test]
    async fn one_key_in_order_keys_in_parallel_and_idle_workers_hand_over_in_order() {
        let seen: Arc<Mutex<Vec<(u8, u32)>>> = Arc::default();
        let log = Arc::clone(&seen);
        let mut workers = OrderedWorkers::new(2, Duration::from_millis(20), move |(k, n)| {
            let log = Arc::clone(&log);
            async move {
                // Key 1 is slow: key 2 must not wait for it.
                if k == 1 {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                log.lock().expect("lock").push((k, n));
            }
        });
        for n in 0..10 {
            workers.send(1u8, (1u8, n)).await;
            workers.send(2u8, (2u8, n)).await;
            if n == 5 {
                // Let both workers go idle and exit; the next items start successors.
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        workers.shutdown().await;
        let seen = seen.lock().expect("lock").clone();
        for key in [1u8, 2] {
            let order: Vec<u32> = seen
                .iter()
                .filter(|(k, _)| *k == key)
                .map(|(_, n)| *n)
                .collect();
            assert_eq!(order, (0..10).collect::<Vec<_>>(), "key {key} in order");
        }
        let first_slow = seen.iter().position(|(k, _)| *k == 1).expect("key 1 ran");
        let first_fast = seen.iter().position(|(k, _)| *k == 2).expect("key 2 ran");
        assert!(
            first_fast < first_slow,
            "the fast key did not wait: {seen:?}"
        );
    }
}
