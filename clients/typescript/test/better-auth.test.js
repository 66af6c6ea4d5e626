// pgsidecarStorage (BetterAuth's secondaryStorage) against the real sidecar: values, TTLs, hashed
// keys, and the atomic getAndDelete and increment across two containers (B over a unix socket).

import assert from 'node:assert/strict'
import { createHash } from 'node:crypto'
import { after, before, describe, test } from 'node:test'

import { pgsidecarStorage } from '../dist/better-auth.js'
import { MAX_TTL_SECONDS, createClient } from '../dist/index.js'
import { query, startSidecar } from './helpers.js'

describe('pgsidecarStorage', () => {
  let a
  let b
  let storeA
  let storeB
  before(async () => {
    a = await startSidecar()
    b = await startSidecar({ db: a.db, unix: true }) // a second container of the same fleet, on a unix socket
    storeA = pgsidecarStorage({ client: { url: a.url } })
    storeB = pgsidecarStorage({ client: { url: b.url } })
  })
  after(async () => {
    await a.stop()
    await b.stop()
  })

  test('get, set with a TTL, delete; values are the strings BetterAuth wrote', async () => {
    const token = 'k8W2tQvX1n3YpL0sRz7AaBbCcDdEeFf9'
    const value = JSON.stringify({ session: { id: 's1', token, userId: 'u1' }, user: { name: 'Zoë "Z"' } })
    assert.equal(await storeA.get(token), null)
    await storeA.set(token, value, 3600)
    assert.equal(await storeB.get(token), value) // another container sees it
    await storeB.delete(token)
    assert.equal(await storeA.get(token), null)
    await storeA.delete(token) // already gone: fine
    await storeA.set('plain', 'not json at all ✓', 60)
    assert.equal(await storeA.get('plain'), 'not json at all ✓')
    await storeA.set('empty', '', 60)
    assert.equal(await storeA.get('empty'), '')
  })

  test('keys are hashed: no token in the database, stored as text/plain', async () => {
    const token = 'SECRETtokenVALUE0123456789abcdef'
    await storeA.set(token, 'session json', 600)
    await storeA.set(`active-sessions-user-7`, '[]', 600)
    const rows = await query(a.db, 'SELECT key FROM pgsidecar.cache')
    assert.ok(rows.length >= 2)
    for (const { key } of rows) {
      assert.ok(!key.includes(token) && !key.includes('user-7'), key)
      assert.match(key, /^better-auth:[0-9a-f]{64}$/)
    }
    const entry = await createClient({ url: a.url }).getEntry(rows[0].key)
    assert.match(entry.contentType, /^text\/plain/)
  })

  test('TTLs: as given (rounded up), and the longest the API allows when absent', async () => {
    const client = createClient({ url: a.url })
    // the documented key scheme: prefix + SHA-256 of BetterAuth's key, in hex
    const left = async (k) => {
      const entry = await client.getEntry(`better-auth:${createHash('sha256').update(k).digest('hex')}`)
      return (entry.expiresAt.getTime() - Date.now()) / 1000
    }
    await storeA.set('ttl:given', 'v', 120.2)
    let s = await left('ttl:given')
    assert.ok(s > 100 && s <= 122, `${s}`)
    await storeA.set('ttl:none', 'v')
    s = await left('ttl:none')
    assert.ok(s > MAX_TTL_SECONDS - 120 && s <= MAX_TTL_SECONDS + 1, `${s}`)
    await storeA.set('ttl:zero', 'v', 0)
    s = await left('ttl:zero')
    assert.ok(s > MAX_TTL_SECONDS - 120, `${s}`)
    await storeA.set('ttl:huge', 'v', 10 * MAX_TTL_SECONDS)
    s = await left('ttl:huge')
    assert.ok(s <= MAX_TTL_SECONDS + 1, `${s}`)
    // already expired: nothing stored
    await storeA.set('ttl:past', 'v', -5)
    assert.equal(await storeA.get('ttl:past'), null)
  })

  test('getAndDelete: of many concurrent takers on two containers, exactly one gets the value', async () => {
    for (let round = 0; round < 3; round++) {
      const key = `verification:code-${round}`
      await storeA.set(key, `payload-${round}`, 600)
      const takers = Array.from({ length: 10 }, (_, i) => (i % 2 ? storeA : storeB).getAndDelete(key))
      const got = await Promise.all(takers)
      assert.deepEqual(
        got.filter((v) => v !== null),
        [`payload-${round}`],
      )
      assert.equal(await storeA.get(key), null)
    }
    assert.equal(await storeA.getAndDelete('never-there'), null)
  })

  test('increment: concurrent increments on two containers count every one', async () => {
    const key = 'rate-limit:203.0.113.7:/sign-in/email'
    const n = 20
    const results = await Promise.all(Array.from({ length: n }, (_, i) => (i % 2 ? storeA : storeB).increment(key, 60)))
    assert.deepEqual(
      [...results].sort((x, y) => x - y),
      Array.from({ length: n }, (_, i) => i + 1),
    )
    assert.equal(await storeA.get(key), String(n))
  })

  test('increment keeps the window set at creation', async () => {
    const key = 'rate-limit:window'
    assert.equal(await storeA.increment(key, 2), 1)
    assert.equal(await storeB.increment(key, 2), 2)
    // later increments do not extend it: after the window, counting starts again
    await new Promise((r) => setTimeout(r, 3500))
    assert.equal(await storeA.increment(key, 2), 1)
  })
})
