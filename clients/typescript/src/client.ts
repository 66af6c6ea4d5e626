// The HTTP client of pgsidecar's data API: one class, one error type, one method per route.
//
// Every call has a timeout (`AbortSignal.timeout`). Nothing here logs: errors carry the API's
// `code`, HTTP `status` and message, never a token, a key or a value. Calls go over `fetch`, or
// over `node:http` to a unix socket for a `unix:` URL (./unix.ts); the change feed's stream
// is read by ./events.ts.

import { openSubscription, type ChangeEvent, type SubscribeOptions, type Subscription, type CallbackSubscription } from './events.js'
import { PgsidecarError, isUnavailable } from './errors.js'
import { unixTransport, type Transport } from './unix.js'

export { PgsidecarError, isUnavailable }

/** The data API's address when neither the option nor `PGSIDECAR_URL` says otherwise. */
export const DEFAULT_URL = 'http://127.0.0.1:7070'
/** Per-call timeout by default: the sidecar's own `server.request_timeout_ms` default. */
export const DEFAULT_TIMEOUT_MS = 5000
/** The longest TTL the API accepts, for sessions and cache entries (one year). */
export const MAX_TTL_SECONDS = 31_536_000
/** Most tags one cache entry may carry. */
export const MAX_TAGS_PER_ENTRY = 64
/** Most tags one `_invalidate`, `_tags` or `check_tags` may name. */
export const MAX_TAGS_PER_REQUEST = 100

export interface ClientOptions {
  /**
   * Base URL of the data API (`http://host:port`), or `unix:/path/to.sock` for a data API on a
   * unix socket. Default: `PGSIDECAR_URL`, else `http://127.0.0.1:7070`.
   */
  url?: string
  /** Shared secret (`server.auth_token`), sent as `Authorization: Bearer`. Default: `PGSIDECAR_TOKEN`. */
  token?: string
  /** Timeout of each call in milliseconds, body included. Default 5000. */
  timeoutMs?: number
  /** The `fetch` to use (for instrumentation or tests; `http(s)` URLs only). Default: the global `fetch`. */
  fetch?: typeof fetch
}

/** Per-call options every method accepts. */
export interface CallOptions {
  /** Aborts the call early (the timeout still applies). */
  signal?: AbortSignal
  /** Overrides the client's timeout for this call. */
  timeoutMs?: number
}

// ---------------------------------------------------------------------------------------------
// Wire types (as in openapi.json)

/** A session as the API returns it. It never contains the token. */
export interface Session {
  id: string
  user_id: string
  /** RFC 3339, UTC. */
  created_at: string
  updated_at: string
  expires_at: string
  ip_address: string | null
  user_agent: string | null
  data: Record<string, unknown>
}

export interface CreateSessionInput {
  user_id: string
  /** 1 to 31536000; default `sessions.default_ttl_seconds` (7 days). */
  ttl_seconds?: number | null
  ip_address?: string | null
  user_agent?: string | null
  data?: Record<string, unknown> | null
}

export interface CreatedSession {
  /** Shown this once: the sidecar stores only its hash. */
  token: string
  session: Session
}

/** Metadata of a cache entry, from the response headers. */
export interface EntryMeta {
  /** The stored `Content-Type` (`application/json` for JSON entries). */
  contentType: string
  /** Strong entity tag of this version (null from a sidecar without conditional requests). */
  etag: string | null
  /** When the entry expires (from `Expires`, one-second precision). */
  expiresAt: Date | null
  /** When the entry was last written, ms since the epoch on the database clock. */
  writtenAt: number | null
  /** A tag-checked read found a tag invalidated after the write, with its expiry still ahead: serve, but refresh. */
  stale: boolean
}

export interface JsonEntry<T = unknown> extends EntryMeta {
  kind: 'json'
  value: T
}

export interface BytesEntry extends EntryMeta {
  kind: 'bytes'
  value: Uint8Array
}

export type CacheEntry<T = unknown> = JsonEntry<T> | BytesEntry

/** Answer of a conditional read whose `ifNoneMatch` matched: the caller's copy is current. */
export interface NotModified {
  kind: 'not_modified'
  etag: string | null
  expiresAt: Date | null
}

export interface GetOptions extends CallOptions {
  /** Answer `not_modified` instead of the value when the live entry has one of these ETags (`*`: any). */
  ifNoneMatch?: string | string[]
  /**
   * Tag-checked read (one round trip): the entry counts as missing when one of its own tags or
   * of these was expired after it was written, and comes back with `stale: true` when one was
   * only marked stale. Pass `[]` to check the entry's own tags only.
   */
  checkTags?: readonly string[]
}

export interface WriteOptions extends CallOptions {
  /** 1 to 31536000 seconds; default `cache.default_ttl_seconds` (3600). */
  ttlSeconds?: number
  /** Up to 64 tags (1 to 256 bytes each, no commas or control characters). */
  tags?: readonly string[]
  /** Write only over a live entry with one of these ETags (`*`: any live entry). */
  ifMatch?: string | string[]
  /** `*`: write only when the key is absent or expired; ETags: only when the live entry has none of them. */
  ifNoneMatch?: string | string[]
  /**
   * Fill lease token (from `getOrLease`): write only while it is still this key's lease and no
   * delete or invalidation touched the key since it was granted; releases it. Otherwise nothing
   * is written and the call returns null (`409 lease_voided`).
   */
  lease?: string
}

export interface SetBytesOptions extends WriteOptions {
  /** Stored and returned with the bytes. Default `application/octet-stream`. */
  contentType?: string
}

/** Most and least a fill lease may last, and longest a lease read may wait (the API's bounds). */
export const MAX_FILL_LEASE_MS = 60_000
export const MAX_LEASE_WAIT_MS = 30_000

export interface LeaseOptions extends CallOptions {
  /** How long the fill lease lasts when this call gets it: 1 to 60000 ms. */
  fillLeaseMs: number
  /**
   * How long to wait, 0 to 30000 ms, while another caller anywhere in the fleet holds the
   * lease: for its value, or for its lease to expire. The call's timeout is extended by as much.
   */
  waitMs: number
}

/** A miss that made this caller the key's filler: compute the value, then write it with `{ lease }`. */
export interface Lease {
  kind: 'lease'
  lease: string
}

/** A write that happened: the ETag of the version written (null from an older sidecar). */
export interface Written {
  etag: string | null
}

export interface DeleteOptions extends CallOptions {
  /** Delete only a live entry with one of these ETags (`*`: any live entry). */
  ifMatch?: string | string[]
}

export interface MgetResult<T = unknown> {
  /** JSON entries. */
  hits: Record<string, T>
  /** Entries of other content types. */
  raw: Record<string, { contentType: string; bytes: Uint8Array }>
  misses: string[]
}

export interface InvalidateOptions extends CallOptions {
  /**
   * Stale-while-revalidate (Next.js's `revalidateTag(tag, profile)`): keep the entries, mark the
   * tags stale now and expired in this many seconds (1 to 31536000). Absent or 0: expire now
   * and delete the entries.
   */
  expireSeconds?: number
}

export interface Invalidated {
  deleted: number
  /** ms since the epoch, database clock. */
  invalidated_at: number
}

/** Per tag: when it was last invalidated (marked stale) and when that invalidation expires entries. */
export interface TagRecords {
  tags: Record<string, number | null>
  expires: Record<string, number | null>
}

// ---------------------------------------------------------------------------------------------

interface RequestSpec extends CallOptions {
  method: string
  path: string
  query?: Record<string, string | undefined>
  headers?: Record<string, string>
  body?: RequestInit['body']
}

function env(name: string): string | undefined {
  // `process` may be absent (edge runtimes); the options then have to say everything.
  const value = (globalThis as { process?: { env?: Record<string, string | undefined> } }).process?.env?.[name]
  return value === '' ? undefined : value
}

/**
 * The runtime's own `fetch`. Next.js replaces the global one with a caching, dynamic-I/O
 * tracking wrapper; calls to the sidecar are storage I/O like a database driver's, so they
 * bypass it (looked up per call: Next.js patches after this module loads).
 */
function unpatchedFetch(): typeof fetch {
  const current = globalThis.fetch as typeof fetch & { _nextOriginalFetch?: typeof fetch }
  return current._nextOriginalFetch ?? current
}

function etagList(v: string | string[]): string {
  return Array.isArray(v) ? v.join(', ') : v
}

/**
 * Encodes a key or id as one path segment. `.` and `..` cannot be sent: URL parsers collapse
 * them (also when percent-encoded), so they would address another route.
 */
function segment(raw: string, what: string): string {
  if (raw === '.' || raw === '..') {
    throw new PgsidecarError(`invalid_${what}`, 400, `a ${what.replace('_', ' ')} of "." or ".." cannot be sent in a URL`)
  }
  return encodeURIComponent(raw)
}

function contentTypeOf(res: Response): string {
  return res.headers.get('content-type') ?? 'application/octet-stream'
}

function isJsonType(contentType: string): boolean {
  return contentType.split(';', 1)[0]!.trim().toLowerCase() === 'application/json'
}

function metaOf(res: Response): EntryMeta {
  const expires = res.headers.get('expires')
  const written = res.headers.get('pgsidecar-written-at')
  const expiresAt = expires === null ? null : new Date(expires)
  return {
    contentType: contentTypeOf(res),
    etag: res.headers.get('etag'),
    expiresAt: expiresAt === null || Number.isNaN(expiresAt.getTime()) ? null : expiresAt,
    writtenAt: written === null || !/^\d+$/.test(written) ? null : Number(written),
    stale: res.headers.get('pgsidecar-stale') === '1',
  }
}

function checkTtl(ttl: number | undefined): void {
  if (ttl !== undefined && !(Number.isInteger(ttl) && ttl >= 1 && ttl <= MAX_TTL_SECONDS)) {
    throw new PgsidecarError('invalid_ttl', 400, `ttlSeconds must be an integer from 1 to ${MAX_TTL_SECONDS}`)
  }
}

const CONTROL = /[\u0000-\u001f\u007f-\u009f]/

/**
 * Tags travel comma-separated in query strings, so a comma inside one would silently split it:
 * refused here, with the API's code, before any request. Throws a `PgsidecarError` (`invalid_tag`).
 */
export function checkTagList(tags: readonly string[] | undefined, code = 'invalid_tag'): void {
  for (const tag of tags ?? []) {
    if (typeof tag !== 'string' || tag === '' || tag.includes(',') || CONTROL.test(tag) || Buffer.byteLength(tag) > 256) {
      throw new PgsidecarError(code, 400, 'a tag must be 1 to 256 bytes without commas or control characters')
    }
  }
}

/** Drains or cancels a body we do not read, so the connection returns to the pool. */
async function discard(res: Response): Promise<void> {
  try {
    await res.body?.cancel()
  } catch {
    // already closed
  }
}

export class PgsidecarClient {
  /** Base URL of the data API, without a trailing slash, or `unix:/path/to.sock`. */
  readonly url: string
  readonly timeoutMs: number
  readonly #token: string | undefined
  readonly #fetch: typeof fetch | undefined
  /** What request paths are appended to: `url`, or a placeholder origin for a unix socket. */
  readonly #base: string
  /** Set for a `unix:` URL: every call goes over `node:http` to that socket. */
  readonly #unix: Transport | undefined

  constructor(options: ClientOptions = {}) {
    const url = options.url ?? env('PGSIDECAR_URL') ?? DEFAULT_URL
    if (url.startsWith('unix:')) {
      const socketPath = url.slice('unix:'.length)
      if (socketPath === '' || socketPath.includes('\0')) {
        throw new TypeError('pgsidecar: a unix: url needs the socket path: unix:/path/to.sock')
      }
      // A custom fetch would send the calls over TCP instead, to whatever `localhost` is.
      if (options.fetch) throw new TypeError('pgsidecar: the fetch option cannot be combined with a unix: url')
      this.url = url
      this.#base = 'http://localhost'
      this.#unix = unixTransport(socketPath)
    } else {
      let parsed: URL
      try {
        parsed = new URL(url)
      } catch {
        throw new TypeError('pgsidecar: url must be an absolute http:// or https:// URL, or unix:/path/to.sock')
      }
      if (parsed.protocol !== 'http:' && parsed.protocol !== 'https:') {
        throw new TypeError('pgsidecar: url must be an absolute http:// or https:// URL, or unix:/path/to.sock')
      }
      this.url = url.replace(/\/+$/, '')
      this.#base = this.url
      this.#unix = undefined
    }
    this.#token = options.token ?? env('PGSIDECAR_TOKEN')
    const timeoutMs = options.timeoutMs ?? DEFAULT_TIMEOUT_MS
    if (!(Number.isFinite(timeoutMs) && timeoutMs > 0)) {
      throw new TypeError('pgsidecar: timeoutMs must be a positive number')
    }
    this.timeoutMs = timeoutMs
    this.#fetch = options.fetch
  }

  // The token stays out of every printed form of the client.
  toJSON(): { url: string; timeoutMs: number } {
    return { url: this.url, timeoutMs: this.timeoutMs }
  }

  [Symbol.for('nodejs.util.inspect.custom')](): string {
    return `PgsidecarClient { url: '${this.url}', timeoutMs: ${this.timeoutMs} }`
  }

  // -------------------------------------------------------------------------------------------
  // Transport

  /**
   * Sends one request. Returns the response when its status is in `ok`; otherwise reads the
   * API's error body and throws a `PgsidecarError`.
   */
  async #send(spec: RequestSpec, ok: readonly number[]): Promise<Response> {
    const timeout = AbortSignal.timeout(spec.timeoutMs ?? this.timeoutMs)
    const signal = spec.signal ? AbortSignal.any([spec.signal, timeout]) : timeout
    let res: Response
    try {
      res = await this.#transport()(this.#urlOf(spec), { method: spec.method, headers: this.#headersOf(spec), body: spec.body ?? null, signal, cache: 'no-store' } as RequestInit)
    } catch (cause) {
      throw this.#transportError(cause, timeout, spec.signal)
    }
    if (ok.includes(res.status)) return res
    throw await this.#errorOf(res)
  }

  #transport(): Transport {
    return this.#unix ?? this.#fetch ?? unpatchedFetch()
  }

  #urlOf(spec: Pick<RequestSpec, 'path' | 'query'>): string {
    let url = this.#base + spec.path
    if (spec.query) {
      const q = new URLSearchParams()
      for (const [k, v] of Object.entries(spec.query)) if (v !== undefined) q.set(k, v)
      const s = q.toString()
      if (s) url += `?${s}`
    }
    return url
  }

  #headersOf(spec: Pick<RequestSpec, 'headers'>): Record<string, string> {
    const headers: Record<string, string> = { ...spec.headers }
    if (this.#token) headers.authorization = `Bearer ${this.#token}`
    return headers
  }

  /**
   * Opens a streaming GET (the change feed): the timeout bounds the wait for the response's
   * headers only, `signal` ends the stream whenever it aborts. Resolves to a 200 response whose
   * body is `text/event-stream`; throws a `PgsidecarError` otherwise.
   */
  async #openStream(spec: Pick<RequestSpec, 'path' | 'query'>, signal: AbortSignal): Promise<Response> {
    const timer = new AbortController()
    const timeout = setTimeout(() => timer.abort(new DOMException('the response headers did not arrive in time', 'TimeoutError')), this.timeoutMs)
    try {
      let res: Response
      try {
        res = await this.#transport()(this.#urlOf(spec), {
          method: 'GET',
          headers: this.#headersOf({ headers: { accept: 'text/event-stream' } }),
          signal: AbortSignal.any([signal, timer.signal]),
          cache: 'no-store',
        } as RequestInit)
      } catch (cause) {
        throw this.#transportError(cause, timer.signal, signal)
      }
      if (res.status !== 200) throw await this.#errorOf(res)
      const type = contentTypeOf(res).split(';', 1)[0]!.trim().toLowerCase()
      if (type !== 'text/event-stream') {
        await discard(res)
        throw new PgsidecarError('invalid_response', 200, `pgsidecar answered the change feed with ${type}, not text/event-stream`)
      }
      return res
    } finally {
      clearTimeout(timeout)
    }
  }

  #transportError(cause: unknown, timeout: AbortSignal, user: AbortSignal | undefined): unknown {
    if (user?.aborted) return user.reason ?? cause
    if (timeout.aborted) {
      return new PgsidecarError('timeout', 0, `pgsidecar at ${this.url} did not answer within the timeout`, { cause })
    }
    return new PgsidecarError('unreachable', 0, `pgsidecar unreachable at ${this.url}`, { cause })
  }

  async #errorOf(res: Response): Promise<PgsidecarError> {
    const requestId = res.headers.get('x-request-id') ?? undefined
    let code = `http_${res.status}`
    let message = `pgsidecar answered ${res.status}`
    try {
      const body = (await res.json()) as { error?: { code?: unknown; message?: unknown } }
      if (typeof body?.error?.code === 'string') code = body.error.code
      if (typeof body?.error?.message === 'string') message = body.error.message
    } catch {
      // not the API's JSON error body (a proxy in between?): keep the generic code
    }
    return new PgsidecarError(code, res.status, message, requestId === undefined ? undefined : { requestId })
  }

  /** Reads a JSON body, mapping a broken one (or a timeout while reading it) to a PgsidecarError. */
  async #json<T>(res: Response): Promise<T> {
    try {
      return (await res.json()) as T
    } catch (cause) {
      throw this.#bodyError(cause, res)
    }
  }

  async #bytes(res: Response): Promise<Uint8Array> {
    try {
      return new Uint8Array(await res.arrayBuffer())
    } catch (cause) {
      throw this.#bodyError(cause, res)
    }
  }

  #bodyError(cause: unknown, res: Response): unknown {
    if (cause instanceof Error && cause.name === 'TimeoutError') {
      return new PgsidecarError('timeout', 0, `pgsidecar at ${this.url} did not send the body within the timeout`, { cause })
    }
    if (cause instanceof Error && cause.name === 'AbortError') return cause
    return new PgsidecarError('invalid_response', res.status, 'pgsidecar sent a body that could not be read', { cause })
  }

  // -------------------------------------------------------------------------------------------
  // Sessions

  /** `POST /v1/sessions`: a new session and its token (returned this once). */
  async createSession(input: CreateSessionInput, options: CallOptions = {}): Promise<CreatedSession> {
    const res = await this.#send(
      { ...options, method: 'POST', path: '/v1/sessions', headers: { 'content-type': 'application/json' }, body: JSON.stringify(input) },
      [201],
    )
    return this.#json<CreatedSession>(res)
  }

  /**
   * `POST /v1/sessions/_validate`: the live session of a token (its expiry slides when due), or
   * null when it is unknown, expired, revoked or malformed. The token travels in the body.
   */
  async validateSession(token: string, options: CallOptions = {}): Promise<Session | null> {
    const res = await this.#send(
      {
        ...options,
        method: 'POST',
        path: '/v1/sessions/_validate',
        headers: { 'content-type': 'application/json' },
        body: JSON.stringify({ token }),
      },
      [200, 404],
    )
    if (res.status === 404) return this.#notFound(res)
    return this.#json<Session>(res)
  }

  /** `PATCH /v1/sessions/{token}`: replaces the session's `data`; null when it is not live. */
  async updateSession(token: string, data: Record<string, unknown>, options: CallOptions = {}): Promise<Session | null> {
    const res = await this.#send(
      {
        ...options,
        method: 'PATCH',
        path: `/v1/sessions/${segment(token, 'token')}`,
        headers: { 'content-type': 'application/json' },
        body: JSON.stringify({ data }),
      },
      [200, 404],
    )
    if (res.status === 404) return this.#notFound(res)
    return this.#json<Session>(res)
  }

  /** `DELETE /v1/sessions/{token}`: revokes (logs out); also fine when already gone. */
  async revokeSession(token: string, options: CallOptions = {}): Promise<void> {
    const res = await this.#send({ ...options, method: 'DELETE', path: `/v1/sessions/${segment(token, 'token')}` }, [204])
    await discard(res)
  }

  /** `GET /v1/users/{user_id}/sessions`: the user's live sessions, newest first. */
  async listUserSessions(userId: string, options: CallOptions = {}): Promise<Session[]> {
    const res = await this.#send({ ...options, method: 'GET', path: `/v1/users/${segment(userId, 'user_id')}/sessions` }, [200])
    return (await this.#json<{ sessions: Session[] }>(res)).sessions
  }

  /** `DELETE /v1/users/{user_id}/sessions[?except=id]`: revokes all of a user's sessions but one; returns how many. */
  async revokeUserSessions(userId: string, options: CallOptions & { except?: string } = {}): Promise<number> {
    const res = await this.#send(
      { ...options, method: 'DELETE', path: `/v1/users/${segment(userId, 'user_id')}/sessions`, query: { except: options.except } },
      [200],
    )
    return (await this.#json<{ revoked: number }>(res)).revoked
  }

  /** `DELETE /v1/users/{user_id}/sessions/{session_id}`: revokes one session by its id; fine when already gone. */
  async revokeUserSession(userId: string, sessionId: string, options: CallOptions = {}): Promise<void> {
    const res = await this.#send(
      { ...options, method: 'DELETE', path: `/v1/users/${segment(userId, 'user_id')}/sessions/${segment(sessionId, 'session_id')}` },
      [204],
    )
    await discard(res)
  }

  /**
   * A 404 is "no such session/key" only when the API says `not_found`; anything else (a route
   * this sidecar does not have, a proxy's page) is an error, not a silent miss.
   */
  async #notFound(res: Response): Promise<null> {
    const err = await this.#errorOf(res)
    if (err.code !== 'not_found') throw err
    return null
  }

  // -------------------------------------------------------------------------------------------
  // Cache

  /**
   * `GET /v1/cache/{key}`: the entry with its metadata, null when absent or expired, or
   * `not_modified` when `ifNoneMatch` matched.
   */
  async getEntry<T = unknown>(key: string, options: GetOptions = {}): Promise<CacheEntry<T> | NotModified | null> {
    checkTagList(options.checkTags)
    const headers: Record<string, string> = {}
    if (options.ifNoneMatch !== undefined) headers['if-none-match'] = etagList(options.ifNoneMatch)
    const res = await this.#send(
      {
        ...options,
        method: 'GET',
        path: `/v1/cache/${segment(key, 'key')}`,
        query: { check_tags: options.checkTags?.join(',') },
        headers,
      },
      [200, 304, 404],
    )
    if (res.status === 404) return this.#notFound(res)
    const meta = metaOf(res)
    if (res.status === 304) {
      await discard(res)
      return { kind: 'not_modified', etag: meta.etag, expiresAt: meta.expiresAt }
    }
    if (isJsonType(meta.contentType)) return { ...meta, kind: 'json', value: await this.#json<T>(res) }
    return { ...meta, kind: 'bytes', value: await this.#bytes(res) }
  }

  /**
   * `GET /v1/cache/{key}?fill_lease_ms=N&wait_ms=M` (fill leases, as memcache's): the entry when
   * it is there; on a miss that nobody is filling, a `Lease` (this caller fills the key and
   * writes with `set(..., { lease })`); while another caller in the fleet fills it, waits up to
   * `waitMs` for its value (or for a lease of its own, should the filler's lapse). Null when the
   * wait ran out, or from a sidecar without leases: compute and write without one.
   */
  async getOrLease<T = unknown>(key: string, options: LeaseOptions): Promise<CacheEntry<T> | Lease | null> {
    const { fillLeaseMs, waitMs } = options
    if (!(Number.isInteger(fillLeaseMs) && fillLeaseMs >= 1 && fillLeaseMs <= MAX_FILL_LEASE_MS)) {
      throw new PgsidecarError('invalid_lease', 400, `fillLeaseMs must be an integer from 1 to ${MAX_FILL_LEASE_MS}`)
    }
    if (!(Number.isInteger(waitMs) && waitMs >= 0 && waitMs <= MAX_LEASE_WAIT_MS)) {
      throw new PgsidecarError('invalid_lease', 400, `waitMs must be an integer from 0 to ${MAX_LEASE_WAIT_MS}`)
    }
    const res = await this.#send(
      {
        ...options,
        // the sidecar may hold the answer up to waitMs before it starts sending it
        timeoutMs: (options.timeoutMs ?? this.timeoutMs) + waitMs,
        method: 'GET',
        path: `/v1/cache/${segment(key, 'key')}`,
        query: { fill_lease_ms: String(fillLeaseMs), wait_ms: String(waitMs) },
      },
      [200, 404],
    )
    if (res.status === 404) {
      const lease = res.headers.get('pgsidecar-fill-lease')
      await this.#notFound(res)
      return lease ? { kind: 'lease', lease } : null
    }
    const meta = metaOf(res)
    if (isJsonType(meta.contentType)) return { ...meta, kind: 'json', value: await this.#json<T>(res) }
    return { ...meta, kind: 'bytes', value: await this.#bytes(res) }
  }

  /** The JSON value of a key, or null. A non-JSON entry is an error (`not_json`): use `getBytes`. */
  async get<T = unknown>(key: string, options: CallOptions & Pick<GetOptions, 'checkTags'> = {}): Promise<T | null> {
    const entry = await this.getEntry<T>(key, options)
    if (entry === null || entry.kind === 'not_modified') return null
    if (entry.kind !== 'json') {
      throw new PgsidecarError('not_json', 200, `the entry is ${entry.contentType}, not JSON: read it with getBytes`)
    }
    return entry.value
  }

  /** The bytes and content type of a key (any kind of entry), or null. */
  async getBytes(key: string, options: CallOptions & Pick<GetOptions, 'checkTags'> = {}): Promise<{ bytes: Uint8Array; contentType: string } | null> {
    checkTagList(options.checkTags)
    const res = await this.#send(
      { ...options, method: 'GET', path: `/v1/cache/${segment(key, 'key')}`, query: { check_tags: options.checkTags?.join(',') } },
      [200, 404],
    )
    if (res.status === 404) return this.#notFound(res)
    return { bytes: await this.#bytes(res), contentType: contentTypeOf(res) }
  }

  /**
   * `PUT /v1/cache/{key}` of a JSON value. Returns the written version's ETag, or null when a
   * condition (`ifMatch`, `ifNoneMatch`, `lease`) failed and nothing was written.
   */
  async set(key: string, value: unknown, options: WriteOptions = {}): Promise<Written | null> {
    const body = JSON.stringify(value)
    if (body === undefined) throw new TypeError('pgsidecar: the value is not representable as JSON')
    return this.#put(key, body, 'application/json', options)
  }

  /** `PUT /v1/cache/{key}` of bytes, stored and returned exactly, with their content type. */
  async setBytes(key: string, bytes: Uint8Array | string, options: SetBytesOptions = {}): Promise<Written | null> {
    return this.#put(key, bytes, options.contentType ?? 'application/octet-stream', options)
  }

  async #put(key: string, body: Uint8Array | string, contentType: string, options: WriteOptions): Promise<Written | null> {
    checkTtl(options.ttlSeconds)
    checkTagList(options.tags)
    if (options.lease !== undefined && (options.ifMatch !== undefined || options.ifNoneMatch !== undefined)) {
      // the API refuses the combination too: the lease already says which write may happen
      throw new PgsidecarError('invalid_lease', 400, 'a write with a lease cannot also carry ifMatch or ifNoneMatch')
    }
    const headers: Record<string, string> = { 'content-type': contentType }
    if (options.ifMatch !== undefined) headers['if-match'] = etagList(options.ifMatch)
    if (options.ifNoneMatch !== undefined) headers['if-none-match'] = etagList(options.ifNoneMatch)
    const res = await this.#send(
      {
        ...options,
        method: 'PUT',
        path: `/v1/cache/${segment(key, 'key')}`,
        query: {
          ttl_seconds: options.ttlSeconds === undefined ? undefined : String(options.ttlSeconds),
          tags: options.tags?.length ? options.tags.join(',') : undefined,
          lease: options.lease,
        },
        headers,
        body: body as RequestInit['body'],
      },
      options.lease === undefined ? [204, 412] : [204, 409, 412],
    )
    const etag = res.headers.get('etag')
    if (res.status === 412) {
      await this.#expectCode(res, 'precondition_failed')
      return null
    }
    if (res.status === 409) {
      await this.#expectCode(res, 'lease_voided')
      return null
    }
    await discard(res)
    return { etag }
  }

  /** A 412 must be the API's `precondition_failed` (a 409 `lease_voided`); anything else is an error. */
  async #expectCode(res: Response, code: string): Promise<void> {
    const err = await this.#errorOf(res)
    if (err.code !== code) throw err
  }

  /**
   * `DELETE /v1/cache/{key}`. True when the key is gone (also when it never existed); false
   * when `ifMatch` did not match a live entry and nothing was deleted.
   */
  async delete(key: string, options: DeleteOptions = {}): Promise<boolean> {
    const headers: Record<string, string> = {}
    if (options.ifMatch !== undefined) headers['if-match'] = etagList(options.ifMatch)
    const res = await this.#send({ ...options, method: 'DELETE', path: `/v1/cache/${segment(key, 'key')}`, headers }, [204, 412])
    if (res.status === 412) {
      await this.#expectCode(res, 'precondition_failed')
      return false
    }
    await discard(res)
    return true
  }

  /** `POST /v1/cache/_mget`: up to 1000 keys in one round trip. */
  async mget<T = unknown>(keys: readonly string[], options: CallOptions = {}): Promise<MgetResult<T>> {
    const res = await this.#send(
      { ...options, method: 'POST', path: '/v1/cache/_mget', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ keys }) },
      [200],
    )
    const body = await this.#json<{ hits: Record<string, T>; raw?: Record<string, { content_type: string; base64: string }>; misses: string[] }>(res)
    const raw: MgetResult<T>['raw'] = {}
    for (const [k, v] of Object.entries(body.raw ?? {})) {
      raw[k] = { contentType: v.content_type, bytes: Uint8Array.from(Buffer.from(v.base64, 'base64')) }
    }
    return { hits: body.hits, raw, misses: body.misses }
  }

  /** `DELETE /v1/cache?prefix=P`: deletes every key starting with the prefix; returns how many. */
  async deletePrefix(prefix: string, options: CallOptions = {}): Promise<number> {
    const res = await this.#send({ ...options, method: 'DELETE', path: '/v1/cache', query: { prefix } }, [200])
    return (await this.#json<{ deleted: number }>(res)).deleted
  }

  /** `POST /v1/cache/_invalidate`: expires (or, with `expireSeconds`, marks stale) every entry carrying any of the tags. */
  async invalidateTags(tags: readonly string[], options: InvalidateOptions = {}): Promise<Invalidated> {
    const body: { tags: readonly string[]; expire_seconds?: number } = { tags }
    if (options.expireSeconds !== undefined && options.expireSeconds !== 0) {
      if (!(Number.isInteger(options.expireSeconds) && options.expireSeconds >= 1 && options.expireSeconds <= MAX_TTL_SECONDS)) {
        throw new PgsidecarError('invalid_expire_seconds', 400, `expireSeconds must be an integer from 0 to ${MAX_TTL_SECONDS}`)
      }
      body.expire_seconds = options.expireSeconds
    }
    const res = await this.#send(
      { ...options, method: 'POST', path: '/v1/cache/_invalidate', headers: { 'content-type': 'application/json' }, body: JSON.stringify(body) },
      [200],
    )
    return this.#json<Invalidated>(res)
  }

  /** `GET /v1/cache/_tags?tags=...`: per tag, when it was last invalidated and when that expires entries (null: never). */
  async tagRecords(tags: readonly string[], options: CallOptions = {}): Promise<TagRecords> {
    checkTagList(tags)
    const res = await this.#send({ ...options, method: 'GET', path: '/v1/cache/_tags', query: { tags: tags.join(',') } }, [200])
    return this.#json<TagRecords>(res)
  }

  // -------------------------------------------------------------------------------------------
  // Change feed

  /**
   * `GET /v1/events`: the fleet's changes as they commit, as an async iterable (`for await`), or
   * handed to `onEvent` one at a time. Filters combine with AND. Reconnects with back-off when
   * the connection drops, and then yields a `reset` event (changes may have been missed), as it
   * does when the sidecar says so. Ends on `close()` or when `signal` aborts; throws (or, with
   * `onEvent`, rejects `done`) on an error reconnecting cannot fix: bad filters, a wrong token,
   * a sidecar without `/v1/events`.
   */
  subscribe(options?: SubscribeOptions): Subscription
  subscribe(options: SubscribeOptions, onEvent: (event: ChangeEvent) => void | Promise<void>): CallbackSubscription
  subscribe(options: SubscribeOptions = {}, onEvent?: (event: ChangeEvent) => void | Promise<void>): Subscription | CallbackSubscription {
    // An empty list is refused (as the API refuses `tags=`) rather than read as "no filter":
    // a subscriber whose computed tag set came out empty would otherwise get every change.
    if (options.tags !== undefined && !(Array.isArray(options.tags) && options.tags.length >= 1 && options.tags.length <= MAX_TAGS_PER_REQUEST)) {
      throw new PgsidecarError('invalid_tags', 400, `tags must name 1 to ${MAX_TAGS_PER_REQUEST} tags`)
    }
    checkTagList(options.tags, 'invalid_tags')
    const query = {
      cache_prefix: options.cachePrefix,
      tags: options.tags?.join(','),
      user_id: options.userId,
    }
    return openSubscription((signal) => this.#openStream({ path: '/v1/events', query }, signal), options, onEvent)
  }
}

/** A client for the sidecar at `url` (default `PGSIDECAR_URL`, else `http://127.0.0.1:7070`). */
export function createClient(options: ClientOptions = {}): PgsidecarClient {
  return new PgsidecarClient(options)
}
