// The app's own PostgreSQL pool (the values the pages show; BetterAuth has its own pool).
import { Pool } from 'pg'

const g = globalThis as { appPool?: Pool; appQueries?: number }
export const pool = (g.appPool ??= new Pool({ connectionString: process.env.DATABASE_URL, max: 5 }))
// Test instrumentation: how many queries this process ran (each takes a pooled client).
if (g.appQueries === undefined) {
  g.appQueries = 0
  pool.on('acquire', () => (g.appQueries! += 1))
}
export const queriesRun = () => g.appQueries ?? 0

/** The value the e2e driver keeps in the table, with the instance that read it. */
export async function readValue(name: string): Promise<string> {
  const { rows } = await pool.query<{ value: string }>('SELECT value FROM e2e_values WHERE name = $1', [name])
  return `${rows[0]?.value ?? '(none)'}@${process.env.E2E_INSTANCE ?? '?'}`
}
