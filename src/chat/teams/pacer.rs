//! Pacing: at most one Connector operation per conversation every interval
//! ([`PACE_INTERVAL`](super::PACE_INTERVAL), 2 s), so streamed output stays under Teams'
//! per-conversation throttling instead of running into 429s.
//!
//! Each conversation has a lane. Operations in a lane run one at a time, in arrival order
//! (a fair lock); each waits until `interval` after the previous one started. The first
//! operation of a lane that has been quiet for an interval runs at once. Updates of a message
//! keep only the newest state: when an update's turn comes and a newer update of the same
//! message is already queued, the older one is skipped (the newer one carries everything).
//! Typing indicators never wait: they run only when the lane is free and due.
//!
//! Lanes of conversations that have been quiet for an interval are forgotten, so memory stays
//! bounded by the conversations active in the last few seconds.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

/// Paces operations per conversation; share it. See the module documentation.
#[derive(Debug)]
pub struct Pacer {
    interval: Duration,
    lanes: Mutex<HashMap<String, Arc<Lane>>>,
    generation: AtomicU64,
}

#[derive(Debug, Default)]
struct Lane {
    /// When the last operation started; held while an operation runs.
    turn: tokio::sync::Mutex<Option<Instant>>,
    /// The newest queued update of each message, by generation.
    newest: Mutex<HashMap<String, u64>>,
}

impl Pacer {
    /// A pacer with at least `interval` between the starts of two operations in a
    /// conversation.
    pub fn new(interval: Duration) -> Self {
        Self {
            interval,
            lanes: Mutex::new(HashMap::new()),
            generation: AtomicU64::new(0),
        }
    }

    /// The interval.
    pub fn interval(&self) -> Duration {
        self.interval
    }

    fn lane(&self, conversation: &str) -> Arc<Lane> {
        let mut lanes = self.lanes.lock().unwrap_or_else(|e| e.into_inner());
        if lanes.len() > 32 {
            let now = Instant::now();
            let interval = self.interval;
            lanes.retain(|_, lane| {
                Arc::strong_count(lane) > 1
                    || lane.turn.try_lock().map_or(true, |last| {
                        last.is_some_and(|at| now.duration_since(at) < interval)
                    })
            });
        }
        Arc::clone(lanes.entry(conversation.to_owned()).or_default())
    }

    /// Runs `op` in `conversation`'s lane when its turn comes.
    pub async fn run<T, F, Fut>(&self, conversation: &str, op: F) -> T
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = T>,
    {
        let lane = self.lane(conversation);
        let mut last = lane.turn.lock().await;
        self.wait_turn(*last).await;
        *last = Some(Instant::now());
        op().await
    }

    /// Queues an update of `message` in `conversation`'s lane now; run it with
    /// [`Ticket::run`]. A ticket taken later for the same message supersedes this one.
    pub fn ticket(&self, conversation: &str, message: &str) -> Ticket {
        let lane = self.lane(conversation);
        let generation = self.generation.fetch_add(1, Ordering::Relaxed);
        lane.newest
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(message.to_owned(), generation);
        Ticket {
            lane,
            message: message.to_owned(),
            generation,
            interval: self.interval,
        }
    }

    /// Runs an update of `message` in `conversation`'s lane when its turn comes, unless a
    /// newer update of the same message was queued meanwhile: then `None`, and the newer one
    /// runs in its own turn.
    pub async fn run_latest<T, F, Fut>(&self, conversation: &str, message: &str, op: F) -> Option<T>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = T>,
    {
        self.ticket(conversation, message).run(op).await
    }

    /// Runs `op` only if `conversation`'s lane is free and due now; `None` otherwise (for
    /// typing indicators, which are worth less than a late message).
    pub async fn try_run<T, F, Fut>(&self, conversation: &str, op: F) -> Option<T>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = T>,
    {
        let lane = self.lane(conversation);
        let mut last = lane.turn.try_lock().ok()?;
        if last.is_some_and(|at| Instant::now() < at + self.interval) {
            return None;
        }
        *last = Some(Instant::now());
        Some(op().await)
    }

    async fn wait_turn(&self, last: Option<Instant>) {
        wait_turn(last, self.interval).await;
    }
}

async fn wait_turn(last: Option<Instant>, interval: Duration) {
    if let Some(at) = last {
        tokio::time::sleep_until(at + interval).await;
    }
}

/// A queued update of one message (see [`Pacer::ticket`]).
#[derive(Debug)]
pub struct Ticket {
    lane: Arc<Lane>,
    message: String,
    generation: u64,
    interval: Duration,
}

impl Ticket {
    /// Runs `op` when the lane's turn comes, unless a newer ticket for the same message was
    /// taken meanwhile (then `None`).
    pub async fn run<T, F, Fut>(self, op: F) -> Option<T>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = T>,
    {
        let mut last = self.lane.turn.lock().await;
        wait_turn(*last, self.interval).await;
        {
            // Checked when the turn has come, so updates queued while waiting supersede it.
            let mut newest = self.lane.newest.lock().unwrap_or_else(|e| e.into_inner());
            if newest.get(&self.message) != Some(&self.generation) {
                return None;
            }
            newest.remove(&self.message);
        }
        *last = Some(Instant::now());
        Some(op().await)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex as StdMutex;

    fn recorder() -> Arc<StdMutex<Vec<(String, Duration)>>> {
        Arc::new(StdMutex::new(Vec::new()))
    }

    #[tokio::test(start_paused = true)]
    async fn the_first_operation_runs_at_once_then_one_per_interval() {
        let pacer = Arc::new(Pacer::new(Duration::from_secs(2)));
        let log = recorder();
        let start = Instant::now();
        let mut tasks = Vec::new();
        for i in 0..3 {
            let (pacer, log) = (Arc::clone(&pacer), Arc::clone(&log));
            tasks.push(tokio::spawn(async move {
                pacer
                    .run("conv", || async {
                        log.lock()
                            .expect("log")
                            .push((format!("op{i}"), start.elapsed()));
                    })
                    .await;
            }));
            tokio::task::yield_now().await;
        }
        // Another conversation is not held up.
        pacer
            .run("other", || async {
                log.lock()
                    .expect("log")
                    .push(("other".into(), start.elapsed()));
            })
            .await;
        for t in tasks {
            t.await.expect("task");
        }
        let log = log.lock().expect("log").clone();
        assert_eq!(
            log,
            vec![
                ("op0".into(), Duration::ZERO),
                ("other".into(), Duration::ZERO),
                ("op1".into(), Duration::from_secs(2)),
                ("op2".into(), Duration::from_secs(4)),
            ]
        );
        // After a quiet interval, the next operation runs at once again.
        tokio::time::sleep(Duration::from_secs(10)).await;
        let before = Instant::now();
        pacer.run("conv", || async {}).await;
        assert_eq!(before.elapsed(), Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn only_the_newest_update_of_a_message_is_sent() {
        let pacer = Arc::new(Pacer::new(Duration::from_secs(2)));
        let log = recorder();
        let start = Instant::now();
        pacer.run("conv", || async {}).await; // a post: the lane is now busy for 2 s
        let mut tasks = Vec::new();
        for text in ["a", "ab", "abc"] {
            let (pacer, log) = (Arc::clone(&pacer), Arc::clone(&log));
            tasks.push(tokio::spawn(async move {
                pacer
                    .run_latest("conv", "m1", || async {
                        log.lock()
                            .expect("log")
                            .push((text.into(), start.elapsed()));
                    })
                    .await
            }));
            tokio::task::yield_now().await;
        }
        let mut outcomes = Vec::new();
        for t in tasks {
            outcomes.push(t.await.expect("task").is_some());
        }
        assert_eq!(outcomes, [false, false, true]);
        assert_eq!(
            log.lock().expect("log").clone(),
            vec![("abc".into(), Duration::from_secs(2))]
        );
        // Updates of different messages each get their turn.
        let other = pacer
            .run_latest("conv", "m2", || async { start.elapsed() })
            .await;
        assert_eq!(other, Some(Duration::from_secs(4)));
    }

    #[tokio::test(start_paused = true)]
    async fn typing_never_waits() {
        let pacer = Pacer::new(Duration::from_secs(2));
        assert_eq!(pacer.try_run("conv", || async { 1 }).await, Some(1));
        assert_eq!(pacer.try_run("conv", || async { 2 }).await, None, "not due");
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(pacer.try_run("conv", || async { 3 }).await, Some(3));
        pacer.run("conv", || async {}).await;
    }

    #[tokio::test(start_paused = true)]
    async fn quiet_lanes_are_forgotten() {
        let pacer = Pacer::new(Duration::from_secs(2));
        for i in 0..40 {
            pacer.run(&format!("c{i}"), || async {}).await;
        }
        tokio::time::sleep(Duration::from_secs(3)).await;
        pacer.run("new", || async {}).await;
        assert!(pacer.lanes.lock().expect("lanes").len() <= 2);
    }
}
