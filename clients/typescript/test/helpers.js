// Test helpers: a fresh PostgreSQL database per suite and the real `pgsidecar` binary on port 0
// (as tests/it/helpers.rs does), killed when the suite or the process ends.

import { spawn } from 'node:child_process'
import { randomUUID } from 'node:crypto'
import { mkdtempSync, rmSync } from 'node:fs'
import { createServer } from 'node:net'
import { dirname, join, resolve } from 'node:path'
import { createInterface } from 'node:readline'
import { fileURLToPath } from 'node:url'

import pg from 'pg'

const here = dirname(fileURLToPath(import.meta.url))
export const REPO = resolve(here, '..', '..', '..')
export const BIN = process.env.PGSIDECAR_BIN ?? resolve(REPO, 'target', 'debug', 'pgsidecar')

/** The superuser URL the suite runs against (scripts/test.sh exports it). */
export function adminUrl() {
  const url = process.env.DATABASE_URL
  if (!url) throw new Error('DATABASE_URL must point at a PostgreSQL superuser (scripts/test.sh sets it)')
  return url
}

export function withDatabase(url, db) {
  const u = new URL(url)
  u.pathname = `/${db}`
  return u.toString()
}

/** Creates an empty database with a unique name and returns its URL. */
export async function freshDb() {
  const name = `pgsidecar_ts_${randomUUID().replaceAll('-', '')}`
  const admin = new pg.Client({ connectionString: adminUrl() })
  await admin.connect()
  try {
    await admin.query(`CREATE DATABASE ${name}`)
  } finally {
    await admin.end()
  }
  return withDatabase(adminUrl(), name)
}

/** Runs one query on a database and returns its rows. */
export async function query(url, text, params = []) {
  const c = new pg.Client({ connectionString: url })
  await c.connect()
  try {
    return (await c.query(text, params)).rows
  } finally {
    await c.end()
  }
}

const running = new Set()
const socketDirs = new Set()
process.on('exit', () => {
  for (const child of running) child.kill('SIGKILL')
  for (const dir of socketDirs) rmSync(dir, { recursive: true, force: true })
})

/**
 * A path for a unix socket in a new private directory, removed when the process exits. Under
 * /tmp rather than TMPDIR: a socket path must fit in 108 bytes.
 */
export function socketPath(name = 'data.sock') {
  const dir = mkdtempSync('/tmp/pgsc-')
  socketDirs.add(dir)
  return join(dir, name)
}

/**
 * Starts the sidecar against `db` (a fresh database when absent) and waits until it is ready;
 * with `unix`, its data API listens on a unix socket (a fresh path, or the path given) and `url`
 * is `unix:/path`. Returns `{ url, ops, db, logs, stop }`.
 */
export async function startSidecar({ db, env = {}, unix = false } = {}) {
  db ??= await freshDb()
  if (unix) env = { PGSIDECAR_SERVER__DATA_LISTEN: `unix:${unix === true ? socketPath() : unix}`, ...env }
  const child = spawn(BIN, [], {
    env: {
      PATH: process.env.PATH ?? '',
      HOSTNAME: 'test-host',
      DATABASE_URL: db,
      PGSIDECAR_SERVER__DATA_LISTEN: '127.0.0.1:0',
      PGSIDECAR_SERVER__OPS_LISTEN: '127.0.0.1:0',
      PGSIDECAR_HEALTH__INTERVAL_MS: '200',
      PGSIDECAR_SHUTDOWN__DRAIN_SECONDS: '0',
      PGSIDECAR_SHUTDOWN__GRACE_SECONDS: '5',
      PGSIDECAR_DATABASE__MIN_CONNECTIONS: '1',
      ...env,
    },
    stdio: ['ignore', 'pipe', 'pipe'],
  })
  running.add(child)
  const logs = []
  let stderr = ''
  child.stderr.on('data', (d) => (stderr += d))
  const started = new Promise((resolvePromise, reject) => {
    const timer = setTimeout(() => reject(new Error(`pgsidecar did not start; stderr: ${stderr}`)), 30_000)
    child.on('exit', (code) => {
      clearTimeout(timer)
      reject(new Error(`pgsidecar exited with ${code}; stderr: ${stderr}`))
    })
    createInterface({ input: child.stdout }).on('line', (line) => {
      logs.push(line)
      if (line.includes('"pgsidecar started"')) {
        clearTimeout(timer)
        const v = JSON.parse(line)
        resolvePromise({ data: v.data_listen, ops: v.ops_listen })
      }
    })
  })
  const { data, ops } = await started
  const sidecar = {
    url: data.startsWith('unix:') ? data : `http://${data}`,
    ops: `http://${ops}`,
    db,
    logs,
    child,
    async stop() {
      if (child.exitCode !== null || child.signalCode !== null) return
      const exited = new Promise((r) => child.once('exit', r))
      child.kill('SIGKILL')
      await exited
      running.delete(child)
    },
  }
  // Generous: a fresh database's migrations on a loaded CI machine.
  const until = Date.now() + 60_000
  for (;;) {
    try {
      const r = await fetch(`${sidecar.ops}/ready`)
      if (r.status === 200) break
    } catch {
      // not listening yet
    }
    if (Date.now() > until) throw new Error(`sidecar not ready in time; logs:\n${logs.join('\n')}`)
    await new Promise((r) => setTimeout(r, 50))
  }
  return sidecar
}

/** A TCP port nothing listens on (bound, then closed). */
export async function closedPort() {
  const server = createServer()
  await new Promise((r) => server.listen(0, '127.0.0.1', r))
  const { port } = server.address()
  await new Promise((r) => server.close(r))
  return port
}

/**
 * A server that accepts connections and never answers (with `answer`, answers each request's
 * first bytes with it and then says nothing more): for timeouts. On TCP, or with `unix`, on a
 * unix socket. Returns `{ url, close }`.
 */
export async function silentServer({ unix = false, answer } = {}) {
  const sockets = new Set()
  const server = createServer((s) => {
    sockets.add(s)
    s.on('error', () => {})
    s.on('close', () => sockets.delete(s))
    if (answer !== undefined) s.once('data', () => s.write(answer))
  })
  const path = unix ? socketPath() : undefined
  await new Promise((r) => (path ? server.listen(path, r) : server.listen(0, '127.0.0.1', r)))
  return {
    url: path ? `unix:${path}` : `http://127.0.0.1:${server.address().port}`,
    async close() {
      for (const s of sockets) s.destroy()
      await new Promise((r) => server.close(r))
    },
  }
}

/** Polls `fn` until it returns a truthy value or `ms` pass; returns the last value. */
export async function eventually(fn, ms = 15_000, every = 100) {
  const until = Date.now() + ms
  for (;;) {
    const v = await fn()
    if (v || Date.now() > until) return v
    await new Promise((r) => setTimeout(r, every))
  }
}
