// The one error type of the client, and the test the fail-open paths apply to it.

/**
 * Every failure of a call: an error answer of the API (`code` and `status` as the API sent
 * them), or a failure to reach it (`status` 0, `code` `unreachable` or `timeout`).
 */
export class PgsidecarError extends Error {
  override readonly name = 'PgsidecarError'
  /** The API's error code (`invalid_key`, `not_found`, ...), or `unreachable`, `timeout`, `invalid_response`. */
  readonly code: string
  /** The HTTP status, or 0 when no answer arrived. */
  readonly status: number
  /** The sidecar's `x-request-id` for this call, when it answered. */
  readonly requestId: string | undefined

  constructor(code: string, status: number, message: string, options?: { cause?: unknown; requestId?: string }) {
    super(message, options?.cause === undefined ? undefined : { cause: options.cause })
    this.code = code
    this.status = status
    this.requestId = options?.requestId
  }
}

/**
 * True when the error means "the sidecar cannot serve this now" (not reachable, timed out,
 * overloaded, database down): the cases a cache should fail open on. False for bad input.
 */
export function isUnavailable(err: unknown): boolean {
  return err instanceof PgsidecarError && (err.status === 0 || err.status >= 500)
}
