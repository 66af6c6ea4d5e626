//! Fill leases: one winner among many callers across sidecars, waiters answered with the value
//! as soon as it is written (woken by its notification, or polling without one), voided leases
//! refused with 409, a holder that dies replaced once its lease expires, bad input refused.

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;

use crate::helpers::*;

const LEASE_HEADER: &str = "pgsidecar-fill-lease";

/// A leased GET: status, lease token (if any), body.
async fn leased_get(s: &Sidecar, key: &str, query: &str) -> (u16, Option<String>, String) {
    let r = s
        .http
        .get(s.url(&format!("/v1/cache/{}?{query}", enc(key))))
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let lease = r
        .headers()
        .get(LEASE_HEADER)
        .map(|v| v.to_str().unwrap().to_string());
    (status, lease, r.text().await.unwrap())
}

async fn put_leased(s: &Sidecar, key: &str, body: &str, query: &str) -> reqwest::Response {
    s.http
        .put(s.url(&format!("/v1/cache/{}?{query}", enc(key))))
        .body(body.to_string())
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn one_caller_in_the_fleet_gets_the_lease_and_the_others_get_its_value() {
    let first = Sidecar::start().await;
    let mut fleet = vec![Arc::new(first)];
    for _ in 0..3 {
        let s = Sidecar::builder().db(&fleet[0].db).start().await;
        fleet.push(Arc::new(s));
    }
    for s in &fleet {
        assert!(s.logs.wait_for(
            "listening for change notifications",
            Duration::from_secs(30)
        ));
    }
    // 200 callers for one missing key, spread over 4 sidecars.
    let mut calls = Vec::new();
    for i in 0..200 {
        let s = fleet[i % fleet.len()].clone();
        calls.push(tokio::spawn(async move {
            let got = leased_get(&s, "hot", "fill_lease_ms=20000&wait_ms=20000").await;
            if let (404, Some(token), _) = &got {
                // The winner computes for a while, then writes with its lease.
                tokio::time::sleep(Duration::from_millis(500)).await;
                let r = put_leased(&s, "hot", "\"computed\"", &format!("lease={token}")).await;
                assert_eq!(r.status(), 204);
            }
            got
        }));
    }
    let mut leases = 0;
    let mut values = 0;
    for c in calls {
        match c.await.unwrap() {
            (404, Some(_), _) => leases += 1,
            (200, None, body) => {
                assert_eq!(body, "\"computed\"");
                values += 1;
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!((leases, values), (1, 199));
    // The lease was released by the write: the next miss gets a new one at once.
    let r = fleet[0]
        .http
        .delete(fleet[0].url("/v1/cache/hot"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    let (status, lease, _) = leased_get(&fleet[1], "hot", "fill_lease_ms=1000").await;
    assert_eq!((status, lease.is_some()), (404, true));
}

#[tokio::test]
async fn waiters_poll_when_notifications_are_off() {
    let db = fresh_db().await;
    let s = Arc::new(
        Sidecar::builder()
            .db(&db)
            .env("PGSIDECAR_DATABASE__POOLER", "transaction")
            .env("PGSIDECAR_DATABASE__MIGRATE_URL", &db)
            .start()
            .await,
    );
    let (status, lease, _) = leased_get(&s, "k", "fill_lease_ms=10000").await;
    assert_eq!(status, 404);
    let token = lease.unwrap();
    let waiter = {
        let s = s.clone();
        tokio::spawn(async move { leased_get(&s, "k", "fill_lease_ms=10000&wait_ms=10000").await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        put_leased(&s, "k", "7", &format!("lease={token}"))
            .await
            .status(),
        204
    );
    assert_eq!(waiter.await.unwrap(), (200, None, "7".into()));
}

#[tokio::test]
async fn a_voided_lease_writes_nothing() {
    let s = Sidecar::start().await;
    let lease = |key: &'static str| {
        let s = &s;
        async move {
            let (status, lease, _) = leased_get(s, key, "fill_lease_ms=30000").await;
            assert_eq!(status, 404);
            lease.expect("a lease")
        }
    };
    // Deleted meanwhile.
    let t = lease("a").await;
    let r = s.http.delete(s.url("/v1/cache/a")).send().await.unwrap();
    assert_eq!(r.status(), 204);
    assert_error(
        put_leased(&s, "a", "1", &format!("lease={t}")).await,
        409,
        "lease_voided",
    )
    .await;
    assert_eq!(s.get_cache("a").await.status(), 404);
    // Prefix-deleted meanwhile.
    let t = lease("p:1").await;
    let r = s
        .http
        .delete(s.url("/v1/cache?prefix=p"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_error(
        put_leased(&s, "p:1", "1", &format!("lease={t}")).await,
        409,
        "lease_voided",
    )
    .await;
    // A tag of the PUT invalidated meanwhile; a PUT without that tag would have been fine,
    // but the lease is gone after the refusal.
    let t = lease("t").await;
    let r = s
        .post_json("/v1/cache/_invalidate", &json!({"tags": ["x"]}))
        .await;
    assert_eq!(r.status(), 200);
    assert_error(
        put_leased(&s, "t", "1", &format!("lease={t}&tags=y,x")).await,
        409,
        "lease_voided",
    )
    .await;
    assert_eq!(s.get_cache("t").await.status(), 404);
    let t = lease("u").await;
    let r = s
        .post_json("/v1/cache/_invalidate", &json!({"tags": ["x"]}))
        .await;
    assert_eq!(r.status(), 200);
    let r = put_leased(&s, "u", "1", &format!("lease={t}&tags=y")).await;
    assert_eq!(r.status(), 204);
    assert!(r.headers().get("etag").is_some());
    assert_eq!(s.get_cache("u").await.text().await.unwrap(), "1");
    // Used once: the lease is released by its write.
    assert_error(
        put_leased(&s, "u", "2", &format!("lease={t}")).await,
        409,
        "lease_voided",
    )
    .await;
    // Unknown and malformed tokens, a lease with a precondition.
    assert_error(
        put_leased(&s, "u", "2", "lease=AAAAAAAAAAAAAAAAAAAAAA").await,
        409,
        "lease_voided",
    )
    .await;
    for bad in ["short", "!!!!!!!!!!!!!!!!!!!!!!", ""] {
        assert_error(
            put_leased(&s, "u", "2", &format!("lease={bad}")).await,
            400,
            "invalid_lease",
        )
        .await;
    }
    let t = lease("v").await;
    let r = s
        .http
        .put(s.url(&format!("/v1/cache/v?lease={t}")))
        .header("if-none-match", "*")
        .body("1")
        .send()
        .await
        .unwrap();
    assert_error(r, 400, "invalid_lease").await;
    assert_eq!(s.get_cache("u").await.text().await.unwrap(), "1");
}

#[tokio::test]
async fn a_holder_that_dies_is_replaced_when_its_lease_expires() {
    let s = Arc::new(Sidecar::start().await);
    let (status, dead, _) = leased_get(&s, "k", "fill_lease_ms=800").await;
    assert_eq!(status, 404);
    let dead = dead.unwrap();
    // The holder never writes. A waiter gets a new lease once the first one has expired.
    let (status, lease, _) = leased_get(&s, "k", "fill_lease_ms=10000&wait_ms=20000").await;
    assert_eq!(status, 404);
    let lease = lease.expect("a new lease");
    assert_ne!(lease, dead);
    // The dead holder's late write is refused: its lease was taken over.
    assert_error(
        put_leased(&s, "k", "1", &format!("lease={dead}")).await,
        409,
        "lease_voided",
    )
    .await;
    assert_eq!(
        put_leased(&s, "k", "2", &format!("lease={lease}"))
            .await
            .status(),
        204
    );
    assert_eq!(s.get_cache("k").await.text().await.unwrap(), "2");
}

#[tokio::test]
async fn a_wait_that_runs_out_answers_a_plain_miss() {
    let s = Sidecar::builder()
        .env("PGSIDECAR_SERVER__REQUEST_TIMEOUT_MS", 500)
        .start()
        .await;
    let (_, held, _) = leased_get(&s, "k", "fill_lease_ms=30000").await;
    assert!(held.is_some());
    // Waits beyond the request timeout are allowed (the wait is added to it), and end in a
    // 404 without a lease while the holder still holds it.
    let (status, lease, body) = leased_get(&s, "k", "fill_lease_ms=30000&wait_ms=1200").await;
    assert_eq!((status, lease), (404, None), "{body}");
    assert!(body.contains("not_found"));
    // A hit is a hit, lease asked or not.
    assert_eq!(s.put_cache("h", "1", "").await.status(), 204);
    assert_eq!(
        leased_get(&s, "h", "fill_lease_ms=10").await,
        (200, None, "1".into())
    );
}

#[tokio::test]
async fn bad_lease_parameters_are_refused() {
    let s = Sidecar::start().await;
    for q in [
        "fill_lease_ms=0",
        "fill_lease_ms=60001",
        "fill_lease_ms=abc",
        "fill_lease_ms=-1",
        "wait_ms=10",
        "fill_lease_ms=10&wait_ms=30001",
        "fill_lease_ms=10&wait_ms=x",
    ] {
        let r = s
            .http
            .get(s.url(&format!("/v1/cache/k?{q}")))
            .send()
            .await
            .unwrap();
        assert_error(r, 400, "invalid_lease").await;
    }
}
