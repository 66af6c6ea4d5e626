// getCached's single flight inside one Next.js process: 50 concurrent calls for one missing key.
import { connection } from 'next/server'
import { queriesRun } from '@/lib/db'
import { getValue } from '@/lib/values'

export async function POST(request: Request) {
  await connection()
  const { name } = (await request.json()) as { name: string }
  const before = queriesRun()
  const results = await Promise.all(Array.from({ length: 50 }, () => getValue(name)))
  return Response.json({ queries: queriesRun() - before, results })
}
