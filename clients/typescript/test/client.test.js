// The client against the real sidecar and PostgreSQL: every route, bytes, conditional requests,
// tag records, error mapping, timeouts and an unreachable sidecar; each over TCP and over a unix
// socket (`unix:/path`), with the same answers.

import assert from 'node:assert/strict'
import { after, before, describe, test } from 'node:test'
import { inspect } from 'node:util'

import { MAX_TTL_SECONDS, PgsidecarError, createClient, isUnavailable } from '../dist/index.js'
import { closedPort, silentServer, socketPath, startSidecar } from './helpers.js'

/** Asserts that `promise` rejects with a PgsidecarError of this code and status. */
async function rejectsWith(promise, code, status) {
  await assert.rejects(promise, (err) => {
    assert.ok(err instanceof PgsidecarError, `expected a PgsidecarError, got ${err}`)
    assert.equal(err.code, code)
    assert.equal(err.status, status)
    return true
  })
}

describe('createClient', () => {
  test('defaults to PGSIDECAR_URL, else 127.0.0.1:7070, and reads PGSIDECAR_TOKEN', () => {
    const saved = { url: process.env.PGSIDECAR_URL, token: process.env.PGSIDECAR_TOKEN }
    try {
      delete process.env.PGSIDECAR_URL
      assert.equal(createClient().url, 'http://127.0.0.1:7070')
      process.env.PGSIDECAR_URL = 'http://127.0.0.1:9999/'
      process.env.PGSIDECAR_TOKEN = 'a-secret-token-of-some-length'
      const c = createClient()
      assert.equal(c.url, 'http://127.0.0.1:9999')
      assert.equal(createClient({ url: 'http://10.0.0.1:1' }).url, 'http://10.0.0.1:1')
      // the token never shows in a printed or serialized client
      assert.ok(!inspect(c).includes('a-secret-token'))
      assert.ok(!JSON.stringify(c).includes('a-secret-token'))
    } finally {
      for (const [k, v] of [['PGSIDECAR_URL', saved.url], ['PGSIDECAR_TOKEN', saved.token]]) {
        if (v === undefined) delete process.env[k]
        else process.env[k] = v
      }
    }
  })

  test('refuses a URL that is not http(s) or unix: and a timeout that is not positive', () => {
    assert.throws(() => createClient({ url: 'not a url' }), TypeError)
    assert.throws(() => createClient({ url: 'ftp://127.0.0.1/' }), TypeError)
    assert.throws(() => createClient({ url: 'unix:' }), TypeError)
    assert.throws(() => createClient({ url: 'http://127.0.0.1:1', timeoutMs: 0 }), TypeError)
    assert.throws(() => createClient({ url: 'http://127.0.0.1:1', timeoutMs: Number.NaN }), TypeError)
    // a custom fetch would reach whatever listens on TCP localhost instead of the socket
    assert.throws(() => createClient({ url: 'unix:/tmp/x.sock', fetch }), TypeError)
  })

  test('a unix: URL, from the option or PGSIDECAR_URL, is kept as it is', () => {
    const saved = process.env.PGSIDECAR_URL
    try {
      process.env.PGSIDECAR_URL = 'unix:/run/pgsidecar/data.sock'
      assert.equal(createClient().url, 'unix:/run/pgsidecar/data.sock')
      assert.equal(createClient({ url: 'unix:relative/data.sock' }).url, 'unix:relative/data.sock')
      assert.equal(JSON.stringify(createClient({ token: 'secret-token-xyz' })), '{"url":"unix:/run/pgsidecar/data.sock","timeoutMs":5000}')
    } finally {
      if (saved === undefined) delete process.env.PGSIDECAR_URL
      else process.env.PGSIDECAR_URL = saved
    }
  })
})

for (const transport of ['tcp', 'unix']) {
const unix = transport === 'unix'

describe(`sessions (${transport})`, () => {
  let sidecar
  let c
  before(async () => {
    sidecar = await startSidecar({ unix })
    c = createClient({ url: sidecar.url })
  })
  after(() => sidecar.stop())

  test('create, validate (token in the body), update, list, revoke', async () => {
    assert.ok(c.url.startsWith(unix ? 'unix:/' : 'http://127.0.0.1:'), c.url)
    const { token, session } = await c.createSession({
      user_id: 'user "42" ✓',
      ttl_seconds: 3600,
      ip_address: '203.0.113.7',
      user_agent: 'node:test',
      data: { role: 'admin' },
    })
    assert.equal(token.length, 43)
    assert.equal(session.user_id, 'user "42" ✓')
    assert.deepEqual(session.data, { role: 'admin' })

    const valid = await c.validateSession(token)
    assert.equal(valid.id, session.id)
    assert.equal(valid.ip_address, '203.0.113.7')

    const updated = await c.updateSession(token, { role: 'admin', cart: 3 })
    assert.deepEqual(updated.data, { role: 'admin', cart: 3 })

    const second = await c.createSession({ user_id: 'user "42" ✓' })
    const list = await c.listUserSessions('user "42" ✓')
    assert.deepEqual(list.map((s) => s.id).sort(), [session.id, second.session.id].sort())

    await c.revokeSession(token)
    assert.equal(await c.validateSession(token), null)
    assert.equal(await c.updateSession(token, {}), null)
    await c.revokeSession(token) // already gone: still fine
    assert.notEqual(await c.validateSession(second.token), null)
  })

  test('unknown and malformed tokens validate to null', async () => {
    assert.equal(await c.validateSession('x'.repeat(43)), null)
    assert.equal(await c.validateSession('not a token at all'), null)
    assert.equal(await c.validateSession(''), null)
  })

  test('revoke all but one, and one by its id', async () => {
    const a = await c.createSession({ user_id: 'u-many' })
    const b = await c.createSession({ user_id: 'u-many' })
    const d = await c.createSession({ user_id: 'u-many' })
    assert.equal(await c.revokeUserSessions('u-many', { except: a.session.id }), 2)
    assert.equal(await c.validateSession(b.token), null)
    assert.equal(await c.validateSession(d.token), null)

    await c.revokeUserSession('u-many', a.session.id)
    assert.equal(await c.validateSession(a.token), null)
    await c.revokeUserSession('u-many', a.session.id) // already gone: still fine
    await rejectsWith(c.revokeUserSession('u-many', 'not-a-uuid'), 'invalid_session_id', 400)
  })

  test('another user cannot revoke a session by its id', async () => {
    const a = await c.createSession({ user_id: 'owner' })
    await c.revokeUserSession('someone-else', a.session.id)
    assert.notEqual(await c.validateSession(a.token), null)
  })

  test('bad input is a PgsidecarError with the API code and status', async () => {
    await rejectsWith(c.createSession({ user_id: '' }), 'invalid_user_id', 400)
    await rejectsWith(c.createSession({ user_id: 'u', ttl_seconds: 0 }), 'invalid_ttl', 400)
    await rejectsWith(c.createSession({ user_id: 'u', data: [1] }), 'invalid_data', 400)
    await rejectsWith(c.createSession({ user_id: 'u', data: { big: 'x'.repeat(70_000) } }), 'payload_too_large', 413)
    await rejectsWith(c.createSession({ user_id: 'u', extra: 1 }), 'invalid_json', 400)
  })

  test('the token stays out of URLs when validating', { skip: unix && 'a custom fetch is for http(s) URLs' }, async () => {
    const seen = []
    const spy = createClient({
      url: sidecar.url,
      fetch: (url, init) => {
        seen.push(String(url))
        return fetch(url, init)
      },
    })
    const { token } = await spy.createSession({ user_id: 'u-url' })
    await spy.validateSession(token)
    assert.ok(seen.every((u) => !u.includes(token)))
  })
})

describe(`cache: JSON values (${transport})`, () => {
  let sidecar
  let c
  before(async () => {
    sidecar = await startSidecar({ unix })
    c = createClient({ url: sidecar.url })
  })
  after(() => sidecar.stop())

  test('set and get a JSON value, with its metadata', async () => {
    const value = { name: 'Lamp', price: 19.9, tags: ['a', 'ü'], nested: { n: null } }
    const written = await c.set('product:42', value, { ttlSeconds: 300, tags: ['product:42', 'catalog'] })
    assert.match(written.etag, /^"[^"]+"$/)
    assert.deepEqual(await c.get('product:42'), value)
    const entry = await c.getEntry('product:42')
    assert.equal(entry.kind, 'json')
    assert.equal(entry.contentType, 'application/json')
    assert.equal(entry.etag, written.etag)
    assert.equal(entry.stale, false)
    assert.ok(entry.writtenAt > Date.now() - 60_000 && entry.writtenAt < Date.now() + 60_000)
    const ttl = (entry.expiresAt.getTime() - Date.now()) / 1000
    assert.ok(ttl > 200 && ttl <= 301, `ttl ${ttl}`)
  })

  test('keys with slashes, spaces, quotes and Unicode round-trip', async () => {
    for (const key of ['user/42', 'a b', 'q"uote', 'ключ', '%41', 'x?y#z', '..a', '.hidden']) {
      await c.set(key, key)
      assert.equal(await c.get(key), key)
    }
  })

  test('absent keys read as null; delete is idempotent', async () => {
    assert.equal(await c.get('never-set'), null)
    assert.equal(await c.getEntry('never-set'), null)
    await c.set('to-delete', 1)
    assert.equal(await c.delete('to-delete'), true)
    assert.equal(await c.get('to-delete'), null)
    assert.equal(await c.delete('to-delete'), true)
  })

  test('mget, deletePrefix, invalidateTags', async () => {
    await c.set('m:1', 1, { tags: ['t1'] })
    await c.set('m:2', { two: 2 }, { tags: ['t1', 't2'] })
    await c.set('m:3', 'three', { tags: ['t3'] })
    const got = await c.mget(['m:1', 'm:2', 'm:missing'])
    assert.deepEqual(got.hits, { 'm:1': 1, 'm:2': { two: 2 } })
    assert.deepEqual(got.raw, {})
    assert.deepEqual(got.misses, ['m:missing'])

    const inv = await c.invalidateTags(['t1'])
    assert.equal(inv.deleted, 2)
    assert.ok(Math.abs(inv.invalidated_at - Date.now()) < 60_000)
    assert.equal(await c.get('m:2'), null)
    assert.equal(await c.get('m:3'), 'three')

    await c.set('p:a', 1)
    await c.set('p:b', 2)
    assert.equal(await c.deletePrefix('p:'), 2)
    assert.equal(await c.get('p:a'), null)
  })

  test('a value that is not JSON cannot be set', async () => {
    await assert.rejects(c.set('k', undefined), TypeError)
  })

  test('bad input maps to the API codes', async () => {
    await rejectsWith(c.get('_reserved'), 'invalid_key', 400)
    await rejectsWith(c.set('x'.repeat(513), 1), 'invalid_key', 400)
    await rejectsWith(c.set('k', 1, { tags: ['a,b'] }), 'invalid_tag', 400)
    await rejectsWith(c.set('k', 1, { tags: Array.from({ length: 65 }, (_, i) => `t${i}`) }), 'invalid_tag', 400)
    await rejectsWith(c.set('k', 'x'.repeat(1_100_000)), 'payload_too_large', 413)
    await rejectsWith(c.mget([]), 'invalid_keys', 400)
    await rejectsWith(c.deletePrefix(''), 'invalid_prefix', 400)
    await rejectsWith(c.invalidateTags([]), 'invalid_tags', 400)
    // refused before any request
    await rejectsWith(c.set('k', 1, { ttlSeconds: 0 }), 'invalid_ttl', 400)
    await rejectsWith(c.set('k', 1, { ttlSeconds: MAX_TTL_SECONDS + 1 }), 'invalid_ttl', 400)
    await rejectsWith(c.set('k', 1, { ttlSeconds: 1.5 }), 'invalid_ttl', 400)
    await rejectsWith(c.get('..'), 'invalid_key', 400)
    await rejectsWith(c.invalidateTags(['t'], { expireSeconds: -1 }), 'invalid_expire_seconds', 400)
  })
})

describe(`cache: bytes, conditional requests and tag records (${transport})`, () => {
  let sidecar
  let c
  before(async () => {
    sidecar = await startSidecar({ unix })
    c = createClient({ url: sidecar.url })
  })
  after(() => sidecar.stop())

  test('bytes come back exactly, with their content type', async () => {
    const bytes = Uint8Array.from({ length: 512 }, (_, i) => i % 256)
    await c.setBytes('bin', bytes, { contentType: 'application/octet-stream', ttlSeconds: 60 })
    const got = await c.getBytes('bin')
    assert.equal(got.contentType, 'application/octet-stream')
    assert.deepEqual(got.bytes, bytes)
    const entry = await c.getEntry('bin')
    assert.equal(entry.kind, 'bytes')
    assert.deepEqual(entry.value, bytes)

    await c.setBytes('text', 'héllo', { contentType: 'text/plain; charset=utf-8' })
    const text = await c.getBytes('text')
    assert.equal(text.contentType, 'text/plain; charset=utf-8')
    assert.equal(new TextDecoder().decode(text.bytes), 'héllo')

    await c.setBytes('empty', new Uint8Array(0))
    assert.equal((await c.getBytes('empty')).bytes.length, 0)

    // get() is for JSON: a bytes entry is a clear error, not a garbled value
    await rejectsWith(c.get('bin'), 'not_json', 200)
    // getBytes also reads JSON entries, as their text
    await c.set('json', { a: 1 })
    assert.equal(new TextDecoder().decode((await c.getBytes('json')).bytes), '{"a":1}')

    const many = await c.mget(['bin', 'json', 'nope'])
    assert.deepEqual(many.hits, { json: { a: 1 } })
    assert.deepEqual(many.raw.bin.bytes, bytes)
    assert.equal(many.raw.bin.contentType, 'application/octet-stream')
    assert.deepEqual(many.misses, ['nope'])
  })

  test('a content type that is not a media type is refused', async () => {
    await rejectsWith(c.setBytes('k', 'x', { contentType: 'not a media type' }), 'invalid_content_type', 400)
  })

  test('ETags: If-None-Match reads, conditional writes and deletes', async () => {
    const first = await c.set('cond', 1)
    const entry = await c.getEntry('cond', { ifNoneMatch: first.etag })
    assert.equal(entry.kind, 'not_modified')
    assert.equal(entry.etag, first.etag)

    // create-only
    assert.equal(await c.set('cond', 2, { ifNoneMatch: '*' }), null)
    assert.ok(await c.set('cond-new', 1, { ifNoneMatch: '*' }))

    // compare-and-set
    const second = await c.set('cond', 2, { ifMatch: first.etag })
    assert.ok(second)
    assert.notEqual(second.etag, first.etag)
    assert.equal(await c.set('cond', 3, { ifMatch: first.etag }), null)
    assert.equal(await c.get('cond'), 2)
    assert.equal((await c.getEntry('cond', { ifNoneMatch: first.etag })).kind, 'json')

    // conditional delete
    assert.equal(await c.delete('cond', { ifMatch: first.etag }), false)
    assert.equal(await c.delete('cond', { ifMatch: second.etag }), true)
    assert.equal(await c.get('cond'), null)
    assert.equal(await c.delete('cond', { ifMatch: '*' }), false)

    await rejectsWith(c.set('cond', 1, { ifMatch: 'not-quoted' }), 'invalid_precondition', 400)
  })

  test('concurrent create-only writes: exactly one wins', async () => {
    const results = await Promise.all(Array.from({ length: 10 }, (_, i) => c.set('race', i, { ifNoneMatch: '*' })))
    assert.equal(results.filter(Boolean).length, 1)
  })

  test('tag records: invalidate now, or stale with a later expiry', async () => {
    const none = await c.tagRecords(['never', 'also-never'])
    assert.deepEqual(none, { tags: { never: null, 'also-never': null }, expires: { never: null, 'also-never': null } })

    await c.set('tagged', 1, { tags: ['swr'] })
    const swr = await c.invalidateTags(['swr'], { expireSeconds: 600 })
    assert.equal(swr.deleted, 0)
    const rec = await c.tagRecords(['swr'])
    assert.equal(rec.tags.swr, swr.invalidated_at)
    assert.equal(rec.expires.swr, swr.invalidated_at + 600_000)

    // a tag-checked read serves it, marked stale; a plain read does not look
    const checked = await c.getEntry('tagged', { checkTags: [] })
    assert.equal(checked.value, 1)
    assert.equal(checked.stale, true)
    assert.equal((await c.getEntry('tagged')).stale, false)

    // rewritten after the invalidation: fresh again
    await c.set('tagged', 2, { tags: ['swr'] })
    assert.equal((await c.getEntry('tagged', { checkTags: [] })).stale, false)

    // a tag the entry does not carry, checked by name
    await c.set('plain', 1)
    await c.invalidateTags(['other'])
    assert.equal(await c.getEntry('plain', { checkTags: ['other'] }), null)
    assert.equal((await c.getEntry('plain')).value, 1)
  })
})

describe(`errors, timeouts and an unreachable sidecar (${transport})`, () => {
  test('an unreachable sidecar is code unreachable, status 0', async () => {
    // over a unix socket: no file at the path, and a socket file nobody listens on
    const urls = unix ? [`unix:${socketPath()}`, (await startSidecar({ unix: true }).then(async (s) => (await s.stop(), s.url)))] : [`http://127.0.0.1:${await closedPort()}`]
    for (const url of urls) {
      await assert.rejects(createClient({ url }).get('k'), (err) => {
        assert.equal(err.code, 'unreachable')
        assert.equal(err.status, 0)
        assert.ok(isUnavailable(err))
        return true
      })
    }
  })

  test('a sidecar that does not answer times out', async () => {
    const silent = await silentServer({ unix })
    try {
      const c = createClient({ url: silent.url, timeoutMs: 300 })
      await assert.rejects(c.get('k'), (err) => {
        assert.equal(err.code, 'timeout')
        assert.equal(err.status, 0)
        assert.ok(isUnavailable(err))
        return true
      })
      await rejectsWith(c.set('k', 1, { timeoutMs: 200 }), 'timeout', 0)
    } finally {
      await silent.close()
    }
  })

  test('a sidecar that stops in the middle of a body times out too', async () => {
    const silent = await silentServer({ unix, answer: 'HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{"a":' })
    try {
      const c = createClient({ url: silent.url, timeoutMs: 300 })
      await rejectsWith(c.get('k'), 'timeout', 0)
      await rejectsWith(c.getBytes('k'), 'timeout', 0)
    } finally {
      await silent.close()
    }
  })

  test("the caller's own signal aborts with the caller's reason", async () => {
    const silent = await silentServer({ unix })
    try {
      const c = createClient({ url: silent.url, timeoutMs: 10_000 })
      const controller = new AbortController()
      const call = c.get('k', { signal: controller.signal })
      controller.abort(new Error('caller gave up'))
      await assert.rejects(call, /caller gave up/)
    } finally {
      await silent.close()
    }
  })

  test('auth: without the token 401 unauthorized; with it, served; never in a message', async () => {
    const token = 'a-long-enough-shared-secret'
    const sidecar = await startSidecar({ unix, env: { PGSIDECAR_SERVER__AUTH_TOKEN: token } })
    try {
      await rejectsWith(createClient({ url: sidecar.url, token: '' }).get('k'), 'unauthorized', 401)
      const wrong = createClient({ url: sidecar.url, token: 'the-wrong-secret-value' })
      await assert.rejects(wrong.get('k'), (err) => {
        assert.equal(err.code, 'unauthorized')
        assert.ok(!String(err.message).includes('the-wrong-secret-value'))
        assert.ok(!inspect(err).includes('the-wrong-secret-value'))
        return true
      })
      const ok = createClient({ url: sidecar.url, token })
      await ok.set('k', 1)
      assert.equal(await ok.get('k'), 1)
    } finally {
      await sidecar.stop()
    }
  })

  test('a 404 from a route this sidecar does not have is an error, not a miss', async () => {
    // a proxy's or another server's 404 must not read as "no such session"
    const { createServer } = await import('node:http')
    const server = createServer((req, res) => {
      res.writeHead(404, { 'content-type': 'text/html' })
      res.end('<h1>Not Found</h1>')
    })
    const path = unix ? socketPath() : undefined
    await new Promise((r) => (path ? server.listen(path, r) : server.listen(0, '127.0.0.1', r)))
    try {
      const c = createClient({ url: path ? `unix:${path}` : `http://127.0.0.1:${server.address().port}` })
      await rejectsWith(c.validateSession('t'), 'http_404', 404)
      await rejectsWith(c.get('k'), 'http_404', 404)
    } finally {
      await new Promise((r) => server.close(r))
    }
  })
})
}
