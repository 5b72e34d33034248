// The Hyperdrive baseline of bench_mirror.py: a full copy, as `p2pfs seed` makes one.
// Connects over plain TCP on 127.0.0.1 to a serve.mjs seeder of the drive KEY (made by
// put.mjs), replicates into a fresh corestore at STORAGE and times `drive.download('/')`
// from the TCP connect until it is done; then, with the socket closed, reads every file
// back from local storage alone to check that every byte is there.
// Prints {"seconds": ..., "files": ..., "bytes": ...}.
// Only corestore and hyperdrive are loaded: no hyperswarm, no DHT, nothing leaves the host.
import { openRemote } from './remote.mjs'

const [storage, keyHex, port] = process.argv.slice(2)
const { store, drive, socket, started } = await openRemote(storage, keyHex, port)
await drive.download('/').done()
const seconds = (performance.now() - started) / 1000
socket.destroy()
let files = 0
let bytes = 0
for await (const entry of drive.list('/', { recursive: true, wait: false })) {
  const data = await drive.get(entry.key, { wait: false })
  if (data === null) throw new Error(`${entry.key} is not held after download()`)
  files++
  bytes += data.length
}
console.log(JSON.stringify({ seconds, files, bytes }))
await drive.close()
await store.close()
