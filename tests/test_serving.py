"""The seeder's answers (net/serving.py), straight from a real store: a run
is served from views of the read transaction, never copied out of LMDB, and
what it sends verifies against the signed head."""

from __future__ import annotations

import pytest

from p2pfs import crypto, tree
from p2pfs.drive import Drive
from p2pfs.net.fetcher import NodeCaches
from p2pfs.net.serving import Server
from p2pfs.store import Store
from p2pfs.wire import messages as m

from helpers import create, write_random


@pytest.fixture
def served(tmp_path, home):
    src = tmp_path / "src"
    src.mkdir()
    write_random(src / "big.bin", 20 * 65536 + 123, seed=7)
    key = crypto.decode_key(create(home, src))
    store = Store(home)
    drive = Drive(store, key)
    yield store, key, drive, Server(store, NodeCaches(store), lambda k: drive if k == key else None)
    store.close()


def _request(drive: Drive, start: int, count: int) -> m.Request:
    length = drive.head.length
    nodes = tree.range_proof_request(start, start + count, length, lambda i: False)
    return m.Request(5, 9, start, count, length, nodes)


def test_a_run_is_sent_from_views_of_the_store_and_verifies(served):
    store, key, drive, server = served
    req = _request(drive, 1, 16)
    seen = []

    def send(reply):
        assert isinstance(reply, m.Data)
        # views of the read transaction: no copy out of LMDB before the encoder
        assert all(type(b) is memoryview for b in reply.blocks)
        seen.append((m.encode(reply), [bytes(b) for b in reply.blocks]))
    server.respond(5, key, req, send)
    [(wire, blocks)] = seen
    assert blocks == store.get_blocks(key, range(1, 17))
    assert len(wire) <= m.size_hint(m.decode(wire))
    got = m.decode(wire)
    checked = tree.verify_range(1, got.blocks, got.nodes, drive.head.length, drive.head.root,
                                lambda i: None, leaves=got.leaves)
    assert not checked.bad


def test_answer_returns_copies_that_outlive_the_transaction(served):
    store, key, drive, server = served
    [reply] = server.answer(5, key, _request(drive, 3, 4))
    assert isinstance(reply, m.Data) and all(type(b) is bytes for b in reply.blocks)
    assert reply.blocks == store.get_blocks(key, range(3, 7))


def test_an_unknown_drive_a_newer_length_or_an_impossible_proof_gets_nodata(served):
    store, key, drive, server = served
    length = drive.head.length
    assert server.answer(5, key, m.Request(5, 9, length - 1, 1, length + 1, [])) == [m.NoData(5, 9)]
    assert server.answer(5, bytes(32), _request(drive, 1, 1)) == [m.NoData(5, 9)]
    # a proof node outside the version's tree cannot be given: no half answer
    assert server.answer(5, key, m.Request(5, 9, 1, 2, length, [2 * length - 1])) == [m.NoData(5, 9)]


def test_a_run_bigger_than_one_reply_gets_nodata_before_any_proof_is_built(served, monkeypatch):
    """17 blocks of 64 KiB exceed MAX_RUN_DATA: refused on the cheap bound,
    without the leaves and proof a peer could make us build for nothing."""
    store, key, drive, server = served
    built = []
    run = Server._run
    monkeypatch.setattr(Server, "_run", lambda self, *a: built.append(a) or run(self, *a))
    assert server.answer(5, key, _request(drive, 1, 17)) == [m.NoData(5, 9)]
    assert built == []
    [reply] = server.answer(5, key, _request(drive, 1, 16))  # 1 MiB exactly: served
    assert isinstance(reply, m.Data) and len(built) == 1
