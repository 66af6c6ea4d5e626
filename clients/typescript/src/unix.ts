// HTTP over a unix socket (`PGSIDECAR_URL=unix:/path/to.sock`) with the shape of `fetch`, so the
// client's calls, timeouts and error mapping are the same as over TCP. Node 20's `fetch` cannot
// reach a unix socket without undici's `Agent`, which is not importable without a dependency;
// `node:http` with `socketPath` can.

import { Agent, request, type IncomingMessage } from 'node:http'

/** A `fetch` of the subset the client uses: method, headers (a record), a string or bytes body, a signal. */
export type Transport = (url: string, init: RequestInit) => Promise<Response>

/** One keep-alive pool per socket path, shared by every client of that path. */
const agents = new Map<string, Agent>()

function agentFor(socketPath: string): Agent {
  let agent = agents.get(socketPath)
  if (!agent) {
    // Idle sockets are unref'd by the agent, so they never keep the process alive.
    agent = new Agent({ keepAlive: true })
    agents.set(socketPath, agent)
  }
  return agent
}

/** Statuses whose responses have no body (`new Response` refuses one for them). */
const NULL_BODY = new Set([101, 103, 204, 205, 304])

/**
 * The response body as a web stream that follows the socket: chunks as they arrive (the change
 * feed needs them at once), paused while the reader is behind, errored with the signal's reason
 * when the call is aborted, and with an error when the connection closes before the end.
 */
function bodyOf(res: IncomingMessage, signal: AbortSignal | undefined): ReadableStream<Uint8Array> {
  let settled = false
  let onAbort: (() => void) | undefined
  const finish = () => {
    settled = true
    if (onAbort) signal?.removeEventListener('abort', onAbort)
  }
  return new ReadableStream<Uint8Array>({
    start(controller) {
      onAbort = () => {
        if (settled) return
        finish()
        controller.error(signal!.reason)
        res.destroy()
      }
      signal?.addEventListener('abort', onAbort, { once: true })
      res.on('data', (chunk: Buffer) => {
        if (settled) return
        controller.enqueue(new Uint8Array(chunk.buffer, chunk.byteOffset, chunk.byteLength))
        if ((controller.desiredSize ?? 1) <= 0) res.pause()
      })
      res.on('end', () => {
        if (settled) return
        finish()
        controller.close()
      })
      res.on('error', (err) => {
        if (settled) return
        finish()
        controller.error(err)
      })
      res.on('close', () => {
        if (settled) return
        finish()
        controller.error(new TypeError('the connection closed before the response was complete'))
      })
      res.pause()
    },
    pull() {
      res.resume()
    },
    cancel() {
      finish()
      res.destroy()
    },
  })
}

/** A `fetch` that sends every request to the HTTP server on this unix socket. */
export function unixTransport(socketPath: string): Transport {
  const agent = agentFor(socketPath)
  return (url, init) =>
    new Promise<Response>((resolve, reject) => {
      const signal = init.signal ?? undefined
      if (signal?.aborted) {
        reject(signal.reason)
        return
      }
      const target = new URL(url)
      const headers: Record<string, string> = { host: 'localhost', ...(init.headers as Record<string, string> | undefined) }
      const body = init.body as string | Uint8Array | null | undefined
      if (body != null) headers['content-length'] = String(typeof body === 'string' ? Buffer.byteLength(body) : body.byteLength)
      const req = request({ socketPath, agent, method: init.method ?? 'GET', path: target.pathname + target.search, headers })
      let responded = false
      const onAbort = () => {
        if (responded) return
        req.destroy()
        reject(signal!.reason)
      }
      signal?.addEventListener('abort', onAbort, { once: true })
      req.on('error', (err) => {
        signal?.removeEventListener('abort', onAbort)
        if (!responded) reject(new TypeError('fetch failed', { cause: err }))
      })
      req.on('response', (res) => {
        responded = true
        signal?.removeEventListener('abort', onAbort)
        const responseHeaders = new Headers()
        const raw = res.rawHeaders
        for (let i = 0; i + 1 < raw.length; i += 2) responseHeaders.append(raw[i]!, raw[i + 1]!)
        const status = res.statusCode ?? 0
        try {
          if (NULL_BODY.has(status)) {
            res.resume() // nothing to read: lets the socket go back to the pool
            resolve(new Response(null, { status, statusText: res.statusMessage ?? '', headers: responseHeaders }))
          } else {
            resolve(new Response(bodyOf(res, signal), { status, statusText: res.statusMessage ?? '', headers: responseHeaders }))
          }
        } catch (err) {
          // a status `Response` cannot represent (outside 200..599): not a pgsidecar answer
          res.destroy()
          reject(new TypeError('fetch failed', { cause: err }))
        }
      })
      req.end(body ?? undefined)
    })
}
