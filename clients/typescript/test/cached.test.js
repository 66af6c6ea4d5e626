// getCached against the real sidecar: hits and misses, TTL and tags, single flight, and the
// fail-open path when the sidecar is unreachable.

import assert from 'node:assert/strict'
import { after, before, describe, test } from 'node:test'

import { PgsidecarError, createCache, createClient, getCached } from '../dist/index.js'
import { closedPort, socketPath, startSidecar } from './helpers.js'

for (const transport of ['tcp', 'unix']) describe(`getCached (${transport})`, () => {
  let sidecar
  let client
  before(async () => {
    sidecar = await startSidecar({ unix: transport === 'unix' })
    client = createClient({ url: sidecar.url })
  })
  after(() => sidecar.stop())

  test('a miss calls the fetcher and stores its result; a hit does not call it', async () => {
    const cache = createCache({ client })
    let calls = 0
    const fetcher = async () => {
      calls++
      return { n: 42, list: [1, 'two'] }
    }
    assert.deepEqual(await cache.getCached('gc:basic', fetcher), { n: 42, list: [1, 'two'] })
    assert.deepEqual(await cache.getCached('gc:basic', fetcher), { n: 42, list: [1, 'two'] })
    assert.equal(calls, 1)
    // stored for the guide's default hour, as JSON another language can read
    const entry = await client.getEntry('gc:basic')
    assert.equal(entry.kind, 'json')
    const ttl = (entry.expiresAt.getTime() - Date.now()) / 1000
    assert.ok(ttl > 3500 && ttl <= 3601, `ttl ${ttl}`)
  })

  test('ttlSeconds and tags reach the sidecar; invalidating a tag makes the next call fetch', async () => {
    const cache = createCache({ client })
    let calls = 0
    const fetcher = () => ++calls
    assert.equal(await cache.getCached('gc:tagged', fetcher, { ttlSeconds: 120, tags: ['gc-products'] }), 1)
    const ttl = ((await client.getEntry('gc:tagged')).expiresAt.getTime() - Date.now()) / 1000
    assert.ok(ttl > 60 && ttl <= 121, `ttl ${ttl}`)
    assert.equal(await cache.getCached('gc:tagged', fetcher, { tags: ['gc-products'] }), 1)
    await client.invalidateTags(['gc-products'])
    assert.equal(await cache.getCached('gc:tagged', fetcher, { tags: ['gc-products'] }), 2)
  })

  test('another container (another client, same database) reads what this one stored', async () => {
    const other = await startSidecar({ db: sidecar.db, unix: transport === 'tcp' })
    try {
      await createCache({ client }).getCached('gc:shared', () => 'from A')
      const fromB = await createCache({ client: { url: other.url } }).getCached('gc:shared', () => 'B computed its own')
      assert.equal(fromB, 'from A')
    } finally {
      await other.stop()
    }
  })

  test('50 concurrent calls for one missing key run the fetcher once', async () => {
    const cache = createCache({ client })
    let calls = 0
    const fetcher = async () => {
      calls++
      await new Promise((r) => setTimeout(r, 100))
      return { value: 'computed once' }
    }
    const results = await Promise.all(Array.from({ length: 50 }, () => cache.getCached('gc:flight', fetcher)))
    assert.equal(calls, 1)
    for (const r of results) assert.deepEqual(r, { value: 'computed once' })
    // different keys do not wait for each other
    const [a, b] = await Promise.all([cache.getCached('gc:k1', () => 'one'), cache.getCached('gc:k2', () => 'two')])
    assert.deepEqual([a, b], ['one', 'two'])
  })

  test('a fetcher that fails rejects every waiter, caches nothing, and the next call retries', async () => {
    const cache = createCache({ client })
    let calls = 0
    const failing = async () => {
      calls++
      await new Promise((r) => setTimeout(r, 50))
      throw new Error('database down')
    }
    const settled = await Promise.allSettled(Array.from({ length: 5 }, () => cache.getCached('gc:fails', failing)))
    assert.equal(calls, 1)
    assert.ok(settled.every((s) => s.status === 'rejected' && s.reason.message === 'database down'))
    assert.equal(await client.get('gc:fails'), null)
    assert.equal(await cache.getCached('gc:fails', () => 'recovered'), 'recovered')
  })

  test('values that cannot be stored are returned, with a warning', async () => {
    const warnings = []
    const cache = createCache({ client, warn: (m) => warnings.push(m) })
    assert.equal(await cache.getCached('gc:undef', () => undefined), undefined)
    const big = 'x'.repeat(1_100_000)
    assert.equal(await cache.getCached('gc:big', () => big), big)
    assert.equal(await cache.getCached('gc:big', () => big), big)
    assert.equal(warnings.length, 2, warnings.join('\n'))
    assert.ok(warnings.every((w) => !w.includes('gc:') && !w.includes('xxxx')))
  })

  test('bad input is refused', async () => {
    const cache = createCache({ client })
    await assert.rejects(cache.getCached('_reserved', () => 1), (e) => e instanceof PgsidecarError && e.code === 'invalid_key')
    await assert.rejects(cache.getCached('k', () => 1, { ttlSeconds: 0 }), (e) => e.code === 'invalid_ttl')
    await assert.rejects(cache.getCached('k', () => 1, { tags: ['a,b'] }), (e) => e.code === 'invalid_tag')
    await assert.rejects(cache.getCached('k', 'not a function'), TypeError)
    assert.throws(() => createCache({ client, onUnavailable: 'sometimes' }), TypeError)
  })
})

describe('getCached with the sidecar unreachable', () => {
  test('fails open: the fetcher runs, one warning per outage, naming neither key nor value', async () => {
    const warnings = []
    const cache = createCache({ client: { url: `http://127.0.0.1:${await closedPort()}` }, warn: (m) => warnings.push(m) })
    let calls = 0
    for (let i = 0; i < 3; i++) {
      assert.equal(await cache.getCached('gc:secret-key', () => `secret-value-${++calls}`), `secret-value-${calls}`)
    }
    assert.equal(calls, 3)
    assert.equal(warnings.length, 1)
    assert.match(warnings[0], /unavailable/)
    assert.ok(!warnings[0].includes('secret'))
  })

  test('fails open over a unix socket as over TCP', async () => {
    const warnings = []
    const cache = createCache({ client: { url: `unix:${socketPath()}` }, warn: (m) => warnings.push(m) })
    assert.equal(await cache.getCached('gc:k', () => 'computed'), 'computed')
    assert.equal(warnings.length, 1)
    assert.match(warnings[0], /unreachable/)
  })

  test('single flight holds while failing open', async () => {
    const cache = createCache({ client: { url: `http://127.0.0.1:${await closedPort()}` }, warn: () => {} })
    let calls = 0
    const results = await Promise.all(
      Array.from({ length: 20 }, () =>
        cache.getCached('gc:down', async () => {
          calls++
          await new Promise((r) => setTimeout(r, 50))
          return 'v'
        }),
      ),
    )
    assert.equal(calls, 1)
    assert.ok(results.every((r) => r === 'v'))
  })

  test("onUnavailable: 'throw' rejects instead, without calling the fetcher", async () => {
    const cache = createCache({ client: { url: `http://127.0.0.1:${await closedPort()}` }, onUnavailable: 'throw' })
    let calls = 0
    await assert.rejects(
      cache.getCached('k', () => ++calls),
      (e) => e instanceof PgsidecarError && e.code === 'unreachable',
    )
    assert.equal(calls, 0)
  })

  test('one warning per outage: after the sidecar is back, the next outage warns again', async () => {
    const sidecar = await startSidecar()
    const warnings = []
    const cache = createCache({ client: { url: sidecar.url, timeoutMs: 2000 }, warn: (m) => warnings.push(m) })
    assert.equal(await cache.getCached('a', () => 1), 1)
    await sidecar.stop()
    assert.equal(await cache.getCached('b', () => 2), 2)
    assert.equal(await cache.getCached('c', () => 3), 3)
    assert.equal(warnings.length, 1)
    // back on the same address (same database): served again, no new warning
    const again = await startSidecar({ db: sidecar.db, env: { PGSIDECAR_SERVER__DATA_LISTEN: new URL(sidecar.url).host } })
    assert.equal(await cache.getCached('a', () => 'not called'), 1)
    assert.equal(warnings.length, 1)
    await again.stop()
    assert.equal(await cache.getCached('d', () => 4), 4)
    assert.equal(warnings.length, 2)
  })

  test('the default getCached reads PGSIDECAR_URL at first use', async () => {
    const sidecar = await startSidecar()
    const saved = process.env.PGSIDECAR_URL
    process.env.PGSIDECAR_URL = sidecar.url
    try {
      assert.equal(await getCached('default:k', () => 'v'), 'v')
      assert.equal(await createClient({ url: sidecar.url }).get('default:k'), 'v')
    } finally {
      if (saved === undefined) delete process.env.PGSIDECAR_URL
      else process.env.PGSIDECAR_URL = saved
      await sidecar.stop()
    }
  })
})
