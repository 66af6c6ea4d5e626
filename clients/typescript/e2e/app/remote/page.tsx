// A component cached with 'use cache: remote', through `cacheHandlers.remote`.
import { Suspense } from 'react'
import { connection } from 'next/server'
import { cacheLife, cacheTag } from 'next/cache'
import { readValue } from '@/lib/db'

async function cachedValue() {
  'use cache: remote'
  cacheTag('remote')
  cacheLife('max')
  return readValue('remote')
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
