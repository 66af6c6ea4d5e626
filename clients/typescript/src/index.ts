// @pgsidecar/client: the data API client and `getCached`. The Next.js handlers and the
// BetterAuth storage are their own entry points (`/next/cache-handler`, `/next/use-cache`,
// `/better-auth`), so an app loads only what it uses.

export * from './client.js'
export { createCache, getCached, DEFAULT_CACHE_TTL_SECONDS, type Cache, type CacheOptions, type GetCachedOptions } from './cached.js'
