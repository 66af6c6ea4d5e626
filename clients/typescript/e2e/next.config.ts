// next.config.ts
import type { NextConfig } from 'next'

const nextConfig: NextConfig = {
  cacheComponents: true,
  // Next.js's incremental cache (ISR pages, route handlers, fetch, unstable_cache) in the sidecar
  cacheHandler: import.meta.resolve('@pgsidecar/client/next/cache-handler'),
  cacheMaxMemorySize: 0, // nothing kept in this container's memory
  // 'use cache' and 'use cache: remote'
  cacheHandlers: {
    default: import.meta.resolve('@pgsidecar/client/next/use-cache'),
    remote: import.meta.resolve('@pgsidecar/client/next/use-cache'),
  },
}

export default nextConfig
