// A static page (ISR): the page itself is cached through `cacheHandler`.
import { unstable_cache } from 'next/cache'
import { readValue } from '@/lib/db'

const value = unstable_cache(() => readValue('isr'), ['isr'], { tags: ['isr'] })

export default async function Page() {
  return <p>E2E[{await value()}]</p>
}
