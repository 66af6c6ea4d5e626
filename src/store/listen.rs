//! The listening connection: one per sidecar, outside the pool, that LISTENs on the schema's
//! channel (the triggers' change notifications) and on a heartbeat channel of its own, and
//! hands every change to the [`Notifier`].
//!
//! Heartbeats measure the listener's lag, which makes the near caches' staleness bound real: a
//! heartbeat is a NOTIFY sent through the pool (so it also proves the way from the pool to
//! Postgres to this connection), and notifications reach a listener in commit order, so once
//! the heartbeat sent at time t has arrived every change committed before t has been applied.
//! The near caches are open until the last arrived heartbeat's send time plus
//! `cache.near.max_staleness_ms`; when it lapses they are bypassed, and emptied before they
//! open again. A heartbeat that committed but has not arrived 5 s later means the connection
//! is dead without having said so (a partition): it is replaced.
//!
//! The window also never reaches past this sidecar's registration (see [`super::registry`]):
//! writers notify only while some sidecar is registered.
//!
//! The connection is replaced with capped, jittered back-off whenever it fails; after every
//! (re)connect the feed's subscribers get `reset` (messages may have been missed) and the near
//! caches stay emptied until a heartbeat arrives on the new connection.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use rand::RngExt;
use sqlx::postgres::{PgListener, PgPoolOptions};

use super::near::now_ns;
use super::notify::{Change, Notifier};
use super::{DbError, Store};
use crate::config::Settings;
use crate::metrics as m;
use crate::shutdown::Lifecycle;

/// A heartbeat that committed but has not arrived this long after means a dead connection.
const SILENCE: Duration = Duration::from_secs(5);
/// Heartbeats while no near cache is on: only to notice a silently dead connection.
const IDLE_HEARTBEAT: Duration = Duration::from_secs(2);

/// How often heartbeats are sent: a quarter of the staleness bound (so the window stays open
/// while all is well, with room for three late ones), at most every 250 ms, at least every 10.
pub fn heartbeat_interval(settings: &Settings, near: bool) -> Duration {
    if !near {
        return IDLE_HEARTBEAT;
    }
    Duration::from_millis((settings.cache.near.max_staleness_ms / 4).clamp(10, 250))
}

/// Heartbeats sent and not yet arrived: sequence number -> (when sent, [`now_ns`]; whether its
/// NOTIFY committed, and when).
type Pending = std::sync::Mutex<BTreeMap<u64, (u64, Option<u64>)>>;

/// Runs the listener until the sidecar stops. `store` (this thread's) sends the heartbeats.
pub async fn run(store: Store, notifier: Arc<Notifier>, settings: Settings, lifecycle: Lifecycle) {
    let url = match settings.listen_url() {
        Ok(url) => url.clone(),
        Err(why) => {
            tracing::warn!("{why}");
            return;
        }
    };
    store.status.wait_migrated().await;
    let options = match super::pool::parse_url(&url) {
        // No start-up parameter a pooler may refuse (sqlx's extra_float_digits; see pool.rs).
        Ok(o) => o
            .application_name("pgsidecar-listen")
            .extra_float_digits(None),
        Err(e) => {
            tracing::error!(error = %e, "change notifications off: database.listen_url is invalid");
            return;
        }
    };
    let channel = settings.database.schema.clone();
    let heartbeats = format!("pgsidecar_hb_{:016x}", rand::rng().random::<u64>());
    let interval = heartbeat_interval(&settings, notifier.has_near());
    let staleness = Duration::from_millis(settings.cache.near.max_staleness_ms);
    let connect_timeout = Duration::from_secs(settings.database.connect_timeout_seconds);
    let pending: Arc<Pending> = Arc::default();
    let mut seq: u64 = 0;
    let mut delay = Duration::from_millis(100);
    let mut reported: Option<String> = None;
    metrics::gauge!(m::LISTENER_UP).set(0.0);
    loop {
        // Connect and LISTEN, within the connect timeout.
        let connect = async {
            let pool = PgPoolOptions::new()
                .max_connections(1)
                .min_connections(0)
                .idle_timeout(None)
                .max_lifetime(None)
                .acquire_timeout(connect_timeout)
                .connect_lazy_with(options.clone());
            let mut l = PgListener::connect_with(&pool).await?;
            l.ignore_pool_close_event(true);
            l.eager_reconnect(false);
            l.listen_all([channel.as_str(), heartbeats.as_str()])
                .await?;
            Ok::<_, sqlx::Error>(l)
        };
        let listener = tokio::select! {
            _ = lifecycle.stopped() => return,
            r = tokio::time::timeout(connect_timeout, connect) => r,
        };
        let mut listener = match listener {
            Ok(Ok(l)) => l,
            failed => {
                let cause = match failed {
                    Ok(Err(e)) => crate::config::redact_url(&DbError::of(&e).to_string()),
                    _ => "connecting timed out".to_string(),
                };
                if reported.as_deref() != Some(&cause) {
                    tracing::warn!(error = %cause, retry_in_ms = delay.as_millis() as u64,
                        "cannot open the listening connection; retrying");
                    reported = Some(cause);
                }
                let jittered = delay.mul_f64(rand::rng().random_range(0.5..1.0));
                tokio::select! {
                    _ = lifecycle.stopped() => return,
                    _ = tokio::time::sleep(jittered) => {}
                }
                delay = (delay * 2).min(Duration::from_secs(10));
                continue;
            }
        };
        delay = Duration::from_millis(100);
        reported = None;
        tracing::info!(channel = %channel, "listening for change notifications");
        metrics::gauge!(m::LISTENER_UP).set(1.0);
        pending.lock().unwrap_or_else(|p| p.into_inner()).clear();
        notifier.listening_again();
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let lost = loop {
            tokio::select! {
                _ = lifecycle.stopped() => return,
                n = listener.try_recv() => match n {
                    Ok(Some(n)) if n.channel() == heartbeats => {
                        arrived(&notifier, &pending, n.payload(), staleness);
                    }
                    Ok(Some(n)) => {
                        notifier.apply(Change::parse(n.payload()).unwrap_or(Change::Flush));
                    }
                    Ok(None) => break "the connection closed".to_string(),
                    Err(e) => break crate::config::redact_url(&DbError::of(&e).to_string()),
                },
                _ = tick.tick() => {
                    let now = now_ns();
                    // The window lapsed: empty the caches now rather than when it reopens.
                    if notifier.has_near() && !notifier.window.is_open(now) {
                        notifier.clear_near();
                    }
                    if silent(&pending, now) {
                        break format!("no heartbeat arrived within {} s of its commit", SILENCE.as_secs());
                    }
                    seq += 1;
                    send_heartbeat(&store, &notifier, &pending, &heartbeats, seq);
                    report_sizes(&notifier);
                }
            }
        };
        tracing::warn!(error = %lost, "listening connection lost; near caches emptied, reconnecting");
        metrics::gauge!(m::LISTENER_UP).set(0.0);
        notifier.lost();
        drop(listener);
    }
}

/// A heartbeat arrived: the window opens until its send time plus the bound (after emptying
/// the caches if it had lapsed: changes may have been missed only if the connection was lost,
/// but the caches were bypassed meanwhile and are emptied before serving again).
fn arrived(notifier: &Notifier, pending: &Pending, payload: &str, staleness: Duration) {
    let Ok(seq) = payload.parse::<u64>() else {
        return;
    };
    let sent = {
        let mut p = pending.lock().unwrap_or_else(|p| p.into_inner());
        let sent = p.get(&seq).map(|(sent, _)| *sent);
        // This and every earlier one (their NOTIFYs came before, or never committed).
        *p = p.split_off(&(seq + 1));
        sent
    };
    let Some(sent) = sent else {
        return;
    };
    let now = now_ns();
    metrics::gauge!(m::LISTENER_LAG).set(now.saturating_sub(sent) as f64 / 1e9);
    if notifier.has_near() {
        // Never past this sidecar's registration: without it writers may not notify (see
        // super::registry); so a window that reopens after it lapsed empties the caches first.
        let until = sent
            .saturating_add(staleness.as_nanos() as u64)
            .min(notifier.effective_until());
        if until <= now {
            return;
        }
        if !notifier.window.is_open(now) {
            notifier.clear_near();
        }
        notifier.window.open_until(until);
    }
}

/// Whether a heartbeat that committed has not arrived within [`SILENCE`].
fn silent(pending: &Pending, now: u64) -> bool {
    let p = pending.lock().unwrap_or_else(|p| p.into_inner());
    p.values().any(|(_, committed)| {
        committed.is_some_and(|at| now.saturating_sub(at) > SILENCE.as_nanos() as u64)
    })
}

/// Sends heartbeat `seq` through the pool, in a task of its own (the listener keeps receiving
/// meanwhile); records its send time and, when it committed, the commit and a clock sample.
fn send_heartbeat(
    store: &Store,
    notifier: &Arc<Notifier>,
    pending: &Arc<Pending>,
    channel: &str,
    seq: u64,
) {
    let sent = now_ns();
    {
        let mut p = pending.lock().unwrap_or_else(|p| p.into_inner());
        p.insert(seq, (sent, None));
        // Heartbeats whose statement failed never arrive: keep only the last minute's worth.
        while p.len() > 600 {
            p.pop_first();
        }
    }
    let (store, notifier, pending, channel) = (
        store.clone(),
        notifier.clone(),
        pending.clone(),
        channel.to_string(),
    );
    tokio::spawn(async move {
        let wall_sent = chrono::Utc::now().timestamp_micros();
        match store.heartbeat(&channel, seq).await {
            Ok(db_time) => {
                let wall_received = chrono::Utc::now().timestamp_micros();
                notifier
                    .window
                    .clock_sample(db_time, wall_sent, wall_received);
                let mut p = pending.lock().unwrap_or_else(|p| p.into_inner());
                if let Some(entry) = p.get_mut(&seq) {
                    entry.1 = Some(now_ns());
                }
            }
            Err(e) => tracing::debug!(error = %e, "heartbeat not sent"),
        }
    });
}

fn report_sizes(notifier: &Notifier) {
    if let Some(c) = &notifier.cache {
        metrics::gauge!(m::NEAR_BYTES, "cache" => "cache").set(c.bytes() as f64);
    }
    if let Some(s) = &notifier.sessions {
        metrics::gauge!(m::NEAR_BYTES, "cache" => "sessions").set(s.bytes() as f64);
    }
}

impl Store {
    /// Sends one heartbeat: a NOTIFY on `channel` with `seq`, committed without waiting for its
    /// WAL flush (it changes no data); returns the database's clock when it ran.
    async fn heartbeat(
        &self,
        channel: &str,
        seq: u64,
    ) -> Result<chrono::DateTime<chrono::Utc>, DbError> {
        let payload = seq.to_string();
        run_once!(self.conns, "heartbeat", |c| sqlx::query_scalar(
            "SELECT clock_timestamp() FROM (SELECT set_config('synchronous_commit', 'off', true), \
             pg_notify($1, $2)::text) AS hb"
        )
        .bind(channel)
        .bind(&payload)
        .fetch_one(c))
        .await
    }
}
