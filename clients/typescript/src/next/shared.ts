// What both Next.js handlers share: key and tag mapping, tag-checked reads, fleet-wide tag
// invalidation (coalesced, since Next.js calls every handler for one `revalidateTag`), and the
// once-per-outage warning.

import { createHash } from 'node:crypto'

import {
  MAX_TAGS_PER_ENTRY,
  MAX_TAGS_PER_REQUEST,
  MAX_TTL_SECONDS,
  PgsidecarClient,
  PgsidecarError,
  isUnavailable,
  type BytesEntry,
  type ClientOptions,
} from '../client.js'

export interface NextHandlerOptions {
  /** The client, or options to make one. Default: a client from `PGSIDECAR_URL` / `PGSIDECAR_TOKEN`. */
  client?: PgsidecarClient | ClientOptions
  /** Prefix of every key the handler writes. Default `next:`. */
  keyPrefix?: string
  /** Where warnings go (sidecar unavailable, entry too large). Default `console.warn`. */
  warn?: (message: string) => void
}

export function sha256Hex(text: string): string {
  return createHash('sha256').update(text).digest('hex')
}

const CONTROL = /[\u0000-\u001f\u007f-\u009f]/

/** `prefix + raw` when that is a valid sidecar key, else `prefix + "#" + sha256(raw)`. */
export function storageKey(prefix: string, raw: string): string {
  const key = prefix + raw
  if (Buffer.byteLength(key) <= 512 && !CONTROL.test(key) && !key.startsWith('_') && key !== '.' && key !== '..') return key
  return `${prefix}#${sha256Hex(raw)}`
}

/**
 * Next.js tags as sidecar tags. A tag the API cannot carry (a comma, a control character, more
 * than 256 bytes) becomes `#` + its SHA-256, the same on every container, so invalidating it
 * still reaches the entries that carry it.
 */
export function serverTag(tag: string): string {
  if (tag.length > 0 && Buffer.byteLength(tag) <= 256 && !tag.includes(',') && !CONTROL.test(tag)) return tag
  return `#${sha256Hex(tag)}`
}

export function serverTags(tags: Iterable<string>): string[] {
  return [...new Set([...tags].map(serverTag))]
}

export function clientOf(option: PgsidecarClient | ClientOptions | undefined): PgsidecarClient {
  return option instanceof PgsidecarClient ? option : new PgsidecarClient(option)
}

/** TTL for an entry that Next.js keeps `seconds` (any number, Infinity included). */
export function ttlFor(seconds: number | undefined | false): number {
  if (typeof seconds !== 'number' || !Number.isFinite(seconds) || seconds >= MAX_TTL_SECONDS) return MAX_TTL_SECONDS
  return Math.max(1, Math.ceil(seconds))
}

/** Says once per outage that the sidecar is unavailable, and once per process that an entry was too large. */
export class Warnings {
  #outage = false
  #tooMany = false
  #tooLarge = false
  readonly #refused = new Set<string>()
  readonly #warn: (message: string) => void
  readonly #who: string

  constructor(who: string, warn: ((message: string) => void) | undefined) {
    this.#who = who
    this.#warn = warn ?? ((message) => console.warn(message))
  }

  served(): void {
    this.#outage = false
  }

  /** Handles a failed call: warns for unavailability (fail open), rethrows anything else. */
  failed(err: unknown): void {
    if (err instanceof PgsidecarError && err.code === 'payload_too_large') {
      if (!this.#tooLarge) this.#warn(`pgsidecar: ${this.#who}: an entry is larger than the sidecar's cache.max_value_bytes; such entries are not shared`)
      this.#tooLarge = true
      return
    }
    if (!isUnavailable(err)) throw err
    if (this.#outage) return
    this.#outage = true
    const why = err instanceof PgsidecarError ? `${err.code}: ${err.message}` : String(err)
    this.#warn(`pgsidecar: ${this.#who}: the sidecar is unavailable (${why}); entries are not shared until it answers again`)
  }

  /** Handles a failed write, which must never fail a render: every cause is warned about (once per code). */
  writeFailed(err: unknown): void {
    try {
      this.failed(err)
    } catch {
      const code = err instanceof PgsidecarError ? err.code : 'error'
      if (this.#refused.has(code)) return
      this.#refused.add(code)
      this.#warn(`pgsidecar: ${this.#who}: the sidecar refused an entry (${code}); such entries are not shared`)
    }
  }

  tooManyTags(): void {
    if (!this.#tooMany) this.#warn(`pgsidecar: ${this.#who}: an entry carries more than ${MAX_TAGS_PER_ENTRY} tags; such entries are not shared`)
    this.#tooMany = true
  }
}

/**
 * A tag-checked read in one round trip (`check_tags`): null when absent, expired, or expired by
 * one of its own tags or of `extraTags`; `stale` set when one of them was only marked stale.
 * More than 100 extra tags need a second call (`_tags`) for the rest.
 */
export async function readChecked(client: PgsidecarClient, key: string, extraTags: readonly string[]): Promise<BytesEntry | null> {
  const tags = serverTags(extraTags)
  const first = tags.slice(0, MAX_TAGS_PER_REQUEST)
  const entry = await client.getEntry(key, { checkTags: first })
  // A JSON entry under a handler's key was not written by a handler: treat it as missing.
  if (entry === null || entry.kind !== 'bytes') return null
  const bytes = entry
  for (let i = MAX_TAGS_PER_REQUEST; i < tags.length; i += MAX_TAGS_PER_REQUEST) {
    const records = await client.tagRecords(tags.slice(i, i + MAX_TAGS_PER_REQUEST))
    const written = bytes.writtenAt ?? 0
    const now = Date.now()
    for (const tag of Object.keys(records.tags)) {
      const invalidated = records.tags[tag]
      const expires = records.expires[tag]
      if (expires != null && expires > written && expires <= now) return null
      if (invalidated != null && invalidated > written) bytes.stale = true
    }
  }
  return bytes
}

const pendingInvalidations = new Map<string, Promise<void>>()

/**
 * Records a Next.js tag invalidation for the whole fleet. `durations` as Next.js passes them:
 * absent means expire now; `{ expire }` marks the tags stale now and expired `expire` seconds
 * later (stale-while-revalidate); `{}` marks them stale only. Identical invalidations issued
 * while one is in flight share it: Next.js calls `revalidateTag` on the incremental cache
 * handler and `updateTags` on every `'use cache'` handler for the same tags.
 */
export function invalidate(client: PgsidecarClient, tags: readonly string[], durations?: { expire?: number }): Promise<void> {
  const mapped = serverTags(tags)
  if (mapped.length === 0) return Promise.resolve()
  let expireSeconds: number | undefined
  if (durations !== undefined) {
    const expire = durations.expire
    // stale now, expired later; without an expiry, "later" is as late as the API allows
    expireSeconds = expire === undefined ? MAX_TTL_SECONDS : expire <= 0 ? undefined : ttlFor(expire)
  }
  const id = JSON.stringify([client.url, [...mapped].sort(), expireSeconds ?? 0])
  const pending = pendingInvalidations.get(id)
  if (pending) return pending
  const run = (async () => {
    for (let i = 0; i < mapped.length; i += MAX_TAGS_PER_REQUEST) {
      await client.invalidateTags(mapped.slice(i, i + MAX_TAGS_PER_REQUEST), { expireSeconds })
    }
  })()
  pendingInvalidations.set(id, run)
  const forget = () => pendingInvalidations.delete(id)
  run.then(forget, forget)
  return run
}
