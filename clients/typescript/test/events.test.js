// subscribe() against the real sidecar: the change feed of a fleet of two sidecars on one database
// (changes made through B reach a subscriber on A, by PostgreSQL notifications), every event type,
// the filters, a reset after the sidecar's listening connection is killed and after the client's
// own connection is lost, over TCP and over a unix socket.

import assert from 'node:assert/strict'
import { after, before, describe, test } from 'node:test'

import { createClient } from '../dist/index.js'
import { closedPort, eventually, query, socketPath, startSidecar } from './helpers.js'

/** Collects a subscription's events in the background; `next()` waits (generously) for the next one. */
function collect(subscription) {
  const queue = []
  const waiters = []
  const done = (async () => {
    for await (const event of subscription) {
      const w = waiters.shift()
      if (w) w(event)
      else queue.push(event)
    }
  })()
  return {
    done,
    next(ms = 20_000) {
      if (queue.length > 0) return Promise.resolve(queue.shift())
      return new Promise((resolve, reject) => {
        const waiter = (e) => {
          clearTimeout(timer)
          resolve(e)
        }
        // a waiter that gave up leaves the queue, or it would swallow the next event
        const timer = setTimeout(() => {
          waiters.splice(waiters.indexOf(waiter), 1)
          reject(new Error(`no event within ${ms} ms`))
        }, ms)
        waiters.push(waiter)
      })
    },
    pending: () => queue.length,
    close: () => subscription.close(),
  }
}

/** Readiness markers: keys with `ready` in them, skipped by `nextReal`. */
const isMarker = (e) => e.type === 'cache.put' && e.key.includes('ready')

/**
 * Waits until the subscription is live on the sidecar: writes marker keys (`prefix` + a number;
 * the prefix must contain `ready`) through `writer` until one arrives: the subscription's
 * request may reach the sidecar after the first marker's commit. A `reset` before the marker
 * is skipped: a sidecar sends one when its listening connection (re)connects, and a sidecar
 * that has just started may connect it after the subscriber came.
 */
async function ready(events, writer, prefix = 'ready:') {
  for (let i = 0; ; i++) {
    await writer.set(`${prefix}${i}`, 1)
    let got = await events.next(1000).catch(() => null)
    while (got?.type === 'reset') got = await events.next(1000).catch(() => null)
    if (got !== null && isMarker(got)) return // later markers may follow: nextReal skips them
    if (got !== null) throw new Error(`an event before the marker: ${JSON.stringify(got)}`)
    if (i > 30) throw new Error('the subscription never became live')
  }
}

/** The next event that is not a readiness marker. */
async function nextReal(events) {
  for (;;) {
    const e = await events.next()
    if (!isMarker(e)) return e
  }
}

for (const transport of ['tcp', 'unix']) {
  const unix = transport === 'unix'
  describe(`subscribe: the change feed of the real sidecar (${transport})`, () => {
    let a
    let b
    let A
    let B
    before(async () => {
      a = await startSidecar({ unix })
      b = await startSidecar({ db: a.db })
      A = createClient({ url: a.url })
      B = createClient({ url: b.url })
    })
    after(async () => {
      await a.stop()
      await b.stop()
    })

    test('every event type, for changes made through another sidecar of the fleet', async () => {
      const events = collect(A.subscribe())
      try {
        await ready(events, B)
        await B.set('ev:1', { v: 1 }, { tags: ['t1', 't2'] })
        assert.deepEqual(await nextReal(events), { type: 'cache.put', key: 'ev:1', tags: ['t1', 't2'] })
        await B.delete('ev:1')
        assert.deepEqual(await nextReal(events), { type: 'cache.delete', key: 'ev:1' })
        // (deleting what is not there changes nothing: no event; so something to delete first)
        await B.set('ev:2', 2)
        assert.deepEqual(await nextReal(events), { type: 'cache.put', key: 'ev:2', tags: [] })
        await B.deletePrefix('ev:')
        assert.deepEqual(await nextReal(events), { type: 'cache.delete', prefix: 'ev:' })
        await B.invalidateTags(['t1'])
        assert.deepEqual(await nextReal(events), { type: 'cache.invalidate', tags: ['t1'], expire_seconds: 0 })
        await B.invalidateTags(['t2'], { expireSeconds: 60 })
        assert.deepEqual(await nextReal(events), { type: 'cache.invalidate', tags: ['t2'], expire_seconds: 60 })

        const s1 = await B.createSession({ user_id: 'u-ev' })
        await B.revokeSession(s1.token)
        assert.deepEqual(await nextReal(events), { type: 'session.revoke', user_id: 'u-ev', session_id: s1.session.id })
        const s2 = await B.createSession({ user_id: 'u-ev' })
        await B.revokeUserSession('u-ev', s2.session.id)
        assert.deepEqual(await nextReal(events), { type: 'session.revoke', user_id: 'u-ev', session_id: s2.session.id })
        await B.createSession({ user_id: 'u-ev' })
        await B.revokeUserSessions('u-ev')
        assert.deepEqual(await nextReal(events), { type: 'session.revoke', user_id: 'u-ev', all: true })
      } finally {
        events.close()
        await events.done
      }
    })

    test('filters: cachePrefix, tags and userId', async () => {
      const byPrefix = collect(A.subscribe({ cachePrefix: 'product:' }))
      const byTag = collect(A.subscribe({ tags: ['red', 'blue'] }))
      const byUser = collect(A.subscribe({ userId: 'alice' }))
      const both = collect(A.subscribe({ cachePrefix: 'product:', tags: ['red'] }))
      try {
        await ready(byPrefix, B, 'product:ready:')
        await ready(byTag, { set: (k, v) => B.set(k, v, { tags: ['red'] }) }, 'tag-ready:')
        await ready(both, { set: (k, v) => B.set(k, v, { tags: ['red'] }) }, 'product:both-ready:')
        // byUser: session events only; ready when alice's revocation arrives
        for (let i = 0; ; i++) {
          const s = await B.createSession({ user_id: 'alice' })
          await B.revokeSession(s.token)
          const e = await byUser.next(1000).catch(() => null)
          if (e) break
          if (i > 30) throw new Error('the userId subscription never became live')
        }

        // changes none of the filters asks for (but the same kinds), then one for each
        const bob = await B.createSession({ user_id: 'bob' })
        await B.revokeSession(bob.token)
        await B.set('order:1', 1, { tags: ['green'] })
        await B.invalidateTags(['green'])
        await B.set('product:1', 1, { tags: ['green'] })
        await B.set('order:2', 2, { tags: ['blue'] })
        await B.set('product:2', 2, { tags: ['red'] })
        const alice = await B.createSession({ user_id: 'alice' })
        await B.revokeSession(alice.token)

        assert.deepEqual(await nextReal(byPrefix), { type: 'cache.put', key: 'product:1', tags: ['green'] })
        assert.deepEqual(await nextReal(byPrefix), { type: 'cache.put', key: 'product:2', tags: ['red'] })
        assert.deepEqual(await nextReal(byTag), { type: 'cache.put', key: 'order:2', tags: ['blue'] })
        assert.deepEqual(await nextReal(byTag), { type: 'cache.put', key: 'product:2', tags: ['red'] })
        assert.deepEqual(await nextReal(both), { type: 'cache.put', key: 'product:2', tags: ['red'] })
        // (readiness revocations of alice may still be on their way)
        let e
        do e = await byUser.next()
        while (e.session_id !== alice.session.id && e.user_id === 'alice')
        assert.deepEqual(e, { type: 'session.revoke', user_id: 'alice', session_id: alice.session.id })
      } finally {
        for (const s of [byPrefix, byTag, byUser, both]) s.close()
        await Promise.all([byPrefix.done, byTag.done, byUser.done, both.done])
      }
    })

    test('a reset when the sidecar’s listening connection is killed, then events again', async () => {
      const events = collect(A.subscribe({ cachePrefix: 'kill:' }))
      try {
        await ready(events, B, 'kill:ready:')
        // the sidecars' listening connections (one each, outside their pools)
        const killed = await query(
          a.db,
          "SELECT pg_terminate_backend(pid) AS ok FROM pg_stat_activity WHERE datname = current_database() AND application_name = 'pgsidecar-listen'",
        )
        assert.ok(killed.length >= 1, 'found the listening connections')
        assert.deepEqual(await nextReal(events), { type: 'reset' })
        // listening again: changes flow as before
        await ready(events, B, 'kill:ready-again:')
        await B.set('kill:after', 1)
        assert.deepEqual(await nextReal(events), { type: 'cache.put', key: 'kill:after', tags: [] })
      } finally {
        events.close()
        await events.done
      }
    })

    test("a reset after the client's own connection is lost (the sidecar restarted), and the error reported", async () => {
      const first = await startSidecar({ db: a.db, unix })
      const errors = []
      const client = createClient({ url: first.url })
      const events = collect(client.subscribe({ cachePrefix: 'restart:', onError: (e) => errors.push(e.code), retryMinMs: 50, retryMaxMs: 500 }))
      let second
      try {
        await ready(events, B, 'restart:ready:')
        await first.stop()
        // the same address again
        const listen = unix ? { unix: first.url.slice('unix:'.length) } : { env: { PGSIDECAR_SERVER__DATA_LISTEN: new URL(first.url).host } }
        second = await startSidecar({ db: a.db, ...listen })
        assert.deepEqual(await nextReal(events), { type: 'reset' })
        assert.ok(errors.length >= 1 && errors.every((c) => c === 'unreachable' || c === 'timeout'), errors.join())
        await ready(events, B, 'restart:ready-again:')
      } finally {
        events.close()
        await events.done
        await first.stop()
        await second?.stop()
      }
    })

    test('the callback form, and errors no reconnection fixes', async () => {
      const seen = []
      const sub = A.subscribe({ cachePrefix: 'cb:' }, (e) => {
        seen.push(e)
      })
      for (let i = 0; !seen.some((e) => e.key === 'cb:x'); i++) {
        await B.set('cb:x', i)
        await new Promise((r) => setTimeout(r, 200))
        assert.ok(i < 100, 'the callback never saw the change')
      }
      sub.close()
      await sub.done

      // a tag the API refuses is refused before any request; a user id it refuses, by the sidecar
      assert.throws(() => A.subscribe({ tags: [''] }), (e) => e.code === 'invalid_tags')
      const tooLong = A.subscribe({ cachePrefix: 'x'.repeat(600) }, () => {})
      await assert.rejects(tooLong.done, (e) => e.code === 'invalid_prefix' && e.status === 400)
      const badUser = A.subscribe({ userId: 'a\u0000b' }, () => {})
      await assert.rejects(badUser.done, (e) => e.code === 'invalid_user_id' && e.status === 400)
    })

    test('a sidecar that is down: reported to onError, retried, and events once it is up', async () => {
      const errors = []
      const listen = unix ? { unix: socketPath() } : { env: { PGSIDECAR_SERVER__DATA_LISTEN: `127.0.0.1:${await closedPort()}` } }
      const url = unix ? `unix:${listen.unix}` : `http://${listen.env.PGSIDECAR_SERVER__DATA_LISTEN}`
      const events = collect(createClient({ url }).subscribe({ cachePrefix: 'down:', onError: (e) => errors.push(e.code), retryMinMs: 50, retryMaxMs: 300 }))
      let s
      try {
        // nothing listens there yet: the subscription keeps trying
        assert.ok(await eventually(() => errors.length >= 2), 'onError heard of the failed attempts')
        assert.ok(errors.every((c) => c === 'unreachable'), errors.join())
        s = await startSidecar({ db: a.db, ...listen })
        await ready(events, B, 'down:ready:')
        await B.set('down:1', 1)
        assert.deepEqual(await nextReal(events), { type: 'cache.put', key: 'down:1', tags: [] })
      } finally {
        events.close()
        await events.done
        await s?.stop()
      }
    })

    test('a sidecar with notifications off (transaction-mode pooler, no listen_url): events_unavailable, not retried', async () => {
      const s = await startSidecar({ db: a.db, unix, env: { PGSIDECAR_DATABASE__POOLER: 'transaction' } })
      try {
        const errors = []
        const sub = createClient({ url: s.url }).subscribe({ onError: (e) => errors.push(e.code) }, () => {})
        await assert.rejects(sub.done, (e) => e.code === 'events_unavailable' && e.status === 503)
        assert.deepEqual(errors, [])
      } finally {
        await s.stop()
      }
    })

    test('with a token: refused without it, served with it', async () => {
      const token = 'a-long-enough-shared-secret'
      const s = await startSidecar({ db: a.db, unix, env: { PGSIDECAR_SERVER__AUTH_TOKEN: token } })
      try {
        const none = createClient({ url: s.url, token: '' }).subscribe({}, () => {})
        await assert.rejects(none.done, (e) => e.code === 'unauthorized' && e.status === 401)
        const events = collect(createClient({ url: s.url, token }).subscribe({ cachePrefix: 'auth:ready:' }))
        await ready(events, B, 'auth:ready:')
        events.close()
        await events.done
      } finally {
        await s.stop()
      }
    })
  })
}
