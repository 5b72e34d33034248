"""The watcher: WatchState's bookkeeping (sans-IO, made-up events) and the real
inotify Watcher feeding a Publisher (real files, real events)."""

from __future__ import annotations

import os
import random
import shutil

import pytest
import trio
from inotify_simple import flags as F

from p2pfs.drive import Drive, verify_drive
from p2pfs.ignore import Rules
from p2pfs.publish import Publisher, create_drive
from p2pfs.store import Store
from p2pfs.watch import FATAL, LOG, RELOAD, UNWATCH, WATCH, Watcher, WatchState

from test_publish import NAMES, apply, listing, on_disk

D = F.ISDIR


def state(**kw) -> WatchState:
    s = WatchState(quiet=1.0, max_delay=5.0, **kw)
    s.watched(1, b"/")
    s.watched(2, b"/d")
    s.watched(3, b"/d/e")
    return s


def test_a_batch_is_due_after_quiet_or_max_delay():
    s = state()
    assert s.due() is None
    s.feed([(1, F.CREATE, 0, b"a"), (1, F.CLOSE_WRITE, 0, b"a")], now=10.0)
    assert s.due() == 11.0
    for t in range(11, 16):  # constant churn: an event every second, just under `quiet`
        s.feed([(1, F.ATTRIB, 0, b"b%d" % t)], now=t - 0.5)
        assert s.due() == min(t + 0.5, 15.0)  # at most 5 s after the first event
    changes, actions = s.take(15.0)
    assert changes.paths == {b"/", b"/a"} | {b"/b%d" % t for t in range(11, 16)} and not actions
    assert s.due() is None


def test_busy_files_wait_for_close_or_quiet():
    s = state()
    s.feed([(1, F.CREATE, 0, b"big"), (1, F.MODIFY, 0, b"big"), (1, F.CREATE, 0, b"small"),
            (1, F.CLOSE_WRITE, 0, b"small")], now=0.0)
    s.feed([(1, F.MODIFY, 0, b"big")], now=4.9)  # still being written at the cut
    changes, _ = s.take(5.0)
    assert changes.paths == {b"/", b"/small"} and changes.busy == {b"/big"}
    s.feed([(1, F.CLOSE_WRITE, 0, b"big")], now=6.0)
    changes, _ = s.take(s.due())
    assert changes.paths == {b"/", b"/big"} and not changes.busy
    # written, never closed, then left alone for `quiet`: published as it stands
    s.feed([(1, F.MODIFY, 0, b"log")], now=10.0)
    assert s.due() == 11.0
    changes, _ = s.take(11.0)
    assert b"/log" in changes.paths
    # a file the publisher found changing comes back busy
    s.requeue([b"/log"], now=20.0)
    changes, _ = s.take(20.5)
    assert changes.busy == {b"/log"} and not changes
    assert b"/log" in s.take(21.0)[0].paths


def test_renames_pair_by_cookie_and_carry_what_is_pending():
    s = state()
    s.feed([(3, F.MODIFY, 0, b"f"), (3, F.CLOSE_WRITE, 0, b"f"),   # /d/e/f changed
            (1, F.MOVED_FROM | D, 7, b"d"), (1, F.MOVED_TO | D, 7, b"x"),   # then /d -> /x
            (1, F.MOVED_FROM, 8, b"a"), (2, F.MOVED_TO, 8, b"a")], now=0.0)  # and /a -> /x/a
    changes, _ = s.take(2.0)
    assert changes.moves == [(b"/d", b"/x"), (b"/a", b"/x/a")]
    assert {b"/x/e/f", b"/x/e", b"/d", b"/x", b"/a", b"/x/a", b"/"} <= changes.paths
    assert not any(p.startswith(b"/d/") for p in changes.paths)
    assert s.wds == {1: b"/", 2: b"/x", 3: b"/x/e"}  # the watches follow the directory
    # an event from the moved directory's watch has the new name
    s.feed([(3, F.CREATE, 0, b"g"), (3, F.CLOSE_WRITE, 0, b"g")], now=3.0)
    assert b"/x/e/g" in s.take(4.0)[0].paths


def test_unpaired_moves_are_deletions_and_arrivals():
    s = state()
    s.feed([(1, F.MOVED_FROM | D, 9, b"d")], now=0.0)  # moved out of the tree
    changes, actions = s.take(0.2)  # its MOVED_TO may still come: wait
    assert b"/d" in changes.busy and not actions
    changes, actions = s.take(1.0)
    assert b"/d" in changes.paths and not changes.moves
    assert sorted(actions) == [(UNWATCH, 2), (UNWATCH, 3)] and s.wds == {1: b"/"}
    actions = s.feed([(1, F.MOVED_TO | D, 10, b"in"), (1, F.MOVED_TO, 11, b"file")], now=2.0)
    assert actions == [(WATCH, b"/in")]
    changes, _ = s.take(3.0)
    assert changes.subtrees == {b"/in"} and {b"/file", b"/"} <= changes.paths


def test_new_directories_are_watched_and_rescanned_overflow_rescans_all():
    s = state()
    assert s.feed([(2, F.CREATE | D, 0, b"new")], now=0.0) == [(WATCH, b"/d/new")]
    changes, _ = s.take(1.0)
    assert changes.subtrees == {b"/d/new"} and changes.paths == {b"/d"}
    actions = s.feed([(-1, F.Q_OVERFLOW, 0, b"")], now=2.0)
    assert actions[0][0] == LOG and "overflowed" in actions[0][1] and actions[1] == (WATCH, b"/")
    assert s.take(3.0)[0].subtrees == {b"/"}
    assert s.feed([(1, F.DELETE_SELF, 0, b"")], now=4.0)[0][0] == FATAL
    s.feed([(2, F.IGNORED, 0, b"")], now=4.0)
    assert 2 not in s.wds and b"/d" not in s.dirs


def test_a_failed_watch_is_polled_and_logged_once():
    s = state()
    actions = s.watch_failed(b"/d/e", 28, now=0.0)  # ENOSPC
    assert actions[0][0] == LOG and "max_user_watches" in actions[0][1]
    assert s.watch_failed(b"/big", 28, now=0.0) == []
    changes, _ = s.take(1.0)
    assert changes.subtrees == {b"/d/e", b"/big"}
    assert s.due() == 5.0  # polled every max_delay
    changes, actions = s.take(5.0)
    assert changes.subtrees == {b"/d/e", b"/big"} and (WATCH, b"/big") in actions
    s.watched(9, b"/big")
    s.watched(10, b"/d/e")
    assert s.due() is None


def test_ignored_paths_and_the_ignore_file():
    s = state(rules=Rules(["*.tmp", "node_modules/"]))
    assert s.feed([(1, F.CREATE, 0, b"x.tmp"), (1, F.CREATE | D, 0, b"node_modules")],
                  now=0.0) == []
    assert s.due() is None
    assert s.feed([(1, F.CLOSE_WRITE, 0, b".p2pfsignore")], now=1.0) == [(RELOAD, None)]
    assert s.set_rules(Rules(["*.tmp", "node_modules/"]), now=1.0) == []
    actions = s.set_rules(Rules(["*.tmp"]), now=1.0)
    assert actions[-1] == (WATCH, b"/") and s.take(2.0)[0].subtrees == {b"/"}


# ------------------------------------------------------------------ real inotify


async def churn_and_publish(src, store, key, rnd, rounds: int, ops: int) -> int:
    """Random operations on `src` while a real Watcher feeds a Publisher;
    after each round, publish until nothing is pending and compare."""
    versions = 0
    watcher = Watcher(src, quiet=0.05, max_delay=0.3)
    drive = Drive(store, key)
    publisher = Publisher(drive, src)
    try:
        watcher.watch_tree()
        async with trio.open_nursery() as nursery:
            await nursery.start(watcher.run)
            for _ in range(rounds):
                for _ in range(ops):
                    op = (rnd.choice(["write", "append", "delete", "mkdir", "rename", "chmod",
                                      "symlink", "move-in"]),
                          [rnd.choice(NAMES) for _ in range(rnd.randint(1, 3))],
                          [rnd.choice(NAMES) for _ in range(rnd.randint(1, 3))],
                          rnd.randrange(0, 3 * 4096))
                    apply(src, op, rnd)
                    if rnd.random() < 0.2:
                        await trio.sleep(0)  # let some events in between
                while True:
                    with trio.move_on_after(1.0):
                        changes = await watcher.next_batch()
                        with store.writer_lock(key):
                            result = publisher.publish(changes)
                        watcher.requeue(result.retry)
                        versions += result.published
                        continue
                    break  # nothing due for a second: everything is published
                assert listing(store, key) == on_disk(src)
            nursery.cancel_scope.cancel()
    finally:
        watcher.close()
    return versions


@pytest.mark.parametrize("seed", range(4))
async def test_the_watched_tree_publishes_exactly_the_directory(tmp_path, seed):
    src = tmp_path / "src"
    for d in ("a", "b", "d/a"):
        (src / d).mkdir(parents=True)
    for name in ("a/a", "a/b", "b/c", "c", "d/a/b"):
        (src / name).write_bytes(os.urandom(5000))
    with Store(tmp_path / "home") as store:
        key = create_drive(store, src, block_size=4096).key
        versions = await churn_and_publish(src, store, key, random.Random(seed), rounds=4, ops=40)
        assert versions >= 4
        assert verify_drive(Drive(store, key)) == []


async def test_a_new_tree_made_faster_than_watches_are_added(tmp_path):
    """`mkdir -p a/b/c && echo x > a/b/c/f` and a tree moved in from outside:
    the rescan of each new directory finds what came before its watch."""
    src = tmp_path / "src"
    src.mkdir()
    with Store(tmp_path / "home") as store:
        key = create_drive(store, src, block_size=4096).key
        watcher = Watcher(src, quiet=0.05, max_delay=0.3)
        publisher = Publisher(Drive(store, key), src)
        try:
            watcher.watch_tree()
            async with trio.open_nursery() as nursery:
                await nursery.start(watcher.run)
                os.makedirs(src / "a" / "b" / "c")
                (src / "a" / "b" / "c" / "f").write_text("x")
                outside = tmp_path / "outside"
                os.makedirs(outside / "deep" / "er")
                (outside / "deep" / "er" / "g").write_text("g")
                os.rename(outside, src / "moved-in")
                while listing(store, key) != on_disk(src):
                    changes = await watcher.next_batch()
                    with store.writer_lock(key):
                        publisher.publish(changes)
                (src / "moved-in" / "deep" / "er" / "h").write_text("watched")
                shutil.rmtree(src / "a")
                while listing(store, key) != on_disk(src):
                    changes = await watcher.next_batch()
                    with store.writer_lock(key):
                        publisher.publish(changes)
                assert set(watcher.state.dirs) == {b"/", b"/moved-in", b"/moved-in/deep",
                                                   b"/moved-in/deep/er"}
                nursery.cancel_scope.cancel()
        finally:
            watcher.close()
