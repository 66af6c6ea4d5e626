// getCached's single flight inside one Next.js process: 50 concurrent calls for one missing key.
import { connection } from 'next/server'
import { getCached } from '@pgsidecar/client'

export async function POST(request: Request) {
  await connection()
  const { key } = (await request.json()) as { key: string }
  let calls = 0
  const fetcher = async () => {
    calls++
    await new Promise((resolve) => setTimeout(resolve, 200)) // a slow query
    return { computedBy: process.env.E2E_INSTANCE }
  }
  const results = await Promise.all(Array.from({ length: 50 }, () => getCached(key, fetcher, { ttlSeconds: 60 })))
  return Response.json({ calls, results })
}
