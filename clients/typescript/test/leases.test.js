// Fill leases against the real sidecar: the client's getOrLease and PUT ?lease=, and getCached
// across a fleet: 200 callers on 4 sidecars run the fetcher once; a voided lease is not written
// back; a lease holder that dies is taken over; leases off; over TCP and a unix socket.

import assert from 'node:assert/strict'
import { after, before, describe, test } from 'node:test'

import { PgsidecarError, createCache, createClient } from '../dist/index.js'
import { closedPort, socketPath, startSidecar } from './helpers.js'

const sleep = (ms) => new Promise((r) => setTimeout(r, ms))

for (const transport of ['tcp', 'unix']) {
  const unix = transport === 'unix'
  describe(`fill leases: the client (${transport})`, () => {
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

    test('a miss gets the lease; the next caller waits for the value written with it', async () => {
      const got = await A.getOrLease('l:1', { fillLeaseMs: 10_000, waitMs: 0 })
      assert.equal(got.kind, 'lease')
      assert.ok(got.lease.length >= 16)
      // held: another caller anywhere in the fleet gets no lease of its own
      assert.equal(await B.getOrLease('l:1', { fillLeaseMs: 10_000, waitMs: 0 }), null)
      // a waiter is answered with the value as soon as it is written
      const waiting = B.getOrLease('l:1', { fillLeaseMs: 10_000, waitMs: 20_000 })
      await sleep(200)
      assert.ok(await A.set('l:1', { v: 'filled' }, { lease: got.lease, ttlSeconds: 60 }))
      const answer = await waiting
      assert.equal(answer.kind, 'json')
      assert.deepEqual(answer.value, { v: 'filled' })
      // and a hit is a hit
      assert.deepEqual((await A.getOrLease('l:1', { fillLeaseMs: 1, waitMs: 0 })).value, { v: 'filled' })
    })

    test('a delete or an invalidation voids the lease: the write is refused, nothing written', async () => {
      const del = await A.getOrLease('l:del', { fillLeaseMs: 10_000, waitMs: 0 })
      await B.delete('l:del')
      assert.equal(await A.set('l:del', 'outdated', { lease: del.lease }), null)
      assert.equal(await A.get('l:del'), null)

      const inv = await A.getOrLease('l:inv', { fillLeaseMs: 10_000, waitMs: 0 })
      await B.invalidateTags(['l-tag'])
      assert.equal(await A.set('l:inv', 'outdated', { lease: inv.lease, tags: ['l-tag'] }), null)
      assert.equal(await A.get('l:inv'), null)

      const pre = await A.getOrLease('l:pre', { fillLeaseMs: 10_000, waitMs: 0 })
      await B.deletePrefix('l:pr')
      assert.equal(await A.setBytes('l:pre', 'outdated', { lease: pre.lease }), null)

      // an unknown lease is voided too; a malformed one is bad input
      assert.equal(await A.set('l:unknown', 1, { lease: 'AAAAAAAAAAAAAAAAAAAAAA' }), null)
      await assert.rejects(A.set('l:unknown', 1, { lease: 'not a lease token' }), (e) => e instanceof PgsidecarError && e.code === 'invalid_lease' && e.status === 400)
      // a lease already says which write may happen: no ETag conditions beside it (refused before any request)
      const held = await A.getOrLease('l:cond', { fillLeaseMs: 10_000, waitMs: 0 })
      await assert.rejects(A.set('l:cond', 1, { lease: held.lease, ifNoneMatch: '*' }), (e) => e.code === 'invalid_lease' && e.status === 400)
      await assert.rejects(A.set('l:cond', 1, { lease: held.lease, ifMatch: '"x"' }), (e) => e.code === 'invalid_lease' && e.status === 400)
      // and the lease is still good
      assert.ok(await A.set('l:cond', 1, { lease: held.lease }))
    })

    test('a lapsed lease goes to the next caller', async () => {
      const first = await A.getOrLease('l:lapse', { fillLeaseMs: 200, waitMs: 0 })
      assert.equal(first.kind, 'lease')
      // waits for the holder's lease to lapse, then gets a new one
      const second = await B.getOrLease('l:lapse', { fillLeaseMs: 10_000, waitMs: 20_000 })
      assert.equal(second.kind, 'lease')
      assert.notEqual(second.lease, first.lease)
      assert.equal(await A.set('l:lapse', 'late', { lease: first.lease }), null)
      assert.ok(await B.set('l:lapse', 'fresh', { lease: second.lease }))
      assert.equal(await A.get('l:lapse'), 'fresh')
    })

    test('a sidecar that is down: getOrLease is unreachable, status 0', async () => {
      const down = createClient({ url: unix ? `unix:${socketPath()}` : `http://127.0.0.1:${await closedPort()}` })
      await assert.rejects(down.getOrLease('k', { fillLeaseMs: 1000, waitMs: 1000 }), (e) => e instanceof PgsidecarError && e.code === 'unreachable' && e.status === 0)
      await assert.rejects(down.set('k', 1, { lease: 'AAAAAAAAAAAAAAAAAAAAAA' }), (e) => e instanceof PgsidecarError && e.code === 'unreachable')
    })

    test('bad lease durations are refused before any request', async () => {
      for (const [opts, code] of [
        [{ fillLeaseMs: 0, waitMs: 0 }, 'invalid_lease'],
        [{ fillLeaseMs: 60_001, waitMs: 0 }, 'invalid_lease'],
        [{ fillLeaseMs: 1.5, waitMs: 0 }, 'invalid_lease'],
        [{ fillLeaseMs: 1000, waitMs: -1 }, 'invalid_lease'],
        [{ fillLeaseMs: 1000, waitMs: 30_001 }, 'invalid_lease'],
      ]) {
        await assert.rejects(A.getOrLease('k', opts), (e) => e instanceof PgsidecarError && e.code === code && e.status === 400)
      }
    })
  })

  describe(`fill leases: getCached across a fleet (${transport})`, () => {
    let sidecars
    before(async () => {
      const first = await startSidecar({ unix })
      sidecars = [first, ...(await Promise.all([1, 2, 3].map((i) => startSidecar({ db: first.db, unix: unix && i % 2 === 0 }))))]
    })
    after(async () => {
      await Promise.all(sidecars.map((s) => s.stop()))
    })

    test('200 concurrent callers for one missing key, on 4 sidecars, each its own cache: the fetcher runs once', async () => {
      let calls = 0
      const fetcher = async () => {
        calls++
        await sleep(300)
        return { computed: 'once' }
      }
      // each caller its own cache (no in-process single flight between them): 200 containers
      const results = await Promise.all(
        Array.from({ length: 200 }, (_, i) => createCache({ client: { url: sidecars[i % 4].url } }).getCached('stampede', fetcher, { ttlSeconds: 60 })),
      )
      assert.equal(calls, 1)
      assert.ok(results.every((r) => r.computed === 'once'))
    })

    test('a value invalidated while its fetcher ran is returned, not written back, and not retried', async () => {
      const [a, b] = sidecars
      const B = createClient({ url: b.url })
      const cache = createCache({ client: { url: a.url } })
      let calls = 0
      const value = await cache.getCached(
        'voided',
        async () => {
          calls++
          // meanwhile, on another container, the data changes and the key's tag is invalidated
          await B.invalidateTags(['voided-tag'])
          return 'computed from the old data'
        },
        { tags: ['voided-tag'] },
      )
      assert.equal(value, 'computed from the old data')
      assert.equal(calls, 1)
      assert.equal(await B.get('voided'), null)
      // the next call computes it again, and stores it
      assert.equal(await cache.getCached('voided', () => 'fresh', { tags: ['voided-tag'] }), 'fresh')
      assert.equal(await B.get('voided'), 'fresh')
    })

    test('a lease holder that dies: the others take the lease over when it lapses', async () => {
      const [a, b] = sidecars
      const holder = createCache({ client: { url: a.url }, fillLeaseMs: 500 })
      const other = createCache({ client: { url: b.url } })
      let otherCalls = 0
      let holding
      const leased = new Promise((r) => (holding = r))
      const dying = holder.getCached('dies', async () => {
        holding() // the fetcher runs: the holder has the lease
        await sleep(100)
        throw new Error('the fetcher crashed')
      })
      await leased
      const taken = other.getCached('dies', () => {
        otherCalls++
        return 'from the other'
      })
      await assert.rejects(dying, /crashed/)
      assert.equal(await taken, 'from the other')
      assert.equal(otherCalls, 1)
      assert.equal(await createClient({ url: a.url }).get('dies'), 'from the other')
    })

    test('a wait that runs out: the caller computes and writes without a lease', async () => {
      const [a, b] = sidecars
      const held = await createClient({ url: a.url }).getOrLease('held', { fillLeaseMs: 60_000, waitMs: 0 })
      assert.equal(held.kind, 'lease')
      const cache = createCache({ client: { url: b.url }, leaseWaitMs: 200 })
      assert.equal(await cache.getCached('held', () => 'computed anyway'), 'computed anyway')
      assert.equal(await createClient({ url: a.url }).get('held'), 'computed anyway')
    })

    test('fillLeaseMs 0: no leases, no waiting', async () => {
      const [a, b] = sidecars
      await createClient({ url: a.url }).getOrLease('no-lease', { fillLeaseMs: 60_000, waitMs: 0 })
      const cache = createCache({ client: { url: b.url }, fillLeaseMs: 0, leaseWaitMs: 30_000 })
      const started = Date.now()
      assert.equal(await cache.getCached('no-lease', () => 'at once'), 'at once')
      // (not a timing assertion: a wait would last the whole 30 s)
      assert.ok(Date.now() - started < 25_000)
      assert.throws(() => createCache({ fillLeaseMs: -1 }), (e) => e.code === 'invalid_lease')
      assert.throws(() => createCache({ leaseWaitMs: 30_001 }), (e) => e.code === 'invalid_lease')
      await assert.rejects(cache.getCached('k', () => 1, { fillLeaseMs: 60_001 }), (e) => e.code === 'invalid_lease')
    })
  })
}
