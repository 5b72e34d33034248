// A reader's side of a serve.mjs seeder (fetch.mjs, download.mjs): a Hyperdrive 13 of KEY
// in a fresh corestore at STORAGE, replicating over plain TCP to 127.0.0.1:PORT, with the
// drive's newest length known.  `started` is the time of the TCP connect.
import Corestore from 'corestore'
import Hyperdrive from 'hyperdrive'
import net from 'net'

export async function openRemote (storage, keyHex, port) {
  const store = new Corestore(storage)
  const drive = new Hyperdrive(store, Buffer.from(keyHex, 'hex'))
  await drive.ready()
  const started = performance.now()
  const socket = net.connect(Number(port), '127.0.0.1')
  const stream = store.replicate(true)
  socket.pipe(stream).pipe(socket)
  socket.on('error', () => {})
  stream.on('error', () => {})
  await drive.core.update({ wait: true })
  return { store, drive, socket, started }
}
