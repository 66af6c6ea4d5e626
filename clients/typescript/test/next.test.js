// The Next.js handlers driven as Next.js 16 drives them, against two real sidecars sharing one
// database (two containers; B's data API on a unix socket): entries written by one are read by
// the other, bytes stay bytes, and tag invalidation on one reaches the other.

import assert from 'node:assert/strict'
import { randomBytes } from 'node:crypto'
import { mkdtempSync, mkdirSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { after, before, describe, test } from 'node:test'

import { createClient } from '../dist/index.js'
import { createCacheHandler } from '../dist/next/cache-handler.js'
import { createUseCacheHandler } from '../dist/next/use-cache.js'
import { closedPort, startSidecar } from './helpers.js'

/** A `.next/server` directory with this BUILD_ID beside it. */
function distDir(buildId) {
  const root = mkdtempSync(join(tmpdir(), 'pgsidecar-next-'))
  mkdirSync(join(root, 'server'))
  writeFileSync(join(root, 'BUILD_ID'), buildId)
  return join(root, 'server')
}

function appPage(tags) {
  return {
    kind: 'APP_PAGE',
    html: '<html><body><p>price: 19.90 €</p></body></html>',
    rscData: randomBytes(64 * 1024),
    segmentData: new Map([
      ['/_tree', randomBytes(300)],
      ['/_index', Buffer.from('segment ✓')],
    ]),
    headers: { 'x-next-cache-tags': tags.join(','), $weird: 'a header name with a dollar' },
    postponed: undefined,
    status: 200,
  }
}

describe('next cacheHandler (incremental cache)', () => {
  let a
  let b
  let A
  let B
  before(async () => {
    a = await startSidecar()
    b = await startSidecar({ db: a.db, unix: true })
    const dist = distDir('build-1')
    A = new (createCacheHandler({ client: { url: a.url } }))({ serverDistDir: dist })
    B = new (createCacheHandler({ client: { url: b.url } }))({ serverDistDir: dist })
  })
  after(async () => {
    await a.stop()
    await b.stop()
  })

  test('a page stored by one container is served by the other, Buffers and Maps intact, as bytes', async () => {
    const value = appPage(['_N_T_/layout', '_N_T_/shop/page', 'product'])
    const cacheControl = { revalidate: 60, expire: 3600 }
    await A.set('/shop', value, { cacheControl, isRoutePPREnabled: false, isFallback: false })
    const got = await B.get('/shop', { kind: 'APP_PAGE', isFallback: false, isRoutePPREnabled: false })
    assert.ok(got)
    assert.deepEqual(got.cacheControl, cacheControl)
    assert.ok(Math.abs(got.lastModified - Date.now()) < 60_000)
    assert.equal(got.value.kind, 'APP_PAGE')
    assert.equal(got.value.html, value.html)
    assert.ok(Buffer.isBuffer(got.value.rscData))
    assert.ok(got.value.rscData.equals(value.rscData))
    assert.ok(got.value.segmentData instanceof Map)
    assert.deepEqual([...got.value.segmentData.keys()], ['/_tree', '/_index'])
    assert.ok(got.value.segmentData.get('/_tree').equals(value.segmentData.get('/_tree')))
    assert.deepEqual(got.value.headers, value.headers)
    assert.equal(got.value.status, 200)

    // no base64 on the way: the stored entry is about the size of its bytes
    const keys = await createClient({ url: a.url }).mget(['next:build-1:/shop'])
    const stored = keys.raw['next:build-1:/shop'].bytes.length
    assert.ok(stored < 64 * 1024 + 2000, `stored ${stored} bytes`)
    // and it expires with Next.js's expire
    const entry = await createClient({ url: a.url }).getEntry('next:build-1:/shop')
    const ttl = (entry.expiresAt.getTime() - Date.now()) / 1000
    assert.ok(ttl > 3500 && ttl <= 3601, `ttl ${ttl}`)
  })

  test('revalidateTag on one container expires the page on the other', async () => {
    await A.set('/expire-me', appPage(['_N_T_/expire-me', 'product-7']), { cacheControl: { revalidate: false, expire: undefined } })
    assert.ok(await B.get('/expire-me', { kind: 'APP_PAGE', isFallback: false }))
    await A.revalidateTag('product-7')
    assert.equal(await B.get('/expire-me', { kind: 'APP_PAGE', isFallback: false }), null)
    // rendered again after the invalidation: served again
    await B.set('/expire-me', appPage(['_N_T_/expire-me', 'product-7']), { cacheControl: { revalidate: false, expire: undefined } })
    assert.ok(await A.get('/expire-me', { kind: 'APP_PAGE', isFallback: false }))
  })

  test("revalidateTag with a profile (stale-while-revalidate): still served, but past its revalidate time", async () => {
    await A.set('/swr', appPage(['swr-tag']), { cacheControl: { revalidate: 60, expire: 86400 } })
    const fresh = await B.get('/swr', { kind: 'APP_PAGE', isFallback: false })
    assert.ok(Date.now() - fresh.lastModified < 60_000)
    await A.revalidateTag(['swr-tag'], { expire: 300 })
    const stale = await B.get('/swr', { kind: 'APP_PAGE', isFallback: false })
    assert.ok(stale, 'a stale entry is still served')
    assert.ok(Date.now() - stale.lastModified > 60_000, 'Next.js sees it past its revalidate time')
    assert.ok(Date.now() - stale.lastModified < 86_400_000, 'but not past its expire time')
    // a page that never revalidates by time: answered as due for revalidation this once (not -1,
    // which would make Next.js regenerate it while the request waits)
    await A.set('/swr-static', appPage(['swr-tag-2']), { cacheControl: { revalidate: false, expire: undefined } })
    await A.revalidateTag('swr-tag-2', { expire: 300 })
    const once = await B.get('/swr-static', { kind: 'APP_PAGE', isFallback: false })
    assert.deepEqual(once.cacheControl, { revalidate: 1, expire: undefined })
    assert.ok(once.lastModified > 0 && Date.now() - once.lastModified > 1000)
    // regenerated: its own lifetime is back
    await B.set('/swr-static', appPage(['swr-tag-2']), { cacheControl: { revalidate: false, expire: undefined } })
    const regenerated = (await A.get('/swr-static', { kind: 'APP_PAGE', isFallback: false })).cacheControl
    assert.equal(regenerated.revalidate, false)
    assert.equal(regenerated.expire, undefined)
  })

  test('fetch cache and unstable_cache entries: their tags and the soft tags are checked', async () => {
    const data = { kind: 'FETCH', data: { headers: { a: 'b' }, body: '{"n":1}', url: 'https://api/x', status: 200 }, revalidate: 30, tags: ['f1'] }
    await A.set('fetch-key-1', data, { fetchCache: true, tags: ['f1'], fetchUrl: 'https://api/x', fetchIdx: 0 })
    const ctx = { kind: 'FETCH', tags: ['f1'], softTags: ['_N_T_/layout', '_N_T_/page-a'], revalidate: 30 }
    const got = await B.get('fetch-key-1', ctx)
    assert.deepEqual(got.value, data)
    await A.revalidateTag('_N_T_/page-a') // revalidatePath('/page-a')
    assert.equal(await B.get('fetch-key-1', ctx), null)

    await A.set('fetch-key-2', data, { fetchCache: true, tags: ['f2'] })
    await B.revalidateTag('f2', { expire: 600 })
    const stale = await A.get('fetch-key-2', { kind: 'FETCH', tags: ['f2'], softTags: [], revalidate: 30 })
    assert.ok(Date.now() - stale.lastModified > 30_000)
  })

  test('pages are scoped to their build; fetch entries are shared across builds', async () => {
    const next = new (createCacheHandler({ client: { url: b.url } }))({ serverDistDir: distDir('build-2') })
    await A.set('/scoped', appPage([]), { cacheControl: { revalidate: 60, expire: undefined } })
    assert.equal(await next.get('/scoped', { kind: 'APP_PAGE', isFallback: false }), null)
    await A.set('fetch-shared', { kind: 'FETCH', data: { headers: {}, body: 'x', url: 'u' }, revalidate: 60 }, { fetchCache: true, tags: [] })
    assert.ok(await next.get('fetch-shared', { kind: 'FETCH', tags: [], softTags: [] }))
  })

  test('odd tags (commas, long ones) are carried as hashes and still invalidate', async () => {
    const odd = ['a,b', 'x'.repeat(300), 'tab\there']
    await A.set('/odd', appPage(odd), { cacheControl: { revalidate: 60, expire: undefined } })
    // the header splits on commas, so the page carries 'a', 'b', the long tag and the tab tag
    assert.ok(await B.get('/odd', { kind: 'APP_PAGE', isFallback: false }))
    await B.revalidateTag('x'.repeat(300))
    assert.equal(await A.get('/odd', { kind: 'APP_PAGE', isFallback: false }), null)
    await A.set('/odd2', appPage(['tab\there']), { cacheControl: { revalidate: 60, expire: undefined } })
    await B.revalidateTag('tab\there')
    assert.equal(await A.get('/odd2', { kind: 'APP_PAGE', isFallback: false }), null)
  })

  test('a null value (not found) and a missing key', async () => {
    await A.set('/gone', null, { cacheControl: { revalidate: 60, expire: undefined } })
    const got = await B.get('/gone', { kind: 'APP_PAGE', isFallback: false })
    assert.equal(got.value, null)
    assert.equal(await B.get('/never', { kind: 'APP_PAGE', isFallback: false }), null)
  })

  test('with the sidecar unreachable: misses, dropped writes, one warning; revalidateTag fails loudly', async () => {
    const warnings = []
    const Handler = createCacheHandler({ client: { url: `http://127.0.0.1:${await closedPort()}` }, warn: (m) => warnings.push(m) })
    const h = new Handler({ serverDistDir: distDir('x') })
    assert.equal(await h.get('/p', { kind: 'APP_PAGE', isFallback: false }), null)
    await h.set('/p', appPage([]), { cacheControl: { revalidate: 1, expire: undefined } })
    assert.equal(await new Handler({}).get('/p', { kind: 'APP_PAGE', isFallback: false }), null)
    assert.equal(warnings.length, 1)
    assert.ok(!warnings[0].includes('/p'))
    await assert.rejects(h.revalidateTag('t'), (e) => e.code === 'unreachable')
  })
})

/** A `'use cache'` entry whose stream delivers `chunks`, one per `delayMs`. */
function pendingEntry(chunks, meta, delayMs = 0) {
  let i = 0
  const value = new ReadableStream({
    async pull(controller) {
      if (delayMs) await new Promise((r) => setTimeout(r, delayMs))
      if (i < chunks.length) controller.enqueue(chunks[i++])
      else controller.close()
    },
  })
  return { value, tags: [], stale: 300, timestamp: Date.now(), expire: 3600, revalidate: 900, ...meta }
}

async function bytesOf(stream) {
  return Buffer.from(await new Response(stream).arrayBuffer())
}

describe("next 'use cache' handler (cacheHandlers)", () => {
  let a
  let b
  let A
  let B
  before(async () => {
    a = await startSidecar()
    b = await startSidecar({ db: a.db, unix: true })
    A = createUseCacheHandler({ client: { url: a.url } })
    B = createUseCacheHandler({ client: { url: b.url } })
  })
  after(async () => {
    await a.stop()
    await b.stop()
  })

  test('set receives a pending entry; a get of that key meanwhile waits for it', async () => {
    const chunks = [Buffer.from('chunk one, '), randomBytes(1000), Buffer.from('end')]
    let resolveEntry
    const pending = new Promise((r) => (resolveEntry = r))
    const setting = A.set('["build","fn",[1]]', pending)
    const getting = A.get('["build","fn",[1]]', [])
    setTimeout(() => resolveEntry(pendingEntry(chunks, { tags: ['uc-tag'] }, 20)), 50)
    const got = await getting
    assert.ok(got, 'the get waited for the set instead of missing')
    assert.ok((await bytesOf(got.value)).equals(Buffer.concat(chunks)))
    await setting
    // and another container reads it, with its metadata
    const other = await B.get('["build","fn",[1]]', ['_N_T_/layout'])
    assert.deepEqual(other.tags, ['uc-tag'])
    assert.equal(other.expire, 3600)
    assert.equal(other.revalidate, 900)
    assert.equal(other.stale, 300)
    assert.ok((await bytesOf(other.value)).equals(Buffer.concat(chunks)))
    // each get returns a new stream
    const again = await B.get('["build","fn",[1]]', [])
    assert.ok((await bytesOf(again.value)).equals(Buffer.concat(chunks)))
  })

  test('updateTags on one container: entries with the tag, or under the soft tag, are gone on the other', async () => {
    await A.set('k-tagged', Promise.resolve(pendingEntry([Buffer.from('v1')], { tags: ['product-9'] })))
    await A.set('k-soft', Promise.resolve(pendingEntry([Buffer.from('v2')], { tags: [] })))
    assert.ok(await B.get('k-tagged', []))
    assert.ok(await B.get('k-soft', ['_N_T_/products/page']))
    await A.updateTags(['product-9'])
    await A.updateTags(['_N_T_/products/page'])
    assert.equal(await B.get('k-tagged', []), undefined)
    assert.equal(await B.get('k-soft', ['_N_T_/products/page']), undefined)
    assert.equal(await B.getExpiration(['product-9']), Infinity)
    await B.refreshTags()
  })

  test('updateTags with durations (revalidateTag with a profile): served once more with revalidate -1', async () => {
    await A.set('k-swr', Promise.resolve(pendingEntry([Buffer.from('v')], { tags: ['swr-9'] })))
    await B.updateTags(['swr-9'], { expire: 600 })
    const got = await A.get('k-swr', [])
    assert.ok(got)
    assert.equal(got.revalidate, -1)
    assert.equal((await bytesOf(got.value)).toString(), 'v')
  })

  test('entries that must not be stored: a failed stream, a dynamic (expire 0) entry', async () => {
    const failing = new ReadableStream({
      start(controller) {
        controller.enqueue(Buffer.from('partial'))
        controller.error(new Error('render failed'))
      },
    })
    await A.set('k-failed', Promise.resolve({ ...pendingEntry([], {}), value: failing }))
    assert.equal(await B.get('k-failed', []), undefined)
    await A.set('k-dynamic', Promise.resolve(pendingEntry([Buffer.from('x')], { expire: 0 })))
    assert.equal(await B.get('k-dynamic', []), undefined)
  })

  test('one revalidateTag reaches the sidecar once, though Next.js calls every handler', async () => {
    const calls = []
    const counting = (url, init) => {
      if (String(url).includes('_invalidate')) calls.push(init.body)
      return fetch(url, init)
    }
    const handler = createUseCacheHandler({ client: { url: a.url, fetch: counting } })
    const Incremental = createCacheHandler({ client: { url: a.url, fetch: counting } })
    // what Next.js's revalidateTags does: updateTags on the handlers, revalidateTag on the incremental cache, together
    await Promise.all([handler.updateTags(['once'], { expire: 60 }), new Incremental({}).revalidateTag(['once'], { expire: 60 })])
    assert.equal(calls.length, 1)
  })
})
