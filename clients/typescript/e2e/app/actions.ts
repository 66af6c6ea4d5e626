'use server'
// updateTag (read-your-writes) is allowed only in server actions.
import { updateTag } from 'next/cache'

export async function expireTag(tag: string) {
  updateTag(tag)
}
