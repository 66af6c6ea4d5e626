// A component cached with 'use cache', through `cacheHandlers.default`.
import { Suspense } from 'react'
import { connection } from 'next/server'
import { cacheLife, cacheTag } from 'next/cache'
import { readValue } from '@/lib/db'

async function cachedValue() {
  'use cache'
  cacheTag('use-cache')
  cacheLife('max')
  return readValue('use-cache')
}

async function Value() {
  await connection()
  return <p>E2E[{await cachedValue()}]</p>
}

export default function Page() {
  return (
    <Suspense fallback={<p>loading</p>}>
      <Value />
    </Suspense>
  )
}
