// @pgsidecar/client: the data API client and `getCached`. The Next.js handlers and the
// BetterAuth storage are their own entry points (`/next/cache-handler`, `/next/use-cache`,
// `/better-auth`), so an app loads only what it uses.

export * from './client.js'
export type { CacheDeleteEvent, CacheInvalidateEvent, CachePutEvent, CallbackSubscription, ChangeEvent, ResetEvent, SessionRevokeEvent, SubscribeOptions, Subscription } from './events.js'
export {
  createCache,
  getCached,
  DEFAULT_CACHE_TTL_SECONDS,
  DEFAULT_FILL_LEASE_MS,
  DEFAULT_LEASE_WAIT_MS,
  type Cache,
  type CacheOptions,
  type GetCachedOptions,
  type LeaseSettings,
} from './cached.js'
