"""The network layer (trio): TCP transport, peer sessions, fetching and serving.

`transport` dials and listens; `peer` drives one `wire.Connection` over a
socket; `swarm` schedules block requests across peers (the drive's
`BlockSource`) and serves the store; `server` runs `p2pfs seed`.
"""
