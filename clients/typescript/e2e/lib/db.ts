// The app's own PostgreSQL pool (users and accounts for BetterAuth, and the values the pages show).
import { Pool } from 'pg'

const g = globalThis as { appPool?: Pool }
export const pool = (g.appPool ??= new Pool({ connectionString: process.env.DATABASE_URL, max: 5 }))

/** The value the e2e driver keeps in the table, with the instance that read it. */
export async function readValue(name: string): Promise<string> {
  const { rows } = await pool.query<{ value: string }>('SELECT value FROM e2e_values WHERE name = $1', [name])
  return `${rows[0]?.value ?? '(none)'}@${process.env.E2E_INSTANCE ?? '?'}`
}
