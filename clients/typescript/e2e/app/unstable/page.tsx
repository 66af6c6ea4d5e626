// A dynamic page whose data comes from `unstable_cache`, cached through `cacheHandler`.
import { Suspense } from 'react'
import { connection } from 'next/server'
import { unstable_cache } from 'next/cache'
import { readValue } from '@/lib/db'

const value = unstable_cache(() => readValue('unstable'), ['unstable'], { tags: ['unstable'] })

async function Value() {
  await connection()
  return <p>E2E[{await value()}]</p>
}

export default function Page() {
  return (
    <Suspense fallback={<p>loading</p>}>
      <Value />
    </Suspense>
  )
}
