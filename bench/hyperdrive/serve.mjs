// Serve a Hyperdrive 13 (made by put.mjs in STORAGE) to readers over plain TCP on
// 127.0.0.1: corestore's own replication (Noise + secretstream) on each socket.
// Prints `listening on 127.0.0.1:PORT` once listening (as a p2pfs seeder does); runs until killed.
// Only corestore and hyperdrive are loaded: no hyperswarm, no DHT, nothing leaves the host.
import Corestore from 'corestore'
import Hyperdrive from 'hyperdrive'
import net from 'net'

const [storage] = process.argv.slice(2)
const store = new Corestore(storage)
const drive = new Hyperdrive(store)
await drive.ready()
const server = net.createServer((socket) => {
  const stream = store.replicate(false)
  socket.pipe(stream).pipe(socket)
  socket.on('error', () => {})
  stream.on('error', () => {})
})
server.listen(0, '127.0.0.1', () => {
  console.log(`listening on 127.0.0.1:${server.address().port}`)
})
