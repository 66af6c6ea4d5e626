// Test set-up, run once by the e2e driver: BetterAuth's tables (users, accounts) in PostgreSQL.
import { getMigrations } from 'better-auth/db/migration'
import { auth } from '@/lib/auth'

export async function POST() {
  const { runMigrations } = await getMigrations(auth.options)
  await runMigrations()
  return Response.json({ migrated: true })
}
