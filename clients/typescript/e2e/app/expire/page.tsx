// Registers the server action (the e2e driver calls it by its id, as a form submission would).
import { expireTag } from '../actions'

export default function Page() {
  return (
    <form action={expireTag.bind(null, 'use-cache')}>
      <button type="submit">expire</button>
    </form>
  )
}
