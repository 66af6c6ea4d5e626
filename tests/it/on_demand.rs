//! Notifications on demand: writers notify only while some sidecar of the fleet is registered
//! (a near cache on, a change-feed subscriber, a lease waiter). A default sidecar's writes send
//! nothing; a second sidecar with a near cache makes them notify; the registration goes with
//! the last subscriber.

use std::time::Duration;

use sqlx::Executor;
use sqlx::postgres::PgListener;

use crate::events::Feed;
use crate::helpers::*;

/// Rows of the registration table.
async fn listeners(s: &Sidecar) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM pgsidecar.listeners WHERE until > now()")
        .fetch_one(&mut s.sql().await)
        .await
        .unwrap()
}

/// Waits (generously) until `s` reports its registration as `want` (1: registered).
async fn wait_registered(s: &Sidecar, want: f64) {
    for _ in 0..600 {
        if metric(&scrape(s).await, "pgsidecar_notifications_registered", &[]) == Some(want) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("pgsidecar_notifications_registered never became {want}");
}

#[tokio::test]
async fn a_default_sidecar_writes_without_notifying_until_a_sidecar_needs_it() {
    let s = Sidecar::start().await;
    assert!(
        s.logs.wait_for(
            "listening for change notifications",
            Duration::from_secs(30)
        ),
        "{:?}",
        s.logs.lines()
    );
    let mut l = PgListener::connect(&s.db).await.unwrap();
    l.listen("pgsidecar").await.unwrap();
    // Every kind of write a trigger watches.
    assert_eq!(s.put_cache("a", "1", "?tags=t").await.status(), 204);
    assert_eq!(s.put_cache("a", "2", "?tags=t").await.status(), 204);
    let r = s.http.delete(s.url("/v1/cache/a")).send().await.unwrap();
    assert_eq!(r.status(), 204);
    let r = s
        .post_json("/v1/cache/_invalidate", &serde_json::json!({"tags": ["t"]}))
        .await;
    assert!(r.status().is_success(), "{}", r.status());
    let (token, _) = s.create_session(serde_json::json!({"user_id": "u"})).await;
    let r = s
        .http
        .delete(s.url(&format!("/v1/sessions/{token}")))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{}", r.status());
    let got = tokio::time::timeout(Duration::from_secs(3), l.recv()).await;
    assert!(got.is_err(), "a notification nobody needed: {got:?}");
    assert_eq!(listeners(&s).await, 0);
    assert_eq!(
        metric(&scrape(&s).await, "pgsidecar_notifications_registered", &[]),
        Some(0.0)
    );

    // A sidecar with a near cache registers; from then on the default one's writes notify.
    let near = Sidecar::builder()
        .db(&s.db)
        .env("PGSIDECAR_CACHE__NEAR__ENABLED", "true")
        .start()
        .await;
    wait_registered(&near, 1.0).await;
    assert_eq!(listeners(&s).await, 1);
    assert_eq!(s.put_cache("b", "1", "").await.status(), 204);
    let n = tokio::time::timeout(Duration::from_secs(20), l.recv())
        .await
        .expect("no notification once a sidecar needs them")
        .unwrap();
    assert!(n.payload().contains("\"b\""), "{}", n.payload());
}

#[tokio::test]
async fn the_registration_goes_with_the_last_subscriber() {
    let s = Sidecar::start().await;
    let other = Sidecar::builder().db(&s.db).start().await;
    assert_eq!(listeners(&s).await, 0);
    let mut feed = Feed::open(&s, "").await;
    // Answered with its head only once registered: a write through another sidecar is in it.
    assert_eq!(listeners(&s).await, 1);
    assert_eq!(other.put_cache("k", "1", "").await.status(), 204);
    let e = feed.next_within(Duration::from_secs(20)).await;
    assert_eq!(e.0, "cache.put", "{e:?}");
    assert_eq!(e.1["key"], "k");
    drop(feed);
    // The row goes (within a renewal period or so) and writes stop notifying.
    for _ in 0..600 {
        if listeners(&s).await == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(listeners(&s).await, 0);
    wait_registered(&s, 0.0).await;
    let mut l = PgListener::connect(&s.db).await.unwrap();
    l.listen("pgsidecar").await.unwrap();
    assert_eq!(other.put_cache("k", "2", "").await.status(), 204);
    let got = tokio::time::timeout(Duration::from_secs(3), l.recv()).await;
    assert!(got.is_err(), "a notification nobody needed: {got:?}");
    // A new subscriber registers again.
    let mut feed = Feed::open(&s, "?cache_prefix=k").await;
    assert_eq!(other.put_cache("k", "3", "").await.status(), 204);
    let e = feed.next_within(Duration::from_secs(20)).await;
    assert_eq!(e.0, "cache.put", "{e:?}");
}

/// A sidecar whose registration cannot be renewed (here: the table locked against writes, as a
/// database it cannot reach would do) stops counting on notifications once it lapses: writers
/// whose triggers see no live row do not notify, so its near cache must not serve what it held.
#[tokio::test]
async fn a_registration_that_lapsed_closes_the_near_cache() {
    let a = crate::near::near(Sidecar::builder()).start().await;
    let b = Sidecar::builder().db(&a.db).start().await;
    assert_eq!(b.put_cache("k", "1", "").await.status(), 204);
    assert_eq!(crate::near::until_near(&a, "k").await, "1");
    // Renewals block (and time out); reads of the table, the triggers' check, do not.
    let mut lock = b
        .hold_lock("LOCK TABLE pgsidecar.listeners IN EXCLUSIVE MODE")
        .await;
    let mut expired = false;
    for _ in 0..900 {
        if listeners(&b).await == 0 {
            expired = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(expired, "the row was renewed through the lock");
    // Not announced: nobody is registered.
    assert_eq!(b.put_cache("k", "2", "").await.status(), 204);
    for _ in 0..20 {
        let (status, body, near) = crate::near::get(&a, "k").await;
        assert_eq!((status, body.as_str(), near), (200, "2", false));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        a.logs
            .wait_for("registration lapsed", Duration::from_secs(20)),
        "{:?}",
        a.logs.lines()
    );
    // Renewed again: served from memory again, the new value.
    lock.execute("ROLLBACK").await.unwrap();
    assert_eq!(crate::near::until_near(&a, "k").await, "2");
}
