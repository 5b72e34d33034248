// Read one file of a Hyperdrive 13 from a serve.mjs seeder over TCP on 127.0.0.1 into a
// fresh corestore (cold) and print {"seconds": ..., "bytes": ...}, timed from the TCP
// connect to the last byte.  No hyperswarm, no DHT: nothing leaves the host.
import { openRemote } from './remote.mjs'

const [storage, keyHex, port, file] = process.argv.slice(2)
const { store, drive, socket, started } = await openRemote(storage, keyHex, port)
let bytes = 0
for await (const chunk of drive.createReadStream(file, { wait: true })) bytes += chunk.length
const seconds = (performance.now() - started) / 1000
console.log(JSON.stringify({ seconds, bytes }))
socket.destroy()
await drive.close()
await store.close()
