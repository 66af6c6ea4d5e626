// The byte format of Next.js cache entries in the sidecar: JSON for the structure, raw bytes
// for every Buffer, so RSC payloads and segment data are stored as they are (no base64).
//
//   "PGSN" | version (1 byte) | header length (u32, big-endian) | header (UTF-8 JSON) | blobs
//
// The header is `{"v": <value>, "b": [<blob length>, ...]}` where, inside `<value>`, a
// Uint8Array/Buffer is `{"$b": i}` (the i-th blob), a Map is `{"$m": [[key, value], ...]}`, and a
// plain object with a key starting with `$` is wrapped as `{"$o": {...}}` so it cannot be
// mistaken for either.

const MAGIC = [0x50, 0x47, 0x53, 0x4e] // "PGSN"
const VERSION = 1
const PREFIX_BYTES = MAGIC.length + 1 + 4

/** The media type entries are stored with. */
export const ENVELOPE_CONTENT_TYPE = 'application/vnd.pgsidecar.next-entry; v=1'

export function encodeEnvelope(value: unknown): Buffer {
  const blobs: Uint8Array[] = []
  const lengths: number[] = []
  const walk = (v: unknown): unknown => {
    if (v instanceof Uint8Array) {
      blobs.push(v)
      lengths.push(v.byteLength)
      return { $b: blobs.length - 1 }
    }
    if (v instanceof Map) return { $m: [...v].map(([k, x]) => [walk(k), walk(x)]) }
    if (Array.isArray(v)) return v.map(walk)
    if (v !== null && typeof v === 'object') {
      if (typeof (v as { toJSON?: unknown }).toJSON === 'function') return (v as { toJSON(): unknown }).toJSON()
      const out: Record<string, unknown> = {}
      let escaped = false
      for (const [k, x] of Object.entries(v)) {
        if (x === undefined) continue
        if (k.startsWith('$')) escaped = true
        out[k] = walk(x)
      }
      return escaped ? { $o: out } : out
    }
    return v
  }
  const header = Buffer.from(JSON.stringify({ v: walk(value), b: lengths }), 'utf8')
  const prefix = Buffer.alloc(PREFIX_BYTES)
  prefix.set(MAGIC, 0)
  prefix[MAGIC.length] = VERSION
  prefix.writeUInt32BE(header.byteLength, MAGIC.length + 1)
  return Buffer.concat([prefix, header, ...blobs])
}

/** Decodes an envelope; Buffers come back as Buffers (views of `bytes`, not copies). */
export function decodeEnvelope(bytes: Uint8Array): unknown {
  const buf = Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength)
  if (buf.byteLength < PREFIX_BYTES || MAGIC.some((m, i) => buf[i] !== m) || buf[MAGIC.length] !== VERSION) {
    throw new Error('not a pgsidecar Next.js cache entry')
  }
  const headerLength = buf.readUInt32BE(MAGIC.length + 1)
  const headerEnd = PREFIX_BYTES + headerLength
  if (headerEnd > buf.byteLength) throw new Error('truncated pgsidecar Next.js cache entry')
  const header = JSON.parse(buf.subarray(PREFIX_BYTES, headerEnd).toString('utf8')) as { v: unknown; b: number[] }
  const blobs: Buffer[] = []
  let at = headerEnd
  for (const length of header.b) {
    if (at + length > buf.byteLength) throw new Error('truncated pgsidecar Next.js cache entry')
    blobs.push(buf.subarray(at, at + length))
    at += length
  }
  const walk = (v: unknown): unknown => {
    if (Array.isArray(v)) return v.map(walk)
    if (v !== null && typeof v === 'object') {
      const o = v as Record<string, unknown>
      if (typeof o.$b === 'number') {
        const blob = blobs[o.$b]
        if (blob === undefined) throw new Error('corrupt pgsidecar Next.js cache entry')
        return blob
      }
      if (Array.isArray(o.$m)) return new Map((o.$m as [unknown, unknown][]).map(([k, x]) => [walk(k), walk(x)]))
      const plain = o.$o !== undefined && typeof o.$o === 'object' && o.$o !== null ? (o.$o as Record<string, unknown>) : o
      const out: Record<string, unknown> = {}
      for (const [k, x] of Object.entries(plain)) out[k] = walk(x)
      return out
    }
    return v
  }
  return walk(header.v)
}
