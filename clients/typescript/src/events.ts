// The change feed (`GET /v1/events`, Server-Sent Events) as typed events: the SSE parser, and a
// subscription that reconnects with back-off and yields `reset` after every reconnect.
//
// Nothing here logs; errors it recovers from go to `onError`, and carry neither token nor key.

import { PgsidecarError, isUnavailable } from './errors.js'

/** A cache entry was written (`PUT`). */
export interface CachePutEvent {
  type: 'cache.put'
  key: string
  tags: string[]
}

/** A key was deleted, or every key under a prefix. */
export type CacheDeleteEvent = { type: 'cache.delete'; key: string; prefix?: undefined } | { type: 'cache.delete'; prefix: string; key?: undefined }

/** Tags were invalidated: expired now (`expire_seconds` 0), or marked stale and expired that much later. */
export interface CacheInvalidateEvent {
  type: 'cache.invalidate'
  tags: string[]
  expire_seconds: number
}

/** A session of a user was revoked, or all of them (`all: true`). */
export type SessionRevokeEvent =
  | { type: 'session.revoke'; user_id: string; session_id: string; all?: undefined }
  | { type: 'session.revoke'; user_id: string; all: true; session_id?: undefined }

/**
 * Changes may have been missed (this client reconnected, the sidecar's own listening connection
 * did, or this subscriber fell too far behind): re-read whatever you derived from events.
 */
export interface ResetEvent {
  type: 'reset'
}

export type ChangeEvent = CachePutEvent | CacheDeleteEvent | CacheInvalidateEvent | SessionRevokeEvent | ResetEvent

const TYPES = new Set(['cache.put', 'cache.delete', 'cache.invalidate', 'session.revoke', 'reset'])

/** Back-off between reconnection attempts, by default. */
export const DEFAULT_RETRY_MIN_MS = 100
export const DEFAULT_RETRY_MAX_MS = 5000
/** The sidecar sends a keep-alive comment every 15 s: three missed mean the connection is dead. */
export const DEFAULT_IDLE_TIMEOUT_MS = 45_000

/**
 * Filters combine with AND. None: every event. Cache filters (`cachePrefix`, `tags`) select
 * cache events only, `userId` session events only; `reset` always comes.
 */
export interface SubscribeOptions {
  /** Cache events on keys starting with this (and prefix deletes that overlap it); invalidations need `tags`. */
  cachePrefix?: string
  /** Cache events on entries or invalidations carrying any of these tags (1 to 100 tags). */
  tags?: readonly string[]
  /** Session events of this user. */
  userId?: string
  /** Ends the subscription (the iteration finishes normally; `done` resolves). */
  signal?: AbortSignal
  /** Called with each error the subscription recovers from by reconnecting (sidecar unreachable, restarted, overloaded). */
  onError?: (error: PgsidecarError) => void
  /** First delay before reconnecting, doubled after each failed attempt up to `retryMaxMs`. Default 100. */
  retryMinMs?: number
  /** Longest delay between reconnection attempts. Default 5000. */
  retryMaxMs?: number
  /** Reconnect when nothing (not even a keep-alive) arrived for this long. Default 45000. */
  idleTimeoutMs?: number
}

/** The change feed as an async iterable: iterate it once (`for await`), `close()` to stop. */
export interface Subscription extends AsyncIterable<ChangeEvent> {
  /** Stops: the iteration ends, the connection closes. */
  close(): void
}

/** The change feed handed to a callback. */
export interface CallbackSubscription {
  /** Stops: `done` resolves once the callback has returned. */
  close(): void
  /**
   * Settles when the subscription stops: resolves after `close()` or the signal's abort;
   * rejects with an error reconnecting cannot fix (bad filters, a wrong token, a sidecar
   * without `/v1/events`) or with what `onEvent` threw.
   */
  readonly done: Promise<void>
}

/** Opens one connection to the feed (a 200 `text/event-stream` response) or throws a `PgsidecarError`. */
export type OpenStream = (signal: AbortSignal) => Promise<Response>

interface RawEvent {
  event: string
  data: string
}

/**
 * Incremental SSE parser (the WHATWG event-stream format): fields `event` and `data` (several
 * `data` lines join with newlines), comments and other fields ignored, an event per blank line.
 */
class SseParser {
  #buffer = ''
  #event = ''
  #data: string[] = []
  #sawCr = false

  /** Feeds decoded text; returns the events it completed. */
  push(text: string): RawEvent[] {
    const out: RawEvent[] = []
    // a CR at the end of one chunk and an LF at the start of the next are one line break
    if (this.#sawCr && text.startsWith('\n')) text = text.slice(1)
    this.#sawCr = text.endsWith('\r')
    this.#buffer += text
    const lines = this.#buffer.split(/\r\n|\r|\n/)
    this.#buffer = lines.pop()!
    for (const line of lines) {
      if (line === '') {
        if (this.#data.length > 0) out.push({ event: this.#event || 'message', data: this.#data.join('\n') })
        this.#event = ''
        this.#data = []
        continue
      }
      if (line.startsWith(':')) continue
      const colon = line.indexOf(':')
      const field = colon === -1 ? line : line.slice(0, colon)
      let value = colon === -1 ? '' : line.slice(colon + 1)
      if (value.startsWith(' ')) value = value.slice(1)
      if (field === 'event') this.#event = value
      else if (field === 'data') this.#data.push(value)
    }
    return out
  }
}

/** The typed event of a raw one; null for an event type this client does not know (a newer sidecar's). */
function typed(raw: RawEvent): ChangeEvent | 'malformed' | null {
  if (!TYPES.has(raw.event)) return null
  let data: unknown
  try {
    data = JSON.parse(raw.data)
  } catch {
    return 'malformed'
  }
  if (data === null || typeof data !== 'object' || Array.isArray(data)) return 'malformed'
  return { ...(data as object), type: raw.event } as ChangeEvent
}

function sleep(ms: number, signal: AbortSignal): Promise<void> {
  return new Promise((resolve) => {
    if (signal.aborted) return resolve()
    const done = () => {
      clearTimeout(timer)
      signal.removeEventListener('abort', done)
      resolve()
    }
    const timer = setTimeout(done, ms)
    signal.addEventListener('abort', done, { once: true })
  })
}

function checkMs(value: number, name: string): number {
  if (!(Number.isFinite(value) && value > 0)) throw new TypeError(`pgsidecar: ${name} must be a positive number`)
  return value
}

/** Any failure while reading the stream, as the `PgsidecarError` `onError` gets. */
function lost(cause: unknown): PgsidecarError {
  if (cause instanceof PgsidecarError) return cause
  return new PgsidecarError('unreachable', 0, 'the change feed connection was lost', { cause })
}

/** A connection that ended or failed after it was open, with what it delivered. */
interface Ended {
  error: PgsidecarError
  delivered: number
  openMs: number
}

interface Timing {
  retryMin: number
  retryMax: number
  idleMs: number
}

async function* feed(open: OpenStream, options: SubscribeOptions, timing: Timing, stop: AbortSignal): AsyncGenerator<ChangeEvent, void, undefined> {
  const { retryMin, retryMax, idleMs } = timing
  let failures = 0
  let connectedBefore = false
  while (!stop.aborted) {
    const conn = new AbortController()
    const signal = AbortSignal.any([stop, conn.signal])
    let res: Response
    try {
      res = await open(signal)
    } catch (err) {
      if (stop.aborted) return
      // a wrong token, bad filters, a sidecar without the route or with notifications off
      // (`events_unavailable`: its configuration, not a passing state): retrying would not help
      if (!isUnavailable(err) || (err as PgsidecarError).code === 'events_unavailable') throw err
      options.onError?.(err as PgsidecarError)
      // full jitter over the upper half, so a fleet does not reconnect in step
      const delay = Math.min(retryMax, retryMin * 2 ** failures)
      failures = Math.min(failures + 1, 30)
      await sleep(delay / 2 + (Math.random() * delay) / 2, stop)
      continue
    }
    const ended: Ended = { error: lost(undefined), delivered: 0, openMs: Date.now() }
    try {
      if (connectedBefore) yield { type: 'reset' }
      connectedBefore = true
      const reader = res.body!.getReader()
      const decoder = new TextDecoder()
      const parser = new SseParser()
      for (;;) {
        // the idle timer runs only while waiting for the sidecar, never while the caller works
        const idle = setTimeout(() => conn.abort(new PgsidecarError('timeout', 0, `the change feed sent nothing for ${idleMs} ms`)), idleMs)
        let chunk: Awaited<ReturnType<typeof reader.read>>
        try {
          chunk = await reader.read()
        } catch (err) {
          if (stop.aborted) return
          ended.error = lost(conn.signal.aborted ? conn.signal.reason : err)
          break
        } finally {
          clearTimeout(idle)
        }
        if (chunk.done) {
          ended.error = new PgsidecarError('unreachable', 0, 'the sidecar closed the change feed')
          break
        }
        for (const raw of parser.push(decoder.decode(chunk.value, { stream: true }))) {
          const event = typed(raw)
          if (event === null) continue
          ended.delivered++
          // an event that cannot be read was missed: say so rather than skip it silently
          yield event === 'malformed' ? { type: 'reset' } : event
        }
      }
    } finally {
      conn.abort() // closes the connection, also when the caller stops iterating
    }
    if (stop.aborted) return
    options.onError?.(ended.error)
    // a connection that worked a while starts the back-off over; one dropped at once does not
    if (ended.delivered > 0 || Date.now() - ended.openMs >= 1000) failures = 0
    const delay = Math.min(retryMax, retryMin * 2 ** failures)
    failures = Math.min(failures + 1, 30)
    await sleep(delay / 2 + (Math.random() * delay) / 2, stop)
  }
}

class FeedSubscription implements Subscription {
  readonly #stop = new AbortController()
  readonly #events: AsyncGenerator<ChangeEvent, void, undefined>
  #iterated = false

  constructor(open: OpenStream, options: SubscribeOptions) {
    const retryMin = checkMs(options.retryMinMs ?? DEFAULT_RETRY_MIN_MS, 'retryMinMs')
    const timing = {
      retryMin,
      retryMax: Math.max(retryMin, checkMs(options.retryMaxMs ?? DEFAULT_RETRY_MAX_MS, 'retryMaxMs')),
      idleMs: checkMs(options.idleTimeoutMs ?? DEFAULT_IDLE_TIMEOUT_MS, 'idleTimeoutMs'),
    }
    const { signal } = options
    if (signal?.aborted) this.#stop.abort()
    else signal?.addEventListener('abort', () => this.#stop.abort(), { once: true })
    this.#events = feed(open, options, timing, this.#stop.signal)
  }

  close(): void {
    this.#stop.abort()
  }

  [Symbol.asyncIterator](): AsyncIterator<ChangeEvent> {
    if (this.#iterated) throw new TypeError('pgsidecar: a subscription can be iterated once')
    this.#iterated = true
    const events = this.#events
    const stop = this.#stop
    return {
      next: () => events.next(),
      return: async () => {
        stop.abort()
        return events.return(undefined)
      },
      [Symbol.asyncIterator]() {
        return this
      },
    } as AsyncIterator<ChangeEvent>
  }
}

/** The change feed over `open`: iterable, or handed to `onEvent` one event at a time. */
export function openSubscription(open: OpenStream, options: SubscribeOptions, onEvent?: (event: ChangeEvent) => void | Promise<void>): Subscription | CallbackSubscription {
  if (onEvent !== undefined && typeof onEvent !== 'function') throw new TypeError('pgsidecar: onEvent must be a function')
  const subscription = new FeedSubscription(open, options)
  if (onEvent === undefined) return subscription
  const done = (async () => {
    for await (const event of subscription) await onEvent(event)
  })()
  return { close: () => subscription.close(), done }
}
