//! Fill leases across the fleet (Facebook memcache's leases): on a miss, one caller anywhere
//! gets a lease to compute the value; the others wait for its write (woken by the write's
//! notification; polling when notifications are off) or take over once the lease expires.
//! A delete or prefix delete of the key voids its lease (the cache's delete statements delete
//! the lease row), and a PUT with a lease writes only while the lease is still the key's and no
//! tag of the PUT was invalidated after it was granted.

use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{DateTime, Utc};
use sqlx::postgres::PgRow;
use tokio::time::Instant;

use super::cache::{CacheEntry, CacheKey, CachePut, PutValue, RAW_MARKER, Tag, Version, tag_array};
use super::cache_write::Written;
use super::rows::decode_all;
use super::{DbError, Store};
use crate::metrics as m;

/// Length of a lease token: 16 random bytes in URL-safe base64 without padding.
pub const TOKEN_LEN: usize = 22;

/// A fresh lease token: 128 bits from the OS CSPRNG.
fn new_token() -> Result<String, DbError> {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes)
        .map_err(|e| DbError::Other(format!("OS random source failed: {e}")))?;
    Ok(URL_SAFE_NO_PAD.encode(bytes))
}

/// Whether `token` can be one of ours (else 400 `invalid_lease`).
pub fn well_formed(token: &str) -> bool {
    token.len() == TOKEN_LEN && URL_SAFE_NO_PAD.decode(token).is_ok_and(|b| b.len() == 16)
}

/// What a leased read answers.
pub enum LeaseRead {
    Hit(CacheEntry),
    /// A miss, and this caller holds the key's lease: compute, then PUT with it.
    Lease(String),
    /// A miss while another caller still holds the lease, and the wait ran out.
    Miss,
}

enum Acquired {
    Granted,
    /// The key has a live entry (written since the read missed).
    Present,
    /// Another caller holds a live lease, until then (when known).
    Held(Option<DateTime<Utc>>),
}

const ACQUIRE: &str = "WITH cur AS (SELECT expires_at FROM {schema}.cache_leases WHERE key = $1), \
     hit AS (SELECT 1 FROM {schema}.cache WHERE key = $1 AND expires_at > now() AND $4), \
     ins AS ( \
       INSERT INTO {schema}.cache_leases AS l (key, token, granted_at, expires_at) \
       SELECT $1, $2, now(), now() + make_interval(secs => $3) \
       WHERE NOT EXISTS (SELECT 1 FROM hit) \
         AND NOT EXISTS (SELECT 1 FROM cur WHERE expires_at > now()) \
       ON CONFLICT (key) DO UPDATE \
       SET token = EXCLUDED.token, granted_at = EXCLUDED.granted_at, expires_at = EXCLUDED.expires_at \
       WHERE l.expires_at <= now() \
       RETURNING 1) \
     SELECT EXISTS (SELECT 1 FROM ins) AS granted, EXISTS (SELECT 1 FROM hit) AS hit, \
       (SELECT expires_at FROM cur) AS held_until";

/// The write of a PUT with a lease: releases the lease (deletes its row) when it is still
/// this key's with this token, and writes when, besides, no tag of the PUT was invalidated
/// after the lease was granted. Answers the version written, or nothing.
const PUT: &str = concat!(
    "WITH l AS (DELETE FROM {schema}.cache_leases WHERE key = $1 AND token = $2 \
       RETURNING granted_at), \
     ok AS (SELECT 1 FROM l WHERE NOT EXISTS (SELECT 1 FROM {schema}.cache_tags AS t \
       WHERE t.tag = ANY(",
    tag_array!("$5::text"),
    ") AND t.invalidated_at > l.granted_at)) \
     INSERT INTO {schema}.cache AS c (key, value, content_type, bytes, raw_size, tags, expires_at) \
     SELECT $1, $3, $4::text, $6::bytea, octet_length($6::bytea) + octet_length($4::text), ",
    tag_array!("$5::text"),
    ", now() + make_interval(secs => $7) FROM ok \
     ON CONFLICT (key) DO UPDATE \
     SET value = EXCLUDED.value, content_type = EXCLUDED.content_type, bytes = EXCLUDED.bytes, \
         raw_size = EXCLUDED.raw_size, tags = EXCLUDED.tags, expires_at = EXCLUDED.expires_at, \
         updated_at = now() \
     RETURNING c.updated_at, c.xmin::text AS xmin"
);

fn count(result: &'static str) {
    m::cached::increment(m::FILL_LEASES, &[("result", result)], 1);
}

impl Store {
    /// A read with a fill lease: the entry when there is one; else this caller's lease when
    /// nobody holds a live one; else waits up to `wait` for the holder's write (or for its
    /// lease to go, then tries again).
    pub async fn cache_get_leased(
        &self,
        key: CacheKey,
        check_tags: Option<Vec<Tag>>,
        no_cache: bool,
        lease: Duration,
        wait: Duration,
    ) -> Result<LeaseRead, DbError> {
        let deadline = Instant::now() + wait;
        let waiting = self.notifier.waiters.register(key.as_str());
        // Registered (see super::registry) once this caller waits for another's lease.
        let mut demand = None;
        let mut no_cache = no_cache;
        // Set after an acquisition found an entry that the read had missed.
        let mut present = false;
        let mut waited = false;
        loop {
            // Enabled before looking, so a write announced meanwhile still wakes the wait.
            let notified = waiting.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(e) = self
                .cache_get(key.clone(), check_tags.clone(), no_cache)
                .await?
            {
                if waited {
                    count("waited_hit");
                }
                return Ok(LeaseRead::Hit(e));
            }
            let token = new_token()?;
            // The entry is there, yet the read (tag-checked) missed it twice: an entry expired
            // by its tags; take the lease whatever the row.
            let check_hit = !present;
            match self.lease_acquire(&key, &token, lease, check_hit).await? {
                Acquired::Granted => {
                    count("granted");
                    return Ok(LeaseRead::Lease(token));
                }
                // Written since the read: read it (from Postgres). If that misses again (a
                // tag-checked read of an entry expired by its tags), the next try takes the
                // lease whatever the row.
                Acquired::Present => {
                    no_cache = true;
                    present = true;
                    continue;
                }
                Acquired::Held(until) => {
                    let now = Instant::now();
                    if now >= deadline {
                        count("waited_timeout");
                        return Ok(LeaseRead::Miss);
                    }
                    // Wake on the key's notification, at the lease's expiry (looked at again at
                    // least every 500 ms: clocks differ), or at the deadline; without a
                    // listening connection or before the registration is effective (writers
                    // may not notify), poll.
                    let left = until
                        .map(|u| (u - Utc::now()).to_std().unwrap_or_default())
                        .unwrap_or(Duration::ZERO)
                        + Duration::from_millis(5);
                    let mut wake = now + left.min(Duration::from_millis(500));
                    let notifier = &self.notifier;
                    demand.get_or_insert_with(|| notifier.demand());
                    if !notifier.is_listening() || !notifier.is_effective() {
                        wake = wake.min(now + Duration::from_millis(50));
                    }
                    tokio::select! {
                        _ = notified => {}
                        _ = tokio::time::sleep_until(wake.min(deadline)) => {}
                    }
                    no_cache = true;
                    present = false;
                    waited = true;
                }
            }
        }
    }

    async fn lease_acquire(
        &self,
        key: &CacheKey,
        token: &str,
        lease: Duration,
        check_hit: bool,
    ) -> Result<Acquired, DbError> {
        self.ensure_available()?;
        let (granted, hit, held): (bool, bool, Option<DateTime<Utc>>) =
            run!(self.conns, "lease_acquire", |c| sqlx::query_as(
                self.settings.schema.sql(ACQUIRE)
            )
            .bind(key.as_str())
            .bind(token)
            .bind(lease.as_secs_f64())
            .bind(check_hit)
            .fetch_one(c))
            .await?;
        Ok(if granted {
            Acquired::Granted
        } else if hit {
            Acquired::Present
        } else {
            Acquired::Held(held.filter(|h| *h > Utc::now() - chrono::Duration::seconds(60)))
        })
    }

    /// A PUT with a lease: what it wrote, or `None` when the lease was voided (unknown token,
    /// taken over, the key deleted, or a tag of the PUT invalidated since it was granted).
    pub async fn cache_put_leased(
        &self,
        put: CachePut,
        token: &str,
    ) -> Result<Option<Written>, DbError> {
        self.ensure_available()?;
        let (value, content_type, bytes): (&str, Option<&str>, Option<&[u8]>) = match &put.value {
            PutValue::Json(text) => (text, None, None),
            PutValue::Raw {
                content_type,
                bytes,
            } => (RAW_MARKER, Some(content_type), Some(bytes)),
        };
        let tags = put
            .tags
            .iter()
            .map(Tag::as_str)
            .collect::<Vec<_>>()
            .join(",");
        let rows: Result<Vec<PgRow>, DbError> = run!(self.conns, "cache_put_leased", |c| {
            sqlx::query(self.settings.schema.sql(PUT))
                .bind(put.key.as_str())
                .bind(token)
                .bind(value)
                .bind(content_type)
                .bind(&tags)
                .bind(bytes)
                .bind(put.ttl_seconds as i32)
                .fetch_all(c)
        })
        .await;
        if let Some(near) = &self.notifier.cache {
            near.invalidate(put.key.as_str());
        }
        let written = decode_all(&rows?, Version::read)?.pop();
        count(if written.is_some() {
            "written"
        } else {
            "voided"
        });
        Ok(written.map(|version| Written {
            version,
            superseded: 0,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens() {
        let t = new_token().unwrap();
        assert!(well_formed(&t), "{t}");
        assert_ne!(t, new_token().unwrap());
        assert!(!well_formed("short"));
        assert!(!well_formed(&"+".repeat(TOKEN_LEN)));
        assert!(!well_formed(&format!("{t}A")));
    }

    #[test]
    fn statements_qualify_every_table() {
        for sql in [ACQUIRE, PUT] {
            assert!(!sql.contains(" cache_leases "), "{sql}");
            assert!(sql.contains("{schema}.cache_leases"), "{sql}");
        }
    }
}
