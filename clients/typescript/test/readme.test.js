// The documentation's snippets are the ones the end-to-end app runs: each ```ts block that starts
// with a file name comment must equal that file of e2e/.

import assert from 'node:assert/strict'
import { readFileSync } from 'node:fs'
import { join } from 'node:path'
import { test } from 'node:test'

import { REPO } from './helpers.js'

const E2E = join(REPO, 'clients', 'typescript', 'e2e')
const FILES = ['next.config.ts', 'lib/auth.ts', 'lib/values.ts']

function snippets(markdown) {
  const found = new Map()
  for (const m of markdown.matchAll(/```ts\n(\/\/ ([\w./-]+)\n[\s\S]*?)```/g)) found.set(m[2], m[1])
  return found
}

// The package README and docs/nextjs.md must show all three; the top-level README, whichever it shows.
for (const [doc, required] of [
  ['clients/typescript/README.md', true],
  ['docs/nextjs.md', true],
  ['README.md', false],
]) {
  test(`${doc} shows the e2e app's own ${FILES.join(', ')}`, () => {
    const found = snippets(readFileSync(join(REPO, doc), 'utf8'))
    for (const file of FILES) {
      if (!required && !found.has(file)) continue
      assert.ok(found.has(file), `${doc} has no snippet of ${file}`)
      assert.equal(found.get(file), readFileSync(join(E2E, file), 'utf8'), `${doc}: the ${file} snippet differs from e2e/${file}`)
    }
  })
}
