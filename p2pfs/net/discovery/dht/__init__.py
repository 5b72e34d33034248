"""The BitTorrent Mainline DHT (BEP 5, with BEP 42 node IDs and BEP 44 items).

One module per part, as in libtorrent's `src/kademlia/`:

* `krpc`      sans-IO: bencoded datagrams <-> typed, validated messages
* `node_id`   the XOR metric, BEP 42 IDs, external-IP voting
* `routing`   the k-bucket routing table, liveness, persistence format
* `rpc`       transactions and timeouts, DoS blocker, rate limit, write tokens
* `items`     BEP 44 items: targets and signatures
* `storage`   peers and items stored for others, bounded and expiring
* `traversal` lookups: find_node, get_peers, get item; store rounds
* `engine`    the node's sans-IO state machine: datagram in, answer out
* `node`      the trio driver: the UDP socket, timers, lookups (`DhtNode`)

Everything but `node` is pure (no trio, no sockets, no clock) and is
tested and fuzzed without a network.
"""
