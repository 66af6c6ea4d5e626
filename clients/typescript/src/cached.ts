// `getCached(key, fetcher, { ttlSeconds, tags })`: the scaling guide's cache-aside helper on the
// sidecar, with one fetcher per key at a time in the process (single flight), one per key at a
// time in the fleet (the sidecar's fill leases), and a fail-open path.

import {
  MAX_FILL_LEASE_MS,
  MAX_LEASE_WAIT_MS,
  MAX_TTL_SECONDS,
  PgsidecarClient,
  PgsidecarError,
  checkTagList,
  isUnavailable,
  type ClientOptions,
  type LeaseOptions,
} from './client.js'

/** The guide's default TTL: one hour. */
export const DEFAULT_CACHE_TTL_SECONDS = 3600
/** How long a fill lease lasts by default: a fetcher slower than this may be doubled by another container. */
export const DEFAULT_FILL_LEASE_MS = 10_000
/** How long a miss waits by default for another container's fill before computing the value itself. */
export const DEFAULT_LEASE_WAIT_MS = 5000

/** Lease durations: `fillLeaseMs` 0 turns leases off (a plain read, every container computes its own miss). */
export interface LeaseSettings {
  /**
   * How long the fill lease of a missing key lasts (1 to 60000 ms): while it does, the rest of
   * the fleet waits for this caller's value instead of calling its own fetcher. Set it above
   * the fetcher's usual time. 0: no leases. Default 10000.
   */
  fillLeaseMs?: number
  /**
   * How long a miss waits (0 to 30000 ms) for the value another container is computing (or for
   * its lease to lapse) before calling the fetcher itself. Default 5000.
   */
  leaseWaitMs?: number
}

export interface CacheOptions extends LeaseSettings {
  /** The client, or options to make one. Default: a client from `PGSIDECAR_URL` / `PGSIDECAR_TOKEN`. */
  client?: PgsidecarClient | ClientOptions
  /**
   * What to do when the sidecar is unavailable (unreachable, timed out, overloaded, database
   * down): `'open'` (default) calls the fetcher directly and warns once per outage;
   * `'throw'` rejects with the `PgsidecarError`.
   */
  onUnavailable?: 'open' | 'throw'
  /** Where the warnings go. Default `console.warn`. Never given a key or a value. */
  warn?: (message: string) => void
  /** TTL when a call gives none. Default 3600. */
  defaultTtlSeconds?: number
}

export interface GetCachedOptions extends LeaseSettings {
  /** 1 to 31536000 seconds. Default 3600 (or the cache's `defaultTtlSeconds`). */
  ttlSeconds?: number
  /** Tags for `invalidateTags` (and Next.js's `revalidateTag`, which shares them). */
  tags?: readonly string[]
}

export interface Cache {
  readonly client: PgsidecarClient
  /**
   * The cached JSON value of `key`; on a miss, `fetcher()`'s result, stored for `ttlSeconds`.
   * Concurrent calls for one key in this process share one read and one fetcher call; across
   * the fleet, the sidecar's fill lease lets one caller compute a missing key while the others
   * wait for its value.
   */
  getCached<T>(key: string, fetcher: () => T | Promise<T>, options?: GetCachedOptions): Promise<T>
}

function clientOf(option: PgsidecarClient | ClientOptions | undefined): PgsidecarClient {
  return option instanceof PgsidecarClient ? option : new PgsidecarClient(option)
}

function describe(err: unknown): string {
  return err instanceof PgsidecarError ? `${err.code}: ${err.message}` : String(err)
}

class SidecarCache implements Cache {
  readonly client: PgsidecarClient
  readonly #failOpen: boolean
  readonly #warn: (message: string) => void
  readonly #defaultTtl: number
  readonly #fillLeaseMs: number
  readonly #leaseWaitMs: number
  /** Fills in progress, by key: later callers join them instead of calling the fetcher again. */
  readonly #inflight = new Map<string, Promise<unknown>>()
  /** Set after the outage warning, cleared by the next call the sidecar serves: one warning per outage. */
  #warned = false
  #tooLargeWarned = false

  constructor(options: CacheOptions) {
    this.client = clientOf(options.client)
    if (options.onUnavailable !== undefined && options.onUnavailable !== 'open' && options.onUnavailable !== 'throw') {
      throw new TypeError("pgsidecar: onUnavailable must be 'open' or 'throw'")
    }
    this.#failOpen = options.onUnavailable !== 'throw'
    this.#warn = options.warn ?? ((message) => console.warn(message))
    this.#defaultTtl = options.defaultTtlSeconds ?? DEFAULT_CACHE_TTL_SECONDS
    checkTtl(this.#defaultTtl)
    this.#fillLeaseMs = options.fillLeaseMs ?? DEFAULT_FILL_LEASE_MS
    this.#leaseWaitMs = options.leaseWaitMs ?? DEFAULT_LEASE_WAIT_MS
    checkLease(this.#fillLeaseMs, this.#leaseWaitMs)
  }

  getCached<T>(key: string, fetcher: () => T | Promise<T>, options: GetCachedOptions = {}): Promise<T> {
    if (typeof fetcher !== 'function') return Promise.reject(new TypeError('pgsidecar: fetcher must be a function'))
    const ttlSeconds = options.ttlSeconds ?? this.#defaultTtl
    const fillLeaseMs = options.fillLeaseMs ?? this.#fillLeaseMs
    const waitMs = options.leaseWaitMs ?? this.#leaseWaitMs
    try {
      checkTtl(ttlSeconds)
      checkTagList(options.tags)
      checkLease(fillLeaseMs, waitMs)
    } catch (err) {
      return Promise.reject(err)
    }
    const running = this.#inflight.get(key)
    if (running) return running as Promise<T>
    const lease = fillLeaseMs === 0 ? null : { fillLeaseMs, waitMs }
    const flight = this.#fill(key, fetcher, ttlSeconds, options.tags ?? [], lease)
    this.#inflight.set(key, flight)
    const forget = () => {
      if (this.#inflight.get(key) === flight) this.#inflight.delete(key)
    }
    flight.then(forget, forget)
    return flight
  }

  async #fill<T>(key: string, fetcher: () => T | Promise<T>, ttlSeconds: number, tags: readonly string[], leasing: LeaseOptions | null): Promise<T> {
    // 1. Read. With leases, a miss either makes this caller the key's filler (a lease), or
    //    waits while another container fills it and returns that value.
    let lease: string | undefined
    try {
      const entry = leasing ? await this.client.getOrLease<T>(key, leasing) : await this.client.getEntry<T>(key)
      this.#served()
      if (entry?.kind === 'json') return entry.value
      if (entry?.kind === 'lease') lease = entry.lease
      // absent (no lease: the wait ran out, or leases are off), or bytes someone else stored
      // under this key: compute and overwrite
    } catch (err) {
      if (!isUnavailable(err)) throw err
      this.#unavailable(err)
      return fetcher()
    }
    // 2. Compute. A fetcher that fails leaves the lease to lapse: the others then take it over.
    const value = await fetcher()
    // 3. Write before answering, so the next caller in this process finds it.
    await this.#write(key, value, ttlSeconds, tags, lease)
    return value
  }

  async #write(key: string, value: unknown, ttlSeconds: number, tags: readonly string[], lease: string | undefined): Promise<void> {
    let body: string | undefined
    try {
      body = JSON.stringify(value)
    } catch {
      body = undefined
    }
    if (body === undefined) {
      this.#warn('pgsidecar: getCached got a value that is not JSON (undefined, a function, a BigInt or a cycle); it was returned but not cached')
      return
    }
    try {
      // With a lease, null means it was voided (the key was deleted or invalidated meanwhile, or
      // the lease lapsed and another caller took it): the value may be outdated, so it is
      // returned but not written, and not retried.
      await this.client.setBytes(key, body, { ttlSeconds, tags, contentType: 'application/json', lease })
      this.#served()
    } catch (err) {
      if (err instanceof PgsidecarError && err.code === 'payload_too_large') {
        if (!this.#tooLargeWarned) this.#warn('pgsidecar: a getCached value is larger than cache.max_value_bytes; such values are returned but not cached')
        this.#tooLargeWarned = true
        return
      }
      if (!isUnavailable(err)) throw err
      this.#unavailable(err)
    }
  }

  #served(): void {
    this.#warned = false
  }

  #unavailable(err: unknown): void {
    if (!this.#failOpen) throw err
    if (this.#warned) return
    this.#warned = true
    this.#warn(`pgsidecar: the sidecar is unavailable (${describe(err)}); getCached calls fetchers directly, uncached, until it answers again`)
  }
}

function checkLease(fillLeaseMs: number, waitMs: number): void {
  if (!(Number.isInteger(fillLeaseMs) && fillLeaseMs >= 0 && fillLeaseMs <= MAX_FILL_LEASE_MS)) {
    throw new PgsidecarError('invalid_lease', 400, `fillLeaseMs must be an integer from 0 (no leases) to ${MAX_FILL_LEASE_MS}`)
  }
  if (!(Number.isInteger(waitMs) && waitMs >= 0 && waitMs <= MAX_LEASE_WAIT_MS)) {
    throw new PgsidecarError('invalid_lease', 400, `leaseWaitMs must be an integer from 0 to ${MAX_LEASE_WAIT_MS}`)
  }
}

function checkTtl(ttl: number): void {
  if (!(Number.isInteger(ttl) && ttl >= 1 && ttl <= MAX_TTL_SECONDS)) {
    throw new PgsidecarError('invalid_ttl', 400, `ttlSeconds must be an integer from 1 to ${MAX_TTL_SECONDS}`)
  }
}

/** A cache with its own client, options and in-process single flight. */
export function createCache(options: CacheOptions = {}): Cache {
  return new SidecarCache(options)
}

let defaultCache: Cache | undefined

/**
 * `getCached` on the default cache (a client from `PGSIDECAR_URL` / `PGSIDECAR_TOKEN`, fail
 * open). Made on first use, so the environment is read then, not at import.
 */
export function getCached<T>(key: string, fetcher: () => T | Promise<T>, options?: GetCachedOptions): Promise<T> {
  defaultCache ??= createCache()
  return defaultCache.getCached(key, fetcher, options)
}
