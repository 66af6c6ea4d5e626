// End to end with the real frameworks: the Next.js 16 app in e2e/ (its packages from the
// registry, the client from its packed tarball), built once, then run as two containers would
// run it: two `next start` processes, each from its own copy of the build, each with its own
// sidecar (A's over TCP, B's over a unix socket: `PGSIDECAR_URL=unix:/path`), one PostgreSQL
// database. Proves the shared cache through both Next.js handlers,
// invalidation across the fleet, BetterAuth sessions across instances, and getCached's single
// flight inside one Next.js process.

import assert from 'node:assert/strict'
import { spawn } from 'node:child_process'
import { randomUUID } from 'node:crypto'
import { cpSync, mkdtempSync, readFileSync, rmSync, symlinkSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { dirname, join, resolve } from 'node:path'
import { after, before, describe, test } from 'node:test'
import { fileURLToPath } from 'node:url'

import { closedPort, eventually, freshDb, query, startSidecar } from '../../test/helpers.js'

const APP = resolve(dirname(fileURLToPath(import.meta.url)), '..')
const NEXT_BIN = join(APP, 'node_modules', 'next', 'dist', 'bin', 'next')
const SECRET = 'e2e-better-auth-secret-0123456789abcdef'
const MECHANISMS = ['isr', 'unstable', 'use-cache', 'remote']

const children = new Set()
process.on('exit', () => {
  for (const c of children) c.kill('SIGKILL')
})

/** Runs a command to completion; rejects with its output when it fails. */
function run(cmd, args, options) {
  return new Promise((resolvePromise, reject) => {
    const child = spawn(cmd, args, { ...options, stdio: ['ignore', 'pipe', 'pipe'] })
    children.add(child)
    let out = ''
    child.stdout.on('data', (d) => (out += d))
    child.stderr.on('data', (d) => (out += d))
    child.on('exit', (code) => {
      children.delete(child)
      if (code === 0) resolvePromise(out)
      else reject(new Error(`${cmd} ${args.join(' ')} exited with ${code}:\n${out}`))
    })
  })
}

/** One `next start` from its own copy of the build, with its own sidecar (on a unix socket with `unix`). */
async function startInstance(name, buildDir, db, { unix = false } = {}) {
  const dir = mkdtempSync(join(tmpdir(), `pgsidecar-e2e-${name}-`))
  // Everything `next start` reads, but not `.next/cache`: each instance gets its own, as each container would.
  cpSync(join(buildDir, '.next'), join(dir, '.next'), { recursive: true, filter: (src) => !src.startsWith(join(buildDir, '.next', 'cache')) })
  for (const f of ['next.config.ts', 'package.json', 'tsconfig.json']) cpSync(join(buildDir, f), join(dir, f))
  symlinkSync(join(buildDir, 'node_modules'), join(dir, 'node_modules'), 'dir') // code, not state
  const sidecar = await startSidecar({ db, unix })
  const port = await closedPort()
  const url = `http://127.0.0.1:${port}`
  const child = spawn(process.execPath, [NEXT_BIN, 'start', '-p', String(port), '-H', '127.0.0.1'], {
    cwd: dir,
    env: {
      PATH: process.env.PATH ?? '',
      HOME: process.env.HOME ?? dir,
      NODE_ENV: 'production',
      NEXT_TELEMETRY_DISABLED: '1',
      DATABASE_URL: db,
      PGSIDECAR_URL: sidecar.url,
      BETTER_AUTH_SECRET: SECRET,
      BETTER_AUTH_URL: url,
      E2E_INSTANCE: name,
    },
    stdio: ['ignore', 'pipe', 'pipe'],
  })
  children.add(child)
  const logs = []
  child.stdout.on('data', (d) => logs.push(String(d)))
  child.stderr.on('data', (d) => logs.push(String(d)))
  const up = await eventually(async () => {
    if (child.exitCode !== null) return true
    try {
      return (await fetch(`${url}/expire`)).status === 200
    } catch {
      return false
    }
  }, 60_000, 200)
  assert.ok(up && child.exitCode === null, `next start ${name} did not come up:\n${logs.join('')}`)
  return {
    name,
    url,
    sidecar,
    logs,
    async stop() {
      if (child.exitCode === null) {
        const exited = new Promise((r) => child.once('exit', r))
        child.kill('SIGTERM')
        await exited
      }
      children.delete(child)
      await sidecar.stop()
      rmSync(dir, { recursive: true, force: true })
    },
  }
}

/** The `value@instance` a page shows. */
async function shown(instance, path) {
  const res = await fetch(`${instance.url}${path}`, { headers: { 'cache-control': 'no-cache' } })
  const html = (await res.text()).replaceAll('<!-- -->', '')
  assert.equal(res.status, 200, `${instance.name} ${path} answered ${res.status}; its log:\n${instance.logs.join('')}`)
  const m = html.match(/<p>E2E\[([^\]<]*)\]<\/p>/)
  assert.ok(m, `no value in ${instance.name} ${path}:\n${html.slice(0, 2000)}`)
  return m[1]
}

describe('Next.js 16 + BetterAuth on two instances, two sidecars, one PostgreSQL', () => {
  let db
  let A
  let B
  let actionId

  const setValue = (name, value) => query(db, 'UPDATE e2e_values SET value = $2 WHERE name = $1', [name, value])

  before(async () => {
    db = await freshDb()
    await query(db, 'CREATE TABLE e2e_values (name text PRIMARY KEY, value text NOT NULL)')
    for (const m of MECHANISMS) await query(db, 'INSERT INTO e2e_values VALUES ($1, $2)', [m, 'at-build'])
    // Built once per run, with no sidecar to reach (as in CI): the handlers fail open.
    // (E2E_REUSE_BUILD=1 reuses the last build, when iterating on the driver alone.)
    const started = Date.now()
    if (process.env.E2E_REUSE_BUILD !== '1') await run(process.execPath, [NEXT_BIN, 'build'], {
      cwd: APP,
      env: {
        ...process.env,
        NODE_ENV: 'production',
        NEXT_TELEMETRY_DISABLED: '1',
        DATABASE_URL: db,
        PGSIDECAR_URL: `http://127.0.0.1:${await closedPort()}`,
        E2E_INSTANCE: 'build',
      },
    })
    console.log(`next build took ${((Date.now() - started) / 1000).toFixed(1)} s`)
    const manifest = JSON.parse(readFileSync(join(APP, '.next', 'server', 'server-reference-manifest.json'), 'utf8'))
    actionId = Object.entries(manifest.node).find(([, v]) => v.exportedName === 'expireTag')?.[0]
    assert.ok(actionId, 'the expireTag server action is in the build')
    ;[A, B] = await Promise.all([startInstance('A', APP, db), startInstance('B', APP, db, { unix: true })])
    assert.ok(B.sidecar.url.startsWith('unix:/'), B.sidecar.url)
    const setup = await fetch(`${A.url}/api/setup`, { method: 'POST' })
    assert.equal(setup.status, 200, await setup.text())
  })

  after(async () => {
    await Promise.all([A?.stop(), B?.stop()])
  })

  for (const m of MECHANISMS) {
    test(`shared cache (/${m}): B serves what A rendered, not its own`, async () => {
      await setValue(m, 'v1')
      // A computes it (the build-time render is not in the shared cache; A's first read may be stale)
      let last
      const fromA = await eventually(async () => ((last = await shown(A, `/${m}`)) === 'v1@A' ? last : null), 20_000, 300)
      assert.equal(fromA, 'v1@A', `A kept showing ${last}; A's log:\n${A.logs.join('')}`)
      await setValue(m, 'v2')
      assert.equal(await shown(B, `/${m}`), 'v1@A')
      assert.equal(await shown(B, `/${m}`), 'v1@A')
    })
  }

  /** revalidateTag(tag, 'max') in a route handler on A: stale-while-revalidate across the fleet. */
  async function revalidateOnA(tag) {
    const res = await fetch(`${A.url}/api/revalidate`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ tag }) })
    assert.equal(res.status, 200, await res.text())
  }

  /** updateTag(tag) in a server action on A, called as the browser calls it. */
  async function updateTagOnA(tag) {
    const res = await fetch(`${A.url}/expire`, {
      method: 'POST',
      headers: { 'next-action': actionId, accept: 'text/x-component', 'content-type': 'text/plain;charset=UTF-8' },
      body: JSON.stringify([tag]),
    })
    const body = await res.text()
    assert.equal(res.status, 200, body)
  }

  for (const [m, how, invalidate] of [
    ['isr', "revalidateTag(tag, 'max')", revalidateOnA],
    ['unstable', 'updateTag (server action)', updateTagOnA],
    ['use-cache', "revalidateTag(tag, 'max')", revalidateOnA],
    ['remote', 'updateTag (server action)', updateTagOnA],
  ]) {
    test(`invalidation across the fleet (/${m}): ${how} on A, B serves the new value`, async () => {
      await setValue(m, 'v3')
      assert.notEqual(await shown(B, `/${m}`), 'v3@B', 'still cached before the invalidation')
      await invalidate(m)
      // stale-while-revalidate serves the old value once more while B regenerates it
      let last
      const seen = await eventually(async () => ((last = await shown(B, `/${m}`)).startsWith('v3@') ? last : null), 15_000, 300)
      assert.ok(seen, `B kept showing ${last} for /${m}; B's log:\n${B.logs.join('')}`)
    })
  }

  test('BetterAuth: signed in on A, the cookie works on B; signed out on A, B rejects it', async () => {
    const email = `user-${randomUUID()}@example.com`
    const post = (instance, path, body, cookie) =>
      fetch(`${instance.url}/api/auth${path}`, {
        method: 'POST',
        headers: { 'content-type': 'application/json', origin: instance.url, ...(cookie ? { cookie } : {}) },
        body: JSON.stringify(body ?? {}),
      })
    const session = async (instance, cookie) => {
      const res = await fetch(`${instance.url}/api/auth/get-session`, { headers: { cookie } })
      assert.equal(res.status, 200)
      return res.json()
    }
    const cookieOf = (res) => {
      const c = res.headers.getSetCookie().find((h) => h.startsWith('better-auth.session_token='))
      assert.ok(c, `no session cookie in ${res.headers.getSetCookie()}`)
      return c.split(';')[0]
    }

    const signUp = await post(A, '/sign-up/email', { email, password: 'correct horse battery', name: 'E2E' })
    assert.equal(signUp.status, 200, await signUp.clone().text())
    const signIn = await post(A, '/sign-in/email', { email, password: 'correct horse battery' })
    assert.equal(signIn.status, 200, await signIn.clone().text())
    const cookie = cookieOf(signIn)

    const onB = await session(B, cookie)
    assert.equal(onB?.user?.email, email)
    // the session lives in the sidecar, under a hashed key: no token in the database
    const token = decodeURIComponent(cookie.split('=')[1]).split('.')[0]
    const keys = await query(db, 'SELECT key FROM pgsidecar.cache WHERE key LIKE $1', ['better-auth:%'])
    assert.ok(keys.length > 0)
    assert.ok(keys.every(({ key }) => !key.includes(token)))

    const signOut = await post(A, '/sign-out', {}, cookie)
    assert.equal(signOut.status, 200, await signOut.clone().text())
    assert.equal(await session(B, cookie), null)
    assert.equal(await session(A, cookie), null)
  })

  test('getCached in a route handler: 50 concurrent calls for one missing key run the fetcher once', async () => {
    const name = `single-flight-${randomUUID()}`
    await query(db, 'INSERT INTO e2e_values VALUES ($1, $2)', [name, 'computed on A'])
    const call = async (instance) => {
      const res = await fetch(`${instance.url}/api/single-flight`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ name }) })
      assert.equal(res.status, 200)
      return res.json()
    }
    const onA = await call(A)
    assert.equal(onA.queries, 1)
    assert.deepEqual(onA.results, Array(50).fill('computed on A'))
    // and B finds it in the shared cache: no query, A's value although the table changed
    await query(db, 'UPDATE e2e_values SET value = $2 WHERE name = $1', [name, 'changed'])
    const onB = await call(B)
    assert.equal(onB.queries, 0)
    assert.deepEqual(onB.results, Array(50).fill('computed on A'))
  })
})
