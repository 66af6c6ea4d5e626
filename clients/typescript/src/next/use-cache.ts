// Next.js 16's `'use cache'` handler (`cacheHandlers` in next.config: `default`, `remote`) in the
// sidecar, with tag expiry shared by every container of the fleet.
//
// Types mirror Next.js 16's `CacheHandler` (packages/next/src/server/lib/cache-handlers/types.ts)
// structurally. Tag state lives in the sidecar and is read with each `get` (`check_tags`, one
// round trip), so `refreshTags` has nothing to do and `getExpiration` answers Infinity, which
// tells Next.js to pass the implicit tags to `get` instead.

import { PgsidecarError, type PgsidecarClient } from '../client.js'
import { ENVELOPE_CONTENT_TYPE, decodeEnvelope, encodeEnvelope } from './envelope.js'
import { Warnings, clientOf, invalidate, readChecked, serverTags, sha256Hex, ttlFor, type NextHandlerOptions } from './shared.js'

/** A `'use cache'` entry (`CacheEntry` in Next.js): times in ms (`timestamp`) and seconds (the others). */
export interface CacheEntry {
  value: ReadableStream<Uint8Array>
  tags: string[]
  stale: number
  timestamp: number
  expire: number
  revalidate: number
}

/** The `cacheHandlers` interface of Next.js 16. */
export interface CacheHandler {
  get(cacheKey: string, softTags: string[]): Promise<undefined | CacheEntry>
  set(cacheKey: string, pendingEntry: Promise<CacheEntry>): Promise<void>
  refreshTags(): Promise<void>
  getExpiration(tags: string[]): Promise<number>
  updateTags(tags: string[], durations?: { expire?: number }): Promise<void>
}

type StoredMeta = Omit<CacheEntry, 'value'>

const WHO = "next 'use cache' handler"

async function readAll(stream: ReadableStream<Uint8Array>): Promise<Buffer> {
  const chunks: Uint8Array[] = []
  const reader = stream.getReader()
  for (;;) {
    const { done, value } = await reader.read()
    if (done) break
    chunks.push(value)
  }
  return Buffer.concat(chunks)
}

function streamOf(bytes: Uint8Array): ReadableStream<Uint8Array> {
  return new ReadableStream({
    start(controller) {
      controller.enqueue(bytes)
      controller.close()
    },
  })
}

/** Makes a `'use cache'` handler with these options (the default export uses the defaults). */
export function createUseCacheHandler(options: NextHandlerOptions = {}): CacheHandler {
  let client: PgsidecarClient | undefined
  const prefix = `${options.keyPrefix ?? 'next:'}uc:`
  const warnings = new Warnings(WHO, options.warn)
  const sidecar = () => (client ??= clientOf(options.client))
  /** Sets in progress in this process: a `get` of the same key waits for its `set`. */
  const pendingSets = new Map<string, Promise<void>>()
  // Keys hold serialized arguments of any length and bytes: always hashed.
  const keyOf = (cacheKey: string) => prefix + sha256Hex(cacheKey)

  return {
    async get(cacheKey, softTags) {
      await pendingSets.get(cacheKey)
      let entry
      try {
        entry = await readChecked(sidecar(), keyOf(cacheKey), softTags)
        warnings.served()
      } catch (err) {
        warnings.failed(err)
        return undefined
      }
      if (entry === null) return undefined
      let meta: StoredMeta & { value: Buffer }
      try {
        meta = decodeEnvelope(entry.value) as StoredMeta & { value: Buffer }
      } catch {
        return undefined
      }
      return {
        tags: meta.tags,
        stale: meta.stale,
        timestamp: meta.timestamp,
        expire: meta.expire,
        // a stale tag: serve it this once and let Next.js regenerate it (as its own handler does)
        revalidate: entry.stale ? -1 : meta.revalidate,
        value: streamOf(meta.value),
      }
    },

    async set(cacheKey, pendingEntry) {
      let done!: () => void
      const pending = new Promise<void>((resolve) => (done = resolve))
      pendingSets.set(cacheKey, pending)
      try {
        const entry = await pendingEntry
        const value = await readAll(entry.value)
        // An entry that expires at once is dynamic: Next.js never serves it from a cache.
        if (entry.expire === 0) return
        const tags = serverTags(entry.tags)
        if (tags.length > 64) {
          warnings.tooManyTags()
          return
        }
        const stored = {
          tags: entry.tags,
          stale: entry.stale,
          timestamp: entry.timestamp,
          expire: entry.expire,
          revalidate: entry.revalidate,
          value,
        }
        await sidecar().setBytes(keyOf(cacheKey), encodeEnvelope(stored), {
          contentType: ENVELOPE_CONTENT_TYPE,
          ttlSeconds: ttlFor(entry.expire),
          tags,
        })
        warnings.served()
      } catch (err) {
        // A render that failed (its stream errored) is not stored, silently: Next.js reports it.
        if (err instanceof PgsidecarError) warnings.writeFailed(err)
      } finally {
        if (pendingSets.get(cacheKey) === pending) pendingSets.delete(cacheKey)
        done()
      }
    },

    async refreshTags() {
      // Nothing to sync: every `get` checks the tags in the sidecar.
    },

    async getExpiration() {
      return Infinity
    },

    async updateTags(tags, durations) {
      await invalidate(sidecar(), tags, durations)
    },
  }
}

/** For `cacheHandlers` in next.config: `import.meta.resolve('@pgsidecar/client/next/use-cache')`. */
const handler: CacheHandler = createUseCacheHandler()
export default handler
