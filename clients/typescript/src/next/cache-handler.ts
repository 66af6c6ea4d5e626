// Next.js's incremental cache (`cacheHandler` in next.config: ISR pages, route handlers, the
// `fetch` cache, `unstable_cache`) in the sidecar, shared by every container of the fleet.
//
// Types mirror Next.js 16's `CacheHandler` (packages/next/src/server/lib/incremental-cache/
// index.ts and server/response-cache/types.ts) structurally, so this package needs no `next`.
// Next.js makes one handler per request: the constructor only reads the build id, once per build.

import { readFileSync } from 'node:fs'
import { join } from 'node:path'

import type { PgsidecarClient } from '../client.js'
import { ENVELOPE_CONTENT_TYPE, decodeEnvelope, encodeEnvelope } from './envelope.js'
import {
  Warnings,
  clientOf,
  invalidate,
  readChecked,
  serverTags,
  storageKey,
  ttlFor,
  type NextHandlerOptions,
} from './shared.js'

/** `CacheControl` of Next.js: the lifetime of a page or route entry. */
export interface CacheControl {
  revalidate: number | false
  expire: number | undefined
}

/** What Next.js passes to the constructor (the fields this handler reads). */
export interface CacheHandlerContext {
  serverDistDir?: string
  dev?: boolean
}

/**
 * An incremental cache value: Next.js's tagged union by `kind` (APP_PAGE, APP_ROUTE, PAGES,
 * FETCH, REDIRECT, IMAGE). Opaque here: stored as given and returned unchanged, so it is typed
 * loosely enough for the class to be assignable to Next.js's own `CacheHandler` type.
 */
// eslint-disable-next-line @typescript-eslint/no-explicit-any
export type IncrementalCacheValue = any

/** What `get` answers (`CacheHandlerValue` in Next.js). */
export interface CacheHandlerValue {
  lastModified: number
  age?: number
  cacheState?: string
  value: IncrementalCacheValue | null
  cacheControl?: CacheControl
}

export interface GetContext {
  kind: string
  /** FETCH: the fetch's own tags and the route's implicit (soft) tags. */
  tags?: string[]
  softTags?: string[]
  revalidate?: number | false
}

export interface SetContext {
  fetchCache?: boolean
  tags?: string[]
  cacheControl?: CacheControl
}

/** An incremental cache handler instance, as Next.js calls it. */
export interface IncrementalCacheHandler {
  get(key: string, ctx: GetContext): Promise<CacheHandlerValue | null>
  set(key: string, data: IncrementalCacheValue | null, ctx: SetContext): Promise<void>
  revalidateTag(tags: string | string[], durations?: { expire?: number }): Promise<void>
  resetRequestCache(): void
}

/** What `cacheHandler` must export: a class Next.js instantiates (once per request). */
export type IncrementalCacheHandlerClass = new (ctx?: CacheHandlerContext) => IncrementalCacheHandler

/** What is stored: the value with the metadata `get` needs to answer like Next.js's own cache. */
interface Stored {
  lastModified: number
  value: IncrementalCacheValue | null
  cacheControl?: CacheControl
}

const TAGS_HEADER = 'x-next-cache-tags'
const WHO = 'next cacheHandler'

const buildIds = new Map<string, string>()

/** The build id of the running build (keys of pages and routes are scoped by it; fetch entries are not). */
function buildIdOf(serverDistDir: string | undefined): string {
  if (!serverDistDir) return 'unknown'
  let id = buildIds.get(serverDistDir)
  if (id === undefined) {
    try {
      id = readFileSync(join(serverDistDir, '..', 'BUILD_ID'), 'utf8').trim() || 'unknown'
    } catch {
      id = 'unknown'
    }
    buildIds.set(serverDistDir, id)
  }
  return id
}

/** The tags a page or route entry carries: Next.js lists them (implicit ones included) in a header. */
function entryTags(value: IncrementalCacheValue | null, ctx: SetContext): string[] {
  if (ctx.fetchCache) return ctx.tags ?? []
  const headers = value?.headers as Record<string, unknown> | undefined
  const header = headers?.[TAGS_HEADER]
  return typeof header === 'string' && header !== '' ? header.split(',') : []
}

/**
 * When the sidecar says a tag of the entry was marked stale (`revalidateTag(tag, profile)` on
 * any container), make Next.js see it as stale, so it serves it once more and regenerates it in
 * the background (stale-while-revalidate, as with its own tag manifest): the answer's age is put
 * just past its revalidate time. A page or route that never revalidates by time is answered with
 * a revalidate time of one second for this once (the regenerated entry brings its own back).
 */
function staleAnswer(stored: Stored, kind: string, ctxRevalidate: number | false | undefined): CacheHandlerValue {
  const now = Date.now()
  if (kind === 'FETCH') {
    const revalidate = typeof ctxRevalidate === 'number' && ctxRevalidate > 0 ? ctxRevalidate : (stored.value?.revalidate as number | undefined)
    const seconds = typeof revalidate === 'number' && revalidate > 0 ? revalidate : 1
    return { lastModified: Math.min(stored.lastModified, now - seconds * 1000 - 1), value: stored.value }
  }
  const cc = stored.cacheControl
  if (cc && typeof cc.revalidate === 'number' && cc.revalidate > 0) {
    return { lastModified: Math.min(stored.lastModified, now - cc.revalidate * 1000 - 1), value: stored.value, cacheControl: cc }
  }
  return { lastModified: Math.min(stored.lastModified, now - 1001), value: stored.value, cacheControl: { revalidate: 1, expire: cc?.expire } }
}

/** Makes a `cacheHandler` class with these options (the default export uses the defaults). */
export function createCacheHandler(options: NextHandlerOptions = {}): IncrementalCacheHandlerClass {
  let client: PgsidecarClient | undefined
  const prefix = options.keyPrefix ?? 'next:'
  const warnings = new Warnings(WHO, options.warn)
  // Made on first use, not at import: `next build` loads this module too.
  const sidecar = () => (client ??= clientOf(options.client))

  return class PgsidecarCacheHandler implements IncrementalCacheHandler {
    readonly #buildId: string

    constructor(ctx: CacheHandlerContext = {}) {
      this.#buildId = buildIdOf(ctx.serverDistDir)
    }

    #key(key: string, fetchCache: boolean): string {
      // fetch entries outlive a deploy (as in Next.js's own cache); pages and routes do not
      return fetchCache ? storageKey(`${prefix}fetch:`, key) : storageKey(`${prefix}${this.#buildId}:`, key)
    }

    async get(key: string, ctx: GetContext): Promise<CacheHandlerValue | null> {
      const isFetch = ctx.kind === 'FETCH'
      // A fetch entry is checked against its tags and the route's implicit tags; a page or a
      // route against the tags it was stored with (the server reads those itself).
      const checkTags = isFetch ? [...(ctx.tags ?? []), ...(ctx.softTags ?? [])] : []
      let entry
      try {
        entry = await readChecked(sidecar(), this.#key(key, isFetch), checkTags)
        warnings.served()
      } catch (err) {
        warnings.failed(err)
        return null
      }
      if (entry === null) return null
      let stored: Stored
      try {
        stored = decodeEnvelope(entry.value) as Stored
      } catch {
        return null // not ours, or from an incompatible version: a miss, overwritten on set
      }
      if (entry.stale) return staleAnswer(stored, ctx.kind, ctx.revalidate)
      return stored.cacheControl === undefined
        ? { lastModified: stored.lastModified, value: stored.value }
        : { lastModified: stored.lastModified, value: stored.value, cacheControl: stored.cacheControl }
    }

    async set(key: string, data: IncrementalCacheValue | null, ctx: SetContext): Promise<void> {
      const isFetch = ctx.fetchCache === true || data?.kind === 'FETCH'
      const tags = serverTags(entryTags(data, ctx))
      if (tags.length > 64) {
        warnings.tooManyTags()
        return
      }
      const cacheControl = isFetch ? undefined : ctx.cacheControl
      const stored: Stored = cacheControl === undefined ? { lastModified: Date.now(), value: data } : { lastModified: Date.now(), value: data, cacheControl }
      // Kept as long as Next.js may serve it (its `expire`); fetch entries as long as the API allows, as on disk.
      const ttlSeconds = ttlFor(cacheControl?.expire)
      try {
        await sidecar().setBytes(this.#key(key, isFetch), encodeEnvelope(stored), { contentType: ENVELOPE_CONTENT_TYPE, ttlSeconds, tags })
        warnings.served()
      } catch (err) {
        warnings.writeFailed(err)
      }
    }

    /** Expires (or, with `durations`, marks stale) the tags on every container; throws when the sidecar cannot record it. */
    async revalidateTag(tags: string | string[], durations?: { expire?: number }): Promise<void> {
      await invalidate(sidecar(), typeof tags === 'string' ? [tags] : tags, durations)
    }

    resetRequestCache(): void {}
  }
}

/** For `cacheHandler` in next.config: `import.meta.resolve('@pgsidecar/client/next/cache-handler')`. */
const PgsidecarCacheHandler = createCacheHandler()
export default PgsidecarCacheHandler
