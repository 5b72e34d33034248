// The baseline of bench_mirror.py: a Hyperdrive 13 made from a directory in
// one corestore (not timed), replicated to a second, empty corestore on disk
// through an in-process stream pair, and `drive.download('/')` timed there.
// Prints {"seconds": ..., "files": ..., "bytes": ...}.  Only corestore and
// hyperdrive are loaded: no hyperswarm, no DHT, no sockets.
import Corestore from 'corestore'
import Hyperdrive from 'hyperdrive'
import fs from 'fs'
import path from 'path'

const [dir, storage] = process.argv.slice(2)

const source = new Corestore(path.join(storage, 'source'))
const owner = new Hyperdrive(source)
await owner.ready()
let files = 0
let bytes = 0
function * walk (d, rel) {
  for (const e of fs.readdirSync(d, { withFileTypes: true })) {
    const full = path.join(d, e.name)
    if (e.isDirectory()) yield * walk(full, rel + '/' + e.name)
    else if (e.isFile()) yield [full, rel + '/' + e.name]
  }
}
for (const [full, rel] of walk(dir, '')) {
  const data = fs.readFileSync(full)
  await owner.put(rel, data)
  files++
  bytes += data.length
}

const reader = new Corestore(path.join(storage, 'reader'))
const a = source.replicate(true)
const b = reader.replicate(false)
a.pipe(b).pipe(a)
const copy = new Hyperdrive(reader, owner.key)
await copy.ready()
const started = performance.now()
await copy.update({ wait: true })
await copy.download('/').done()
const seconds = (performance.now() - started) / 1000
a.destroy() // no more replication: every byte must now be local
b.destroy()
let got = 0
for (const [, rel] of walk(dir, '')) got += (await copy.get(rel, { wait: false })).length
if (got !== bytes) throw new Error(`downloaded ${got} of ${bytes} bytes`)
await copy.close()
await owner.close()
await reader.close()
await source.close()
console.log(JSON.stringify({ seconds, files, bytes }))
