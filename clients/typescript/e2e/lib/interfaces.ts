// Compile-time check (run by `next build`'s type check): the package's handlers and storage fit
// the interfaces of the installed Next.js and BetterAuth, not just our copies of them.
import type { CacheHandler as UseCacheHandler } from 'next/dist/server/lib/cache-handlers/types'
import type { CacheHandler as IncrementalCacheHandler, CacheHandlerContext } from 'next/dist/server/lib/incremental-cache'
import type { BetterAuthOptions } from 'better-auth'
import useCache from '@pgsidecar/client/next/use-cache'
import PgsidecarCacheHandler from '@pgsidecar/client/next/cache-handler'
import { pgsidecarStorage } from '@pgsidecar/client/better-auth'

export const useCacheFits: UseCacheHandler = useCache
export const incrementalFits: new (ctx: CacheHandlerContext) => IncrementalCacheHandler = PgsidecarCacheHandler
export const storageFits: NonNullable<BetterAuthOptions['secondaryStorage']> = pgsidecarStorage()
