// BetterAuth's `secondaryStorage` in the sidecar: sessions (and verification values and rate
// limits) shared by every container of the fleet.
//
// BetterAuth uses session TOKENS as keys, so a key never reaches the sidecar as it is: it is
// hashed (SHA-256, under a prefix) before it becomes a cache key, and so never appears in a URL,
// a log or the database. Values are BetterAuth's strings, stored as `text/plain` bytes.

import { createHash } from 'node:crypto'

import { MAX_TTL_SECONDS, PgsidecarClient, PgsidecarError, type ClientOptions } from './client.js'

/**
 * BetterAuth's `SecondaryStorage` (better-auth 1.7: `@better-auth/core` `db/type`), structurally:
 * `getAndDelete` and `increment` are atomic across the fleet (conditional requests on ETags).
 */
export interface SecondaryStorage {
  get(key: string): Promise<string | null>
  set(key: string, value: string, ttl?: number): Promise<void>
  delete(key: string): Promise<void>
  getAndDelete(key: string): Promise<string | null>
  increment(key: string, ttl: number): Promise<number>
}

export interface PgsidecarStorageOptions {
  /** The client, or options to make one. Default: a client from `PGSIDECAR_URL` / `PGSIDECAR_TOKEN`. */
  client?: PgsidecarClient | ClientOptions
  /** Prefix of the (hashed) keys. Default `better-auth:`. */
  keyPrefix?: string
}

const TEXT = 'text/plain; charset=utf-8'
/** Optimistic rounds of one `increment` / `getAndDelete` before giving up (other containers kept winning). */
const MAX_ATTEMPTS = 32

function ttlSeconds(ttl: number | undefined | null): number | null {
  // BetterAuth writes some keys without a TTL (per-user revocation marks): the longest the API allows.
  if (ttl === undefined || ttl === null || ttl === 0) return MAX_TTL_SECONDS
  if (typeof ttl !== 'number' || Number.isNaN(ttl)) throw new TypeError('pgsidecar: ttl must be a number of seconds')
  if (ttl < 0) return null // already expired
  return Math.min(MAX_TTL_SECONDS, Math.max(1, Math.ceil(ttl)))
}

/** The ETag conditional writes need; a sidecar without them cannot make these calls atomic. */
function etagOf(entry: { etag: string | null }): string {
  if (entry.etag === null) {
    throw new PgsidecarError('unsupported', 0, 'this sidecar does not send ETags (conditional requests); update it to use getAndDelete and increment')
  }
  return entry.etag
}

const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms))

/** Runs calls for one key one after another in this process, so only other containers contend. */
class KeyedQueue {
  readonly #tails = new Map<string, Promise<void>>()

  run<T>(key: string, fn: () => Promise<T>): Promise<T> {
    const previous = this.#tails.get(key) ?? Promise.resolve()
    const result = previous.then(fn)
    const tail = result.then(
      () => {},
      () => {},
    )
    this.#tails.set(key, tail)
    void tail.then(() => {
      if (this.#tails.get(key) === tail) this.#tails.delete(key)
    })
    return result
  }
}

/** A BetterAuth `secondaryStorage` backed by the sidecar. */
export function pgsidecarStorage(options: PgsidecarStorageOptions = {}): SecondaryStorage {
  let client: PgsidecarClient | undefined
  const sidecar = () => (client ??= options.client instanceof PgsidecarClient ? options.client : new PgsidecarClient(options.client))
  const prefix = options.keyPrefix ?? 'better-auth:'
  const keyOf = (key: string) => prefix + createHash('sha256').update(key).digest('hex')
  const decoder = new TextDecoder()
  const queue = new KeyedQueue()

  const storage: SecondaryStorage = {
    async get(key) {
      const entry = await sidecar().getBytes(keyOf(key))
      return entry === null ? null : decoder.decode(entry.bytes)
    },

    async set(key, value, ttl) {
      const seconds = ttlSeconds(ttl)
      if (seconds === null) {
        await sidecar().delete(keyOf(key))
        return
      }
      await sidecar().setBytes(keyOf(key), String(value), { contentType: TEXT, ttlSeconds: seconds })
    },

    async delete(key) {
      await sidecar().delete(keyOf(key))
    },

    // Read, then delete only that version (If-Match): of two containers taking one value, one gets it.
    getAndDelete(key) {
      const k = keyOf(key)
      return queue.run(k, async () => {
        for (let attempt = 0; attempt < MAX_ATTEMPTS; attempt++) {
          const entry = await sidecar().getEntry(k)
          if (entry === null || entry.kind === 'not_modified') return null
          const text = entry.kind === 'bytes' ? decoder.decode(entry.value) : JSON.stringify(entry.value)
          if (await sidecar().delete(k, { ifMatch: etagOf(entry) })) return text
          await sleep(Math.random() * 5 * (attempt + 1))
        }
        throw new PgsidecarError('contention', 409, 'getAndDelete lost to concurrent writers too many times')
      })
    },

    // Create with If-None-Match: *, or write n + 1 over the version read (If-Match), keeping the
    // expiry set at creation (a fixed window, to within about a second: `Expires` has that precision).
    increment(key, ttl) {
      const k = keyOf(key)
      const windowSeconds = ttlSeconds(ttl) ?? 1
      return queue.run(k, async () => {
        for (let attempt = 0; attempt < MAX_ATTEMPTS; attempt++) {
          const entry = await sidecar().getEntry(k)
          if (entry === null || entry.kind === 'not_modified') {
            if (await sidecar().setBytes(k, '1', { contentType: TEXT, ttlSeconds: windowSeconds, ifNoneMatch: '*' })) return 1
          } else {
            const text = entry.kind === 'bytes' ? decoder.decode(entry.value) : String(entry.value)
            const current = /^\d+$/.test(text.trim()) ? Number(text.trim()) : 0
            const left = entry.expiresAt === null ? windowSeconds : Math.round((entry.expiresAt.getTime() + 500 - Date.now()) / 1000)
            const next = current + 1
            const written = await sidecar().setBytes(k, String(next), {
              contentType: TEXT,
              ttlSeconds: Math.min(windowSeconds, Math.max(1, left)),
              ifMatch: etagOf(entry),
            })
            if (written) return next
          }
          await sleep(Math.random() * 5 * (attempt + 1))
        }
        throw new PgsidecarError('contention', 409, 'increment lost to concurrent writers too many times')
      })
    },
  }
  return storage
}
