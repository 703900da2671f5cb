//! Only one instance acts at a time.
//!
//! With PostgreSQL, an instance becomes active by taking a session-level advisory lock
//! (`pg_try_advisory_lock`) on a connection of its own, outside the pool. Others wait as
//! standby and try again every [`RETRY_INTERVAL`]: when the active instance dies, its
//! connection closes, PostgreSQL releases the lock, and a standby takes over within seconds.
//!
//! An active instance that loses its lock connection (a database restart, a network cut)
//! cannot know whether another one took over. It is [`Role::Suspended`] at once: it acts on
//! nothing (no agent input, no firewall writes, no chat posts: see [`Gate`]) but keeps its
//! sessions, and tries to take the lock again every [`RETRY_INTERVAL`]. When it gets it back
//! it is active again and carries on where it stopped; when another instance holds it, this
//! one becomes a [`Role::Standby`] (and lets its sessions go: the active one resumes them from
//! storage). The process itself only stops on shutdown.
//!
//! The embedded SQLite database serves a single node: that instance is always active.

use std::time::Duration;

use sqlx::Connection;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::config::{DatabaseBackend, DatabaseUrl};

/// The advisory lock key (`"SMLEAD"` in ASCII).
pub const LOCK_KEY: i64 = 0x534d_4c45_4144;
/// How often a standby tries to take the lock.
pub const RETRY_INTERVAL: Duration = Duration::from_secs(1);
/// How often the active instance checks its lock connection, and how long a check (or a
/// connection attempt) may take.
pub const CHECK_INTERVAL: Duration = Duration::from_secs(2);

/// This instance's part.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Waiting for the lock; does nothing but serve HTTP.
    Standby,
    /// Holds the lock and does the work.
    Active,
    /// Held the lock and lost its connection: acts on nothing, keeps its sessions, and tries
    /// to take the lock again.
    Suspended,
}

/// Whether this instance may act now: what every part that acts outside the process (chat
/// posts, agent input, firewall writes, handling inbound messages) waits on. Open while the
/// instance is [`Role::Active`]; closed while it is [`Role::Suspended`]; closed for good once
/// it is a [`Role::Standby`] again (another instance acts: the work is not this one's any
/// more).
#[derive(Debug, Clone)]
pub struct Gate {
    role: watch::Receiver<Role>,
}

/// Why a [`Gate`] will not open: this instance is a standby (or shutting down), so what waited
/// must not be done by it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("this instance is not the active one any more")]
pub struct NotActive;

impl Gate {
    /// A gate that follows `role`.
    pub fn new(role: watch::Receiver<Role>) -> Self {
        Self { role }
    }

    /// A gate that is always open (tests, and parts used without a leader).
    pub fn always_open() -> Self {
        let (tx, role) = watch::channel(Role::Active);
        // The value stays readable after the sender is gone.
        drop(tx);
        Self { role }
    }

    /// Whether this instance is active right now.
    pub fn is_open(&self) -> bool {
        *self.role.borrow() == Role::Active
    }

    /// Resolves once this instance stops being active (never for a gate that cannot close).
    pub async fn closed(&self) {
        let mut role = self.role.clone();
        if role.wait_for(|r| *r != Role::Active).await.is_err() {
            std::future::pending::<()>().await;
        }
    }

    /// Waits until this instance is active (at once when it is).
    ///
    /// # Errors
    /// [`NotActive`] when it is (or becomes, while waiting) a standby.
    pub async fn opened(&self) -> Result<(), NotActive> {
        let mut role = self.role.clone();
        loop {
            let now = *role.borrow_and_update();
            match now {
                Role::Active => return Ok(()),
                Role::Standby => return Err(NotActive),
                Role::Suspended => {}
            }
            if role.changed().await.is_err() {
                // No one decides any more (shutdown): only an open gate stays open.
                return if *role.borrow() == Role::Active {
                    Ok(())
                } else {
                    Err(NotActive)
                };
            }
        }
    }
}

/// Decides this instance's role until `cancel` fires, publishing it on `role`. The caller owns
/// the task this runs in.
pub async fn run(url: DatabaseUrl, role: watch::Sender<Role>, cancel: CancellationToken) {
    if url.backend() == DatabaseBackend::Sqlite {
        let _ = role.send(Role::Active);
        cancel.cancelled().await;
        return;
    }
    tokio::select! {
        () = cancel.cancelled() => {}
        () = hold(url, role) => {}
    }
}

async fn hold(url: DatabaseUrl, tx: watch::Sender<Role>) {
    let mut announced_standby = false;
    loop {
        let mut conn = loop {
            match take(&url).await {
                Ok(Some(conn)) => break conn,
                Ok(None) => {
                    // Another instance holds the lock. One that held it before stands by now.
                    if *tx.borrow() != Role::Standby {
                        warn!("another instance took over while this one was suspended: standing by, its sessions are the active one's now");
                        let _ = tx.send(Role::Standby);
                    }
                    if !announced_standby {
                        info!("another instance is active: waiting as a standby");
                        announced_standby = true;
                    }
                }
                Err(e) => warn!(error = %e, "cannot take the instance lock"),
            }
            tokio::time::sleep(RETRY_INTERVAL).await;
        };
        announced_standby = false;
        if *tx.borrow() == Role::Suspended {
            info!("took the instance lock back: this instance acts again");
        } else {
            info!("this instance is active (holds the instance lock)");
        }
        let _ = tx.send(Role::Active);
        loop {
            tokio::time::sleep(CHECK_INTERVAL).await;
            let alive =
                tokio::time::timeout(CHECK_INTERVAL, sqlx::query("SELECT 1").execute(&mut conn))
                    .await;
            match alive {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => {
                    error!(error = %e, "lost the instance-lock connection: acting on nothing until the lock is taken back");
                    break;
                }
                Err(_) => {
                    error!(timeout = ?CHECK_INTERVAL, "the instance-lock connection does not answer: acting on nothing until the lock is taken back");
                    break;
                }
            }
        }
        let _ = tx.send(Role::Suspended);
        metrics::counter!(crate::telemetry::names::LEADER_SUSPENSIONS_TOTAL).increment(1);
        // Dropped, not closed: the server may be gone. Should it still be there, the lock goes
        // with the connection.
        drop(conn);
    }
}

/// Opens a lock connection and tries the lock once: the connection when it was taken,
/// `None` when another instance holds it.
async fn take(url: &DatabaseUrl) -> Result<Option<sqlx::PgConnection>, sqlx::Error> {
    let mut conn = tokio::time::timeout(CHECK_INTERVAL, sqlx::PgConnection::connect(url.expose()))
        .await
        .map_err(|_| sqlx::Error::PoolTimedOut)??;
    let taken: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
        .bind(LOCK_KEY)
        .fetch_one(&mut conn)
        .await?;
    if taken {
        Ok(Some(conn))
    } else {
        let _ = conn.close().await;
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_gate_opens_when_active_waits_while_suspended_and_refuses_a_standby() {
        let (tx, rx) = watch::channel(Role::Suspended);
        let gate = Gate::new(rx);
        assert!(!gate.is_open());
        let waiting = tokio::spawn({
            let gate = gate.clone();
            async move { gate.opened().await }
        });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished(), "a suspended instance waits");
        tx.send(Role::Active).expect("send");
        assert_eq!(waiting.await.expect("join"), Ok(()));
        assert!(gate.is_open());
        tx.send(Role::Suspended).expect("send");
        let waiting = tokio::spawn({
            let gate = gate.clone();
            async move { gate.opened().await }
        });
        tokio::task::yield_now().await;
        tx.send(Role::Standby).expect("send");
        assert_eq!(
            waiting.await.expect("join"),
            Err(NotActive),
            "a standby must not act"
        );
        let closing = tokio::spawn({
            let gate = gate.clone();
            async move { gate.closed().await }
        });
        assert!(closing.await.is_ok(), "a standby's gate is closed");
        assert!(Gate::always_open().is_open());
        assert!(
            tokio::time::timeout(
                std::time::Duration::from_millis(50),
                Gate::always_open().closed()
            )
            .await
            .is_err(),
            "an open gate without a leader never closes"
        );
        assert_eq!(Gate::always_open().opened().await, Ok(()));
    }
}
