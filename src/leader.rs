//! Only one instance acts at a time.
//!
//! With PostgreSQL, an instance becomes active by taking a session-level advisory lock
//! (`pg_try_advisory_lock`) on a connection of its own, outside the pool. Others wait as
//! standby and try again every [`RETRY_INTERVAL`]: when the active instance dies, its
//! connection closes, PostgreSQL releases the lock, and a standby takes over within seconds.
//! An active instance that loses its lock connection cannot know whether another one took
//! over, so it reports [`Role::Lost`] and the process stops (to be restarted as a standby).
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
/// How often the active instance checks its lock connection.
pub const CHECK_INTERVAL: Duration = Duration::from_secs(5);

/// This instance's part.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Waiting for the lock; does nothing but serve HTTP.
    Standby,
    /// Holds the lock and does the work.
    Active,
    /// Held the lock and lost it; the process must stop.
    Lost,
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
    let mut conn = loop {
        match sqlx::PgConnection::connect(url.expose()).await {
            Ok(mut conn) => {
                let taken: Result<bool, _> = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
                    .bind(LOCK_KEY)
                    .fetch_one(&mut conn)
                    .await;
                match taken {
                    Ok(true) => break conn,
                    Ok(false) => {
                        if !announced_standby {
                            info!("another instance is active: waiting as a standby");
                            announced_standby = true;
                        }
                        let _ = conn.close().await;
                    }
                    Err(e) => warn!(error = %e, "cannot ask for the instance lock"),
                }
            }
            Err(e) => warn!(error = %e, "cannot open the instance-lock connection"),
        }
        tokio::time::sleep(RETRY_INTERVAL).await;
    };
    info!("this instance is active (holds the instance lock)");
    let _ = tx.send(Role::Active);
    loop {
        tokio::time::sleep(CHECK_INTERVAL).await;
        if let Err(e) = sqlx::query("SELECT 1").execute(&mut conn).await {
            error!(error = %e, "lost the instance-lock connection; another instance may take over, so this one stops");
            let _ = tx.send(Role::Lost);
            return;
        }
    }
}
