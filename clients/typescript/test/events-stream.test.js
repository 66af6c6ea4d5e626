// subscribe()'s handling of the stream itself, against a scripted server: what the real sidecar
// cannot be made to send on demand (an event split at every byte, CRLF line ends, an event that
// is not JSON, silence, a wrong content type, a connection dropped mid-event). The change feed
// against the real sidecar is in events.test.js.

import assert from 'node:assert/strict'
import { createServer } from 'node:http'
import { describe, test } from 'node:test'

import { PgsidecarError, createClient } from '../dist/index.js'
import { socketPath } from './helpers.js'

/**
 * An HTTP server on TCP or a unix socket answering each request with `script(req, res, n)`, n
 * counting requests from 1. Returns `{ url, requests, close }`.
 */
async function scripted(script, { unix = false } = {}) {
  const requests = []
  const open = new Set()
  const server = createServer((req, res) => {
    requests.push({ url: req.url, headers: req.headers })
    open.add(res)
    res.on('close', () => open.delete(res))
    script(req, res, requests.length)
  })
  const path = unix ? socketPath() : undefined
  await new Promise((r) => (path ? server.listen(path, r) : server.listen(0, '127.0.0.1', r)))
  return {
    url: path ? `unix:${path}` : `http://127.0.0.1:${server.address().port}`,
    requests,
    async close() {
      for (const res of open) res.destroy()
      server.closeAllConnections()
      await new Promise((r) => server.close(r))
    },
  }
}

const SSE = { 'content-type': 'text/event-stream', 'cache-control': 'no-cache' }

/** Writes `text` one byte at a time, each in its own write (and so, mostly, its own chunk). */
async function dribble(res, text) {
  for (const byte of Buffer.from(text)) {
    res.write(Buffer.from([byte]))
    await new Promise((r) => setImmediate(r))
  }
}

/** The first `n` events of a subscription, then stops it. */
async function take(subscription, n) {
  const out = []
  if (n === 0) return out
  for await (const event of subscription) {
    out.push(event)
    if (out.length === n) break
  }
  return out
}

for (const transport of ['tcp', 'unix']) {
  const unix = transport === 'unix'
  describe(`subscribe: the stream (${transport})`, () => {
    test('events split at every byte, CRLF and CR line ends, comments, several data lines', async () => {
      const server = await scripted(
        async (req, res) => {
          res.writeHead(200, SSE)
          await dribble(res, ': keep-alive\r\n\r\n')
          await dribble(res, 'event: cache.put\r\ndata: {"key":"k:ü","tags":["a"]}\r\n\r\n')
          await dribble(res, 'event:cache.delete\rdata:{"prefix":"p:"}\r\r')
          // several data lines are one data field, joined with newlines (JSON allows that whitespace)
          await dribble(res, 'event: cache.invalidate\ndata: {"tags": ["t"],\ndata: "expire_seconds": 60}\nid: 7\n\n')
          await dribble(res, 'event: session.revoke\ndata: {"user_id":"u","all":true}\n\n')
        },
        { unix },
      )
      try {
        const events = await take(createClient({ url: server.url }).subscribe(), 4)
        assert.deepEqual(events, [
          { type: 'cache.put', key: 'k:ü', tags: ['a'] },
          { type: 'cache.delete', prefix: 'p:' },
          { type: 'cache.invalidate', tags: ['t'], expire_seconds: 60 },
          { type: 'session.revoke', user_id: 'u', all: true },
        ])
      } finally {
        await server.close()
      }
    })

    test('filters travel as query parameters, with the token as a header and the SSE accept type', async () => {
      const server = await scripted((req, res) => {
        res.writeHead(200, SSE)
        res.write('event: reset\ndata: {}\n\n')
      }, { unix })
      try {
        const c = createClient({ url: server.url, token: 'the-shared-secret-token' })
        await take(c.subscribe({ cachePrefix: 'product:', tags: ['a', 'b'], userId: 'u 1' }), 1)
        const { url, headers } = server.requests[0]
        const q = new URL(url, 'http://x').searchParams
        assert.equal(new URL(url, 'http://x').pathname, '/v1/events')
        assert.deepEqual(Object.fromEntries(q), { cache_prefix: 'product:', tags: 'a,b', user_id: 'u 1' })
        assert.equal(headers.authorization, 'Bearer the-shared-secret-token')
        assert.equal(headers.accept, 'text/event-stream')
      } finally {
        await server.close()
      }
    })

    test('an event that is not JSON becomes a reset; unknown event types are skipped', async () => {
      const server = await scripted((req, res) => {
        res.writeHead(200, SSE)
        res.write('event: cache.put\ndata: {not json\n\n')
        res.write('event: cache.someday\ndata: {"x":1}\n\n')
        res.write('data: {"a message without an event name":1}\n\n')
        res.write('event: cache.delete\ndata: ["an array"]\n\n')
        res.write('event: cache.delete\ndata: {"key":"k"}\n\n')
      }, { unix })
      try {
        const events = await take(createClient({ url: server.url }).subscribe(), 3)
        assert.deepEqual(events, [{ type: 'reset' }, { type: 'reset' }, { type: 'cache.delete', key: 'k' }])
      } finally {
        await server.close()
      }
    })

    test('a dropped connection reconnects with back-off, says reset, and reports the error', async () => {
      const server = await scripted((req, res, n) => {
        if (n === 2 || n === 3) {
          // refused twice in between: overloaded
          res.writeHead(503, { 'content-type': 'application/json' })
          res.end('{"error":{"code":"overloaded","message":"too many subscribers"}}')
          return
        }
        res.writeHead(200, SSE)
        res.write(`event: cache.delete\ndata: {"key":"before-${n}"}\n\n`)
        // then the connection dies in the middle of an event
        if (n === 1) res.write('event: cache.put\ndata: {"key":"hal', () => res.destroy())
      }, { unix })
      try {
        const errors = []
        const events = await take(createClient({ url: server.url }).subscribe({ onError: (e) => errors.push(e), retryMinMs: 20 }), 3)
        assert.deepEqual(events, [{ type: 'cache.delete', key: 'before-1' }, { type: 'reset' }, { type: 'cache.delete', key: 'before-4' }])
        assert.equal(server.requests.length, 4)
        assert.deepEqual(errors.map((e) => [e instanceof PgsidecarError, e.code]), [[true, 'unreachable'], [true, 'overloaded'], [true, 'overloaded']])
      } finally {
        await server.close()
      }
    })

    test('silence beyond idleTimeoutMs reconnects; a slow consumer does not count as silence', async () => {
      const server = await scripted((req, res, n) => {
        res.writeHead(200, SSE)
        res.write(`event: cache.delete\ndata: {"key":"a${n}"}\n\nevent: cache.delete\ndata: {"key":"b${n}"}\n\n`)
        // and then nothing, not even a keep-alive
      }, { unix })
      try {
        const errors = []
        const sub = createClient({ url: server.url }).subscribe({ idleTimeoutMs: 300, retryMinMs: 10, onError: (e) => errors.push(e.code) })
        const events = []
        for await (const event of sub) {
          events.push(event)
          // the consumer takes longer than the idle timeout on the first event: the second is still there
          if (events.length === 1) await new Promise((r) => setTimeout(r, 600))
          if (events.length === 4) break
        }
        assert.deepEqual(events, [
          { type: 'cache.delete', key: 'a1' },
          { type: 'cache.delete', key: 'b1' },
          { type: 'reset' },
          { type: 'cache.delete', key: 'a2' },
        ])
        assert.deepEqual(errors, ['timeout'])
      } finally {
        await server.close()
      }
    })

    test('errors reconnecting cannot fix end the iteration with the error', async () => {
      const cases = [
        [(res) => { res.writeHead(401, { 'content-type': 'application/json' }); res.end('{"error":{"code":"unauthorized","message":"no"}}') }, 'unauthorized', 401],
        [(res) => { res.writeHead(404, { 'content-type': 'text/html' }); res.end('<h1>an older sidecar</h1>') }, 'http_404', 404],
        [(res) => { res.writeHead(200, { 'content-type': 'application/json' }); res.end('{}') }, 'invalid_response', 200],
        // notifications off on that sidecar (a transaction-mode pooler without database.listen_url): its configuration
        [(res) => { res.writeHead(503, { 'content-type': 'application/json' }); res.end('{"error":{"code":"events_unavailable","message":"off"}}') }, 'events_unavailable', 503],
      ]
      for (const [answer, code, status] of cases) {
        const server = await scripted((req, res) => answer(res), { unix })
        try {
          await assert.rejects(take(createClient({ url: server.url }).subscribe(), 1), (err) => {
            assert.ok(err instanceof PgsidecarError, String(err))
            assert.equal(err.code, code)
            assert.equal(err.status, status)
            return true
          })
          assert.equal(server.requests.length, 1, `${code}: not retried`)
        } finally {
          await server.close()
        }
      }
    })

    test('a sidecar that does not send the headers times out, and is retried', async () => {
      const server = await scripted((req, res, n) => {
        if (n === 1) return // never answers
        res.writeHead(200, SSE)
        res.write('event: cache.delete\ndata: {"key":"k"}\n\n')
      }, { unix })
      try {
        const errors = []
        const c = createClient({ url: server.url, timeoutMs: 300 })
        const events = await take(c.subscribe({ onError: (e) => errors.push(e.code), retryMinMs: 10 }), 1)
        // the first connection never opened, so nothing was missed: no reset
        assert.deepEqual(events, [{ type: 'cache.delete', key: 'k' }])
        assert.deepEqual(errors, ['timeout'])
      } finally {
        await server.close()
      }
    })

    test('abort, close() and break stop it, also while it waits to reconnect', async () => {
      const server = await scripted((req, res) => {
        res.writeHead(200, SSE)
        res.write(': hello\n\n')
      }, { unix })
      try {
        const c = createClient({ url: server.url })
        // abort while waiting for an event: the iteration just ends
        const controller = new AbortController()
        const got = take(c.subscribe({ signal: controller.signal }), 1)
        await new Promise((r) => setTimeout(r, 100))
        controller.abort()
        assert.deepEqual(await got, [])
        // already aborted: no request at all
        const before = server.requests.length
        assert.deepEqual(await take(c.subscribe({ signal: AbortSignal.abort() }), 1), [])
        assert.equal(server.requests.length, before)
        // close()
        const sub = c.subscribe()
        const closed = take(sub, 1)
        await new Promise((r) => setTimeout(r, 100))
        sub.close()
        assert.deepEqual(await closed, [])
        // iterated twice: refused
        assert.throws(() => sub[Symbol.asyncIterator](), TypeError)
      } finally {
        await server.close()
      }
      // waiting to reconnect (nothing listens any more): close() ends it at once
      const down = createClient({ url: server.url })
      const errors = []
      const sub = down.subscribe({ retryMinMs: 60_000, onError: (e) => errors.push(e.code) })
      const ended = take(sub, 1)
      while (errors.length === 0) await new Promise((r) => setTimeout(r, 20))
      sub.close()
      assert.deepEqual(await ended, [])
      assert.deepEqual(errors, ['unreachable'])
    })

    test('the callback form: events one at a time, done settles on close and on fatal errors', async () => {
      let release
      const server = await scripted((req, res, n) => {
        if (n > 1) {
          res.writeHead(401, { 'content-type': 'application/json' })
          res.end('{"error":{"code":"unauthorized","message":"no"}}')
          return
        }
        res.writeHead(200, SSE)
        res.write('event: cache.delete\ndata: {"key":"1"}\n\nevent: cache.delete\ndata: {"key":"2"}\n\n')
        release = () => res.destroy()
      }, { unix })
      try {
        const c = createClient({ url: server.url })
        const seen = []
        let busy = false
        const sub = c.subscribe({ retryMinMs: 10 }, async (event) => {
          assert.equal(busy, false, 'onEvent calls do not overlap')
          busy = true
          await new Promise((r) => setTimeout(r, 30))
          seen.push(event)
          busy = false
        })
        while (seen.length < 2) await new Promise((r) => setTimeout(r, 10))
        assert.deepEqual(seen, [{ type: 'cache.delete', key: '1' }, { type: 'cache.delete', key: '2' }])
        // the connection drops, the reconnection is refused for good: done rejects
        release()
        await assert.rejects(sub.done, (e) => e.code === 'unauthorized')
        assert.equal(seen.length, 2)
      } finally {
        await server.close()
      }
    })

    test('the callback form: close() resolves done; what onEvent throws rejects it', async () => {
      const server = await scripted((req, res) => {
        res.writeHead(200, SSE)
        res.write('event: cache.delete\ndata: {"key":"1"}\n\n')
      }, { unix })
      try {
        const c = createClient({ url: server.url })
        const sub = c.subscribe({}, () => {})
        await new Promise((r) => setTimeout(r, 100))
        sub.close()
        await sub.done
        const failing = c.subscribe({}, () => {
          throw new Error('handler bug')
        })
        await assert.rejects(failing.done, /handler bug/)
      } finally {
        await server.close()
      }
    })
  })
}

test('subscribe refuses bad filters and options before any request', () => {
  const c = createClient({ url: 'http://127.0.0.1:1' })
  for (const tags of [['a,b'], [''], [], Array.from({ length: 101 }, (_, i) => `t${i}`), 'red']) {
    assert.throws(() => c.subscribe({ tags }), (e) => e instanceof PgsidecarError && e.code === 'invalid_tags' && e.status === 400, JSON.stringify(tags))
  }
  assert.throws(() => c.subscribe({}, 'not a function'), TypeError)
  assert.throws(() => c.subscribe({ retryMinMs: 0 }), TypeError)
  assert.throws(() => c.subscribe({ idleTimeoutMs: Number.NaN }), TypeError)
})
