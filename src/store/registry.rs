//! The registration: the change triggers notify only while some sidecar of the fleet has an
//! unexpired row in `listeners` (a notifying commit takes a cluster-wide lock through its WAL
//! flush, so writes nobody listens to should not pay it; see docs/consistency.md).
//!
//! While this sidecar needs notifications ([`Notifier::needed`]: a near cache on, a
//! change-feed subscriber, a lease waiter) and its listening connection is up, it upserts its
//! row (`until` = the database's now + [`TTL`]) every [`RENEW`], and deletes it when the need
//! goes and at shutdown. A registration is counted on ("effective") only once every
//! transaction that could have run its trigger before the row was visible has ended: after the
//! upsert commits, the snapshot's xmax is read, and the registrar waits until the oldest running
//! transaction id (the snapshot's xmin) has reached it. A READ COMMITTED writer's trigger takes
//! a fresh snapshot, so from then on every writer sees the row and notifies. (A REPEATABLE READ
//! or SERIALIZABLE transaction of bare SQL that took its snapshot before the row existed and
//! writes after the registration became effective does not see it, and does not notify: the
//! sidecar itself only writes in READ COMMITTED.)
//!
//! It stays effective until the last successful upsert's start plus [`TTL`] minus [`MARGIN`]
//! (this machine's monotonic clock, so a paused process or an unreachable database lapses it);
//! when it lapses the near caches are emptied and closed, subscribers get `reset`, and it is
//! counted on again only after a new upsert and a new wait.

use std::sync::Arc;
use std::time::Duration;

use super::near::now_ns;
use super::notify::Notifier;
use super::{DbError, Store};
use crate::metrics as m;
use crate::shutdown::Lifecycle;

/// How long a row counts for writers, past the upsert.
const TTL: Duration = Duration::from_secs(30);
/// How often the row is renewed.
const RENEW: Duration = Duration::from_secs(5);
/// Counted on until the upsert's start plus `TTL` minus this: room for clock rate differences,
/// a slow statement and the late renewals that follow a hiccup.
const MARGIN: Duration = Duration::from_secs(10);
/// Rows of sidecars that died are deleted this long after they expired.
const GONE: &str = "1 hour";

/// Runs the registrar until the sidecar stops; deletes the row then.
pub async fn run(store: Store, notifier: Arc<Notifier>, lifecycle: Lifecycle) {
    if !notifier.enabled {
        return;
    }
    store.status.wait_migrated().await;
    // The instance's id: random, so a restarted sidecar never renews a dead one's row.
    let id = uuid::Uuid::new_v4().to_string();
    let mut registered = false;
    metrics::gauge!(m::NOTIFICATIONS_REGISTERED).set(0.0);
    loop {
        // Renewed only while listening; kept through a short loss of the listening connection
        // (which empties the near caches and resets the feed by itself).
        let needed = notifier.needed();
        let wanted = needed && notifier.is_listening();
        let effective = notifier.is_effective();
        if !effective && notifier.effective_until() != 0 {
            tracing::warn!(
                "the notification registration lapsed (not renewed in time); near caches emptied"
            );
            metrics::gauge!(m::NOTIFICATIONS_REGISTERED).set(0.0);
            notifier.lapsed();
        }
        if wanted {
            let started = now_ns();
            match store.register(&id).await {
                Ok(()) => {
                    registered = true;
                    // Counted on only once every writer that could have missed the row ended
                    // (bounded, so that the row is renewed meanwhile).
                    let waited = if effective {
                        true
                    } else {
                        let wait = tokio::time::timeout(RENEW, store.wait_writers_before());
                        tokio::select! {
                            _ = lifecycle.stopped() => break,
                            w = wait => match w {
                                Ok(Ok(())) => true,
                                Ok(Err(e)) => {
                                    tracing::debug!(error = %e, "registration not confirmed");
                                    false
                                }
                                Err(_) => {
                                    tracing::info!("waiting for transactions older than the \
                                        notification registration to end");
                                    false
                                }
                            },
                        }
                    };
                    let until = started + (TTL - MARGIN).as_nanos() as u64;
                    if waited && until > now_ns() {
                        if !notifier.is_effective() {
                            tracing::info!("change notifications registered");
                        }
                        notifier.set_effective_until(until);
                        metrics::gauge!(m::NOTIFICATIONS_REGISTERED).set(1.0);
                    }
                }
                Err(e) => tracing::debug!(error = %e, "notification registration not renewed"),
            }
        } else if registered && !needed {
            // No longer needed.
            if notifier.effective_until() != 0 {
                notifier.lapsed();
            }
            metrics::gauge!(m::NOTIFICATIONS_REGISTERED).set(0.0);
            match store.deregister(&id).await {
                Ok(()) => registered = false,
                Err(e) => tracing::debug!(error = %e, "notification registration not deleted"),
            }
        }
        // Renew on time; while not effective yet but wanted, retry soon.
        let pause = if wanted && !notifier.is_effective() {
            Duration::from_millis(500)
        } else {
            RENEW
        };
        tokio::select! {
            _ = lifecycle.stopped() => break,
            _ = notifier.demand_changed.notified(), if !wanted || !notifier.is_effective() => {}
            _ = tokio::time::sleep(pause) => {}
        }
    }
    metrics::gauge!(m::NOTIFICATIONS_REGISTERED).set(0.0);
    if registered {
        let _ = tokio::time::timeout(Duration::from_millis(1500), store.deregister(&id)).await;
    }
}

impl Store {
    /// Upserts this sidecar's row, and deletes rows of sidecars long gone.
    async fn register(&self, id: &str) -> Result<(), DbError> {
        run!(self.conns, "register", |c| sqlx::query(
            self.settings.schema.sql(&format!(
                "WITH gone AS (DELETE FROM {{schema}}.listeners WHERE until < now() - interval '{GONE}') \
                 INSERT INTO {{schema}}.listeners (id, until) VALUES ($1, now() + interval '{} seconds') \
                 ON CONFLICT (id) DO UPDATE SET until = greatest({{schema}}.listeners.until, excluded.until)",
                TTL.as_secs()
            ))
        )
        .bind(id)
        .execute(c))
        .await
        .map(drop)
    }

    async fn deregister(&self, id: &str) -> Result<(), DbError> {
        run!(self.conns, "deregister", |c| sqlx::query(
            self.settings
                .schema
                .sql("DELETE FROM {schema}.listeners WHERE id = $1")
        )
        .bind(id)
        .execute(c))
        .await
        .map(drop)
    }

    /// Waits until every transaction running when it is called has ended (the snapshot's xmin
    /// reached its xmax), polling with back-off.
    async fn wait_writers_before(&self) -> Result<(), DbError> {
        let xmax: i64 = run!(self.conns, "register_wait", |c| sqlx::query_scalar(
            "SELECT txid_snapshot_xmax(txid_current_snapshot())"
        )
        .fetch_one(c))
        .await?;
        let mut pause = Duration::from_millis(2);
        loop {
            let xmin: i64 = run!(self.conns, "register_wait", |c| sqlx::query_scalar(
                "SELECT txid_snapshot_xmin(txid_current_snapshot())"
            )
            .fetch_one(c))
            .await?;
            if xmin >= xmax {
                return Ok(());
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(200));
        }
    }
}
