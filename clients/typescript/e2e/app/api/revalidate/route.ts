// revalidateTag from a route handler (stale-while-revalidate with the 'max' profile).
import { revalidateTag } from 'next/cache'

export async function POST(request: Request) {
  const { tag } = (await request.json()) as { tag: string }
  revalidateTag(tag, 'max')
  return Response.json({ revalidated: tag })
}
