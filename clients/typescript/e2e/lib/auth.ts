// lib/auth.ts
import { betterAuth } from 'better-auth'
import { Pool } from 'pg'
import { pgsidecarStorage } from '@pgsidecar/client/better-auth'

export const auth = betterAuth({
  database: new Pool({ connectionString: process.env.DATABASE_URL }), // users and accounts
  secondaryStorage: pgsidecarStorage(), // sessions, shared by every container through the sidecar
  emailAndPassword: { enabled: true },
})
