// Import a directory into a new Hyperdrive 13 on a local corestore and print
// {"seconds": ..., "files": ..., "bytes": ..., "key": hex}: the baseline of bench_share.py
// (and the drive bench_net.py serves with serve.mjs).
// Only corestore and hyperdrive are loaded: no hyperswarm, no DHT, no sockets.
import Corestore from 'corestore'
import Hyperdrive from 'hyperdrive'
import fs from 'fs'
import path from 'path'
import { pipeline } from 'stream/promises'

const [dir, storage] = process.argv.slice(2)
const BIG = 16 << 20 // files larger than this are streamed (createWriteStream)
const IN_FLIGHT = 32 // small puts run this many at a time

const store = new Corestore(storage)
const drive = new Hyperdrive(store)
await drive.ready()

function * walk (d, rel) {
  for (const e of fs.readdirSync(d, { withFileTypes: true })) {
    const full = path.join(d, e.name)
    const r = rel + '/' + e.name
    if (e.isDirectory()) yield * walk(full, r)
    else if (e.isFile()) yield [full, r]
  }
}

const started = performance.now()
let files = 0
let bytes = 0
const pending = new Set()
for (const [full, rel] of walk(dir, '')) {
  const size = fs.statSync(full).size
  files++
  bytes += size
  if (size > BIG) {
    await pipeline(fs.createReadStream(full, { highWaterMark: 1 << 20 }), drive.createWriteStream(rel))
    continue
  }
  const p = fs.promises.readFile(full).then((data) => drive.put(rel, data))
  pending.add(p)
  p.finally(() => pending.delete(p))
  if (pending.size >= IN_FLIGHT) await Promise.race(pending)
}
await Promise.all(pending)
const key = drive.key.toString('hex')
await drive.close()
await store.close()
const seconds = (performance.now() - started) / 1000
console.log(JSON.stringify({ seconds, files, bytes, key }))
