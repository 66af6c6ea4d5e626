// lib/values.ts
import { getCached } from '@pgsidecar/client'
import { pool } from './db'

export function getValue(name: string) {
  return getCached(`value:${name}`, async () => {
    const { rows } = await pool.query('SELECT value FROM e2e_values WHERE name = $1', [name])
    return rows[0]?.value ?? null
  }, { ttlSeconds: 300, tags: [`value:${name}`] })
}
