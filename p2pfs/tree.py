"""BLAKE3 Merkle tree over a drive's log: node hashing, roots, proofs.

Theory of operation
-------------------
Nodes are numbered as in `p2pfs.flat` (leaf of block ``i`` is node ``2i``).
Every node is a `Node(index, hash, size)`; ``size`` is the number of log
bytes under it.  Hashes are BLAKE3 (32 bytes) with a one-byte domain tag::

    leaf    H(0x00 || u64le size || data)
    parent  H(0x01 || u64le size || left.hash || right.hash)   size = left.size + right.size
    root    H(0x02 || for each peak, left to right: hash || u64le index || u64le size)

The root of a log of ``length`` blocks hashes its peaks (`flat.full_roots`);
the owner signs ``(length, root)``.  A node that lies inside the tree of
some signed length is a full subtree, so once verified it stays valid for
every later length: append-only logs never change a full subtree.

Proofs.  To check block ``b`` against length ``n`` a receiver needs the
siblings on the path from leaf ``2b`` upwards until it reaches a node it
already trusts, or, if none, up to ``b``'s peak plus every *other* peak of
``n`` (so it can recompute the signed root).  `proof_request` computes how
many siblings and whether peaks are needed; `make_proof` (sender) lists them:
siblings bottom-up, then the other peaks left to right; `verify_block`
(receiver) climbs and returns every node it verified, for the caller to
store.  Sibling indices are always inside the block's peak subtree and peak
indices never are, so the list parses without markers.

`verify_block` is lenient only in one safe way: a proof may carry more
siblings than needed (another response may have made a node trusted since
the request was sent); every trusted node met on the way must still match,
and the climb must end at a trusted node or at the signed root.  The caller
must not forget trusted nodes while a request is outstanding.

Runs.  Wire version 2 sends runs of blocks ``[start, end)`` with one
proof for the whole run.  `range_plan` / `range_proof_request` (requester)
climb from every leaf of the run at once, level by level, and list the
flat-tree indices of the nodes it lacks: siblings the run does not compute
and that are not trusted, and, if a climb reaches its peak untrusted, the
peaks it neither computes nor trusts.  `make_range_proof` (sender) looks
those nodes up; they carry their indices, so their order is free.
`verify_range` (receiver) climbs once with the peer's claimed leaves (one
per block), then hashes each block against its own verified leaf, so one
damaged block is pinned to that block and the rest of the run is kept.
`plan_runs` / `verify_runs` do the same for several runs in one reply,
each run relying on what the earlier ones proved.

Recipes for the drive
---------------------
* Accepting a block from a peer::

      new = verify_block(b, data, proof, head.length, head.root, store.get_node)
      # store the block with `new` in one transaction (Drive.verify_received,
      # Drive.accept_block)

* Serving a request ``(block, length, siblings, peaks)``::

      proof = make_proof(block, length, siblings, peaks, store.get_node)
      # LookupError -> answer no-data

* Checking locally stored blocks (reads, ``cat``, ``p2pfs verify``) is the
  drive's job (`Drive.trusted_node`): it trusts stored nodes top-down from
  a signed root with `parent_node` and caches what it has checked.

This module is pure: it imports only blake3 and p2pfs's pure core.
"""

from __future__ import annotations

from typing import Callable, Iterable, NamedTuple, Sequence

from blake3 import blake3

from . import flat
from .errors import VerificationError
from .types import Node

__all__ = [
    "HASH_BYTES",
    "leaf_node",
    "parent_node",
    "root_hash",
    "TreeBuilder",
    "proof_request",
    "make_proof",
    "verify_block",
    "RangePlan",
    "VerifiedRange",
    "range_plan",
    "range_proof_request",
    "make_range_proof",
    "plan_runs",
    "verify_range",
    "verify_runs",
    "slow_root",
    "slow_node",
    "slow_proof",
    "slow_range_request",
]

HASH_BYTES = 32
MAX_SIZE = (1 << 64) - 1  # sizes are written as u64le
MAX_LENGTH = 1 << 62  # so every node index (< 2 * length) fits in a u64le
LEAF_TAG = b"\x00"
PARENT_TAG = b"\x01"
ROOT_TAG = b"\x02"

GetNode = Callable[[int], "Node | None"]


def _u64(n: int) -> bytes:
    return n.to_bytes(8, "little")


def leaf_node(block: int, data: bytes) -> Node:
    """The leaf of `block`: ``H(0x00 || u64le len(data) || data)``."""
    # One concatenated input, not a prefix then update(data): a 9-byte
    # prefix buffered in the hasher misaligns BLAKE3's 1 KiB chunks and
    # halves its SIMD speed (7.9 vs 13.9 µs per 64 KiB, measured); the
    # copy costs far less.
    size = len(data)
    return Node(2 * block, blake3(LEAF_TAG + size.to_bytes(8, "little") + data).digest(), size)


def parent_node(left: Node, right: Node) -> Node:
    """The parent of two sibling nodes (`left` must be the left one).

    Raises ValueError if the nodes are not left and right siblings or their
    total size does not fit in 64 bits.
    """
    if not (flat.depth(left.index) == flat.depth(right.index)
            and flat.sibling(left.index) == right.index and left.index < right.index):
        raise ValueError(f"nodes {left.index} and {right.index} are not left and right siblings")
    size = left.size + right.size
    if size > MAX_SIZE:
        raise ValueError(f"node {flat.parent(left.index)} would cover more than 2**64 bytes")
    digest = blake3(PARENT_TAG + size.to_bytes(8, "little") + left.hash + right.hash).digest()
    return Node(flat.parent(left.index), digest, size)


def root_hash(peaks: Sequence[Node]) -> bytes:
    """The tree root over `peaks` (left to right): ``H(0x02 || (hash || u64le index || u64le size)*)``."""
    h = blake3(ROOT_TAG)
    for p in peaks:
        h.update(p.hash + _u64(p.index) + _u64(p.size))
    return h.digest()


class TreeBuilder:
    """Appends blocks to a tree and reports every node each append completes.

    ``peaks`` are the peaks of the current ``length`` (as `flat.full_roots`),
    so a builder can be resumed from stored peaks.  `append` costs one leaf
    hash plus, on average, one 72-byte parent hash.
    """

    __slots__ = ("length", "peaks")

    def __init__(self, length: int = 0, peaks: Iterable[Node] = ()):
        peaks = list(peaks)
        if [p.index for p in peaks] != flat.full_roots(length):
            raise ValueError(f"peaks {[p.index for p in peaks]} are not the peaks of length {length}")
        self.length = length
        self.peaks = peaks

    def append(self, data: bytes) -> list[Node]:
        """Add the next block; return its leaf and every parent it completes, bottom-up."""
        block = self.length
        size = len(data)
        node = Node(2 * block, blake3(LEAF_TAG + size.to_bytes(8, "little") + data).digest(), size)
        new = [node]
        peaks = self.peaks
        # Appending block i completes one parent per trailing 1 bit of i.
        merges = ((block + 1) & -(block + 1)).bit_length() - 1
        for _ in range(merges):
            left = peaks.pop()
            size = left.size + node.size
            node = Node(
                (left.index + node.index) >> 1,
                blake3(PARENT_TAG + size.to_bytes(8, "little") + left.hash + node.hash).digest(),
                size,
            )
            new.append(node)
        peaks.append(node)
        self.length = block + 1
        return new

    def root(self) -> bytes:
        """The root hash of the current length (to be signed)."""
        return root_hash(self.peaks)


def _peak_path(block: int, length: int) -> tuple[int, int]:
    """(peak node of block in length, number of levels from leaf to that peak)."""
    peak = flat.peak_of(block, length)
    return peak, flat.depth(peak)


def proof_request(block: int, length: int, is_trusted: Callable[[int], bool]) -> tuple[int, bool]:
    """What to ask a peer for to verify `block` against a signed `length`.

    Walks up from leaf ``2*block``; stops at the first node `is_trusted`
    says we hold verified.  Returns ``(siblings, peaks)``: how many sibling
    hashes are needed, and whether the other peaks of `length` are needed
    (True when no node up to the block's peak is trusted).  Raises
    ValueError if ``not 0 <= block < length``.
    """
    peak, height = _peak_path(block, length)
    n = 2 * block
    for level in range(height + 1):
        if is_trusted(n):
            return level, False
        if level < height:
            n = flat.parent(n)
    return height, True


def make_proof(block: int, length: int, siblings: int, peaks: bool, get_node: GetNode) -> list[Node]:
    """The proof a sender attaches to `block` for a request ``(siblings, peaks)``.

    Siblings bottom-up (at most up to the block's peak in `length`; more
    are silently capped), then, if `peaks`, every other peak of `length`
    left to right.  Raises LookupError if the block is outside `length`,
    `siblings` is negative, or a needed node is not held (the caller
    answers no-data).
    """
    if not (0 <= block < length) or siblings < 0:
        raise LookupError(f"no proof for block {block} of length {length} with {siblings} siblings")
    peak, height = _peak_path(block, length)
    proof = []
    n = 2 * block
    for _ in range(min(siblings, height)):
        node = get_node(flat.sibling(n))
        if node is None:
            raise LookupError(f"tree node {flat.sibling(n)} is not held")
        proof.append(node)
        n = flat.parent(n)
    if peaks:
        for p in flat.full_roots(length):
            if p != peak:
                node = get_node(p)
                if node is None:
                    raise LookupError(f"tree node {p} is not held")
                proof.append(node)
    return proof


def _check_node(what: str, node: object) -> Node:
    """`node` as a well-formed Node, or VerificationError naming `what` (peer input)."""
    if not (isinstance(node, (tuple, list)) and len(node) == 3):
        raise VerificationError(f"{what}: malformed proof node {type(node).__name__}")
    index, digest, size = node
    if type(index) is not int or index < 0:
        raise VerificationError(f"{what}: proof node has a bad index")
    if not isinstance(digest, bytes) or len(digest) != HASH_BYTES:
        raise VerificationError(f"{what}: proof node {index} has a malformed hash")
    if type(size) is not int or not 0 <= size <= MAX_SIZE:
        raise VerificationError(f"{what}: proof node {index} has a bad size")
    return node if type(node) is Node else Node(index, digest, size)


def _parent(what: str, left: Node, right: Node) -> Node:
    size = left.size + right.size
    if size > MAX_SIZE:
        raise VerificationError(f"{what}: node sizes overflow in the proof")
    digest = blake3(PARENT_TAG + size.to_bytes(8, "little") + left.hash + right.hash).digest()
    return Node((left.index + right.index) >> 1, digest, size)


def verify_block(
    block: int,
    data: bytes,
    proof: Sequence[Node],
    length: int,
    root: bytes,
    get_trusted: GetNode,
) -> list[Node]:
    """Verify `data` as `block` of the log whose `length` blocks hash to `root`.

    `proof` comes from a peer (see `make_proof`); `get_trusted(n)` returns a
    node verified earlier, or None.  The leaf is climbed with the proof's
    siblings (each must have the expected index); every trusted node on the
    way must match in hash and size; the climb must end at a trusted node,
    or at the block's peak, in which case the rest of the proof must be
    exactly the other peaks of `length` and their root must equal `root`.

    Returns every node this proved that was not already trusted (leaf,
    siblings, parents, peaks), for the caller to store.  Raises
    VerificationError naming the block on any mismatch or malformed input;
    nothing else, whatever the peer sent.
    """
    if type(length) is not int or not 0 <= length <= MAX_LENGTH:
        raise VerificationError(f"block {block}: length {length} is out of range")
    if type(block) is not int or block < 0:
        raise VerificationError(f"block {block}: not a valid block number")
    if block >= length:
        raise VerificationError(f"block {block} is past the drive's length {length}")
    if not isinstance(proof, (list, tuple)):
        raise VerificationError(f"block {block}: malformed proof")
    if not isinstance(root, bytes) or len(root) != HASH_BYTES:
        raise VerificationError(f"block {block}: malformed root")
    try:
        node = leaf_node(block, data)
    except TypeError:
        raise VerificationError(f"block {block}: data is not bytes") from None
    what = f"block {block}"
    peak, height = _peak_path(block, length)
    new: list[Node] = []
    anchored = False  # the current node matches a trusted node
    i = 0
    level = 0
    while True:
        trusted = get_trusted(node.index)
        if trusted is not None:
            if trusted.hash != node.hash or trusted.size != node.size:
                raise VerificationError(
                    f"block {block}: tree node {node.index} does not match the trusted node"
                    f" (hash or size differs)")
            anchored = True
        else:
            anchored = False
            new.append(node)
        if level == height or i == len(proof):
            break
        sib = _check_node(what, proof[i])
        want = flat.sibling(node.index)
        if sib.index != want:
            break  # the siblings are over; only the other peaks may follow
        i += 1
        _add_unless_trusted(block, sib, get_trusted, new)
        node = _parent(what, node, sib) if want > node.index else _parent(what, sib, node)
        level += 1
    rest = proof[i:]
    if level < height:
        if rest:
            raise VerificationError(
                f"block {block}: proof node {_check_node(what, rest[0]).index}"
                f" is not the expected sibling {flat.sibling(node.index)}")
        if not anchored:
            raise VerificationError(
                f"block {block}: proof ends at tree node {node.index}, which is not trusted")
        return new
    # At the peak.
    if anchored and not rest:
        return new
    others = [p for p in flat.full_roots(length) if p != peak]
    if len(rest) != len(others):
        raise VerificationError(
            f"block {block}: proof has {len(rest)} peaks, length {length} needs {len(others)}")
    peaks = []
    for want, got in zip(others, rest):
        got = _check_node(what, got)
        if got.index != want:
            raise VerificationError(f"block {block}: proof node {got.index} is not the expected peak {want}")
        peaks.append(got)
    all_peaks = sorted(peaks + [node], key=lambda p: p.index)
    if root_hash(all_peaks) != root:
        raise VerificationError(f"block {block}: proof does not match the signed root of length {length}")
    for p in peaks:
        _add_unless_trusted(block, p, get_trusted, new)
    return new


def _add_unless_trusted(block: int, node: Node, get_trusted: GetNode, new: list[Node]) -> None:
    """Append a proof node to `new` unless already trusted (then it must match)."""
    trusted = get_trusted(node.index)
    if trusted is None:
        new.append(node)
    elif trusted.hash != node.hash or trusted.size != node.size:
        raise VerificationError(
            f"block {block}: proof node {node.index} does not match the trusted node (hash or size differs)")


# --- runs: blocks [start, end) verified with one climb ---------------------------

class RangePlan(NamedTuple):
    """What verifying a run takes (`range_plan`)."""

    needed: list[int]   # proof nodes to ask the peer for, ascending
    proven: set[int]    # every node a successful verification will have verified


class VerifiedRange(NamedTuple):
    """The outcome of `verify_range`: every node it verified (leaves, parents,
    proof nodes; some may have been trusted already), and the blocks whose
    data does not hash to their verified leaf (only told apart when the peer
    sent one leaf per block)."""

    nodes: list[Node]
    bad: list[int]


def _run_name(start: int, end: int) -> str:
    return f"block {start}" if end - start == 1 else f"blocks {start}-{end - 1}"


def range_plan(start: int, end: int, length: int, is_trusted: Callable[[int], bool]) -> RangePlan:
    """The proof nodes needed to verify blocks ``[start, end)`` against a signed
    `length`, given what `is_trusted` says we hold verified.

    Climbs from every leaf of the run at once, level by level: a node stops
    at the first trusted one; otherwise its sibling is needed unless the run
    computes it or it is trusted.  If a climb reaches its peak untrusted, the
    signed root is needed, so every peak of `length` the climb did not
    compute and we do not trust is needed too.  Raises ValueError unless
    ``0 <= start < end <= length``."""
    if not (0 <= start < end <= length):
        raise ValueError(f"blocks [{start}, {end}) are not a run inside length {length}")
    peaks = flat.full_roots(length)
    peak_set = set(peaks)
    frontier = list(range(2 * start, 2 * end, 2))
    proven = set(frontier)
    needed: set[int] = set()
    need_root = False
    while frontier:
        here = set(frontier)
        up: list[int] = []
        for n in frontier:
            if is_trusted(n):
                continue
            if n in peak_set:
                need_root = True
                continue
            s = flat.sibling(n)
            if s not in here and not is_trusted(s):
                needed.add(s)
            p = flat.parent(n)
            if not up or up[-1] != p:
                up.append(p)
        proven.update(up)
        frontier = up
    if need_root:
        needed.update(p for p in peaks if p not in proven and not is_trusted(p))
    proven |= needed
    return RangePlan(sorted(needed), proven)


def range_proof_request(start: int, end: int, length: int, is_trusted: Callable[[int], bool]) -> list[int]:
    """The flat-tree indices of the proof nodes to request for blocks
    ``[start, end)`` of `length` (see `range_plan`), ascending."""
    return range_plan(start, end, length, is_trusted).needed


def make_range_proof(start: int, end: int, length: int, nodes: Sequence[int], get_node: GetNode) -> list[Node]:
    """The proof a sender attaches to the run ``[start, end)``: the requested
    `nodes`, in the order asked.  Raises LookupError (the caller answers
    no-data) if the run is not inside `length`, a node lies outside the tree
    of `length` (so it is not covered by that signed root) or is not held."""
    if not (0 <= start < end <= length):
        raise LookupError(f"no run [{start}, {end}) in length {length}")
    proof = []
    for n in nodes:
        if type(n) is not int or n < 0 or not flat.in_tree(n, length):
            raise LookupError(f"tree node {n} is not in the tree of length {length}")
        node = get_node(n)
        if node is None:
            raise LookupError(f"tree node {n} is not held")
        proof.append(node)
    return proof


def plan_runs(ranges: Sequence[tuple[int, int]], length: int,
              is_trusted: Callable[[int], bool] = lambda n: False) -> list[list[int]]:
    """Proof nodes for several runs sent together (an index reply), in order:
    each run's list leaves out what the runs before it prove, as
    `verify_runs` will trust them.  `ranges` are ``(start, end)`` pairs."""
    proven: set[int] = set()
    out = []
    for start, end in ranges:
        plan = range_plan(start, end, length, lambda n: n in proven or is_trusted(n))
        out.append(plan.needed)
        proven |= plan.proven
    return out


def _leaf_of(block: int, data: object, what: str) -> Node:
    """The leaf of a block of the run: hash `data`, or take a caller's Node."""
    if type(data) is Node:
        if data.index != 2 * block:
            raise ValueError(f"leaf {data.index} given for block {block}")
        return data
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise VerificationError(f"{what}: data of block {block} is not bytes")
    return leaf_node(block, data)


def _claimed_leaves(start: int, leaves: Sequence[object], what: str) -> list[Node]:
    """A peer's (hash, size) for each leaf of the run, checked for shape."""
    out = []
    for block, leaf in enumerate(leaves, start):
        if not (type(leaf) is tuple or type(leaf) is list) or len(leaf) != 2:
            raise VerificationError(f"{what}: malformed leaf of block {block}")
        digest, size = leaf
        if type(digest) is not bytes or len(digest) != HASH_BYTES:
            raise VerificationError(f"{what}: leaf of block {block} has a malformed hash")
        if type(size) is not int or not 0 <= size <= MAX_SIZE:
            raise VerificationError(f"{what}: leaf of block {block} has a bad size")
        out.append(Node(2 * block, digest, size))
    return out


def _matches(a: Node, b: Node) -> bool:
    return a.hash == b.hash and a.size == b.size


def verify_range(
    start: int,
    blocks: Sequence[object],
    proof: Sequence[Node],
    length: int,
    root: bytes,
    get_trusted: GetNode,
    leaves: Sequence[tuple[bytes, int]] | None = None,
) -> VerifiedRange:
    """Verify the run of blocks ``start, start+1, ...`` against the signed
    `length` whose root is `root`, climbing the tree once for the whole run.

    `blocks` holds each block's bytes (hashed here) or its leaf `Node`
    (hashed by the caller, say in a worker thread).  With `leaves` (the
    peer's ``(hash, size)`` per block) the climb runs on the claimed leaves,
    and each block is then compared with its own verified leaf: a damaged
    block is named in `bad` while the rest of the run still verifies.
    Without `leaves` the climb runs on the data's own leaves and any damage
    fails the whole run.

    The climb goes up level by level from the leaves, pairing siblings the
    run computes, taking other siblings from `proof` or `get_trusted`.  A
    node that matches a trusted node anchors everything below it; the climb
    stops once a whole level is anchored, no peak reached untrusted waits
    for the root, and every proof node is used (a
    proof asked for before other replies made more nodes trusted still
    climbs as far as it was meant to).  A climb that reaches its peak with
    every other peak at hand (proof or trusted) recomputes the root, which
    must equal `root`.  Every leaf must end up
    under an anchor or a checked root; every proof node must lie in the
    tree of `length`, appear once, match any trusted or computed node of
    its index, and be used on a path that is so anchored.

    Raises VerificationError naming the run on any mismatch or malformed
    input, nothing else whatever the peer sent."""
    count = len(blocks) if isinstance(blocks, (list, tuple)) else 0
    if type(start) is not int or start < 0:
        raise VerificationError(f"block {start}: not a valid block number")
    what = _run_name(start, start + max(count, 1))
    if type(length) is not int or not 0 <= length <= MAX_LENGTH:
        raise VerificationError(f"{what}: length {length} is out of range")
    if not count:
        raise VerificationError(f"{what}: no blocks")
    end = start + count
    if end > length:
        raise VerificationError(f"{what}: past the drive's length {length}")
    if not isinstance(root, bytes) or len(root) != HASH_BYTES:
        raise VerificationError(f"{what}: malformed root")
    if not isinstance(proof, (list, tuple)):
        raise VerificationError(f"{what}: malformed proof")
    if leaves is not None and not (isinstance(leaves, (list, tuple)) and len(leaves) == count):
        raise VerificationError(f"{what}: {count} blocks need {count} leaves")
    actual = [_leaf_of(start + i, b, what) for i, b in enumerate(blocks)]
    climb = actual if leaves is None else _claimed_leaves(start, leaves, what)

    given: dict[int, Node] = {}
    for raw in proof:
        node = _check_node(what, raw)
        if not flat.in_tree(node.index, length):
            raise VerificationError(f"{what}: proof node {node.index} is outside the tree of length {length}")
        if node.index in given:
            raise VerificationError(f"{what}: proof node {node.index} appears twice")
        trusted = get_trusted(node.index)
        if trusted is not None and not _matches(trusted, node):
            raise VerificationError(
                f"{what}: proof node {node.index} does not match the trusted node (hash or size differs)")
        given[node.index] = node

    peaks = flat.full_roots(length)
    peak_set = set(peaks)
    computed: dict[int, Node] = {}
    levels: list[dict[int, Node]] = []  # the climb's nodes, one dict per depth
    checked: dict[int, bool] = {}    # computed node -> matches a trusted node (only those looked up)
    fed: dict[int, int] = {}         # proof node -> the computed parent it went into
    used: set[int] = set()
    open_peak = False  # a peak was reached untrusted: the root is needed
    frontier = {leaf.index: leaf for leaf in climb}
    while frontier:
        # every node of a level has the same depth: sibling and parent by bit flips
        flip, up_bit = 2 << len(levels), 1 << len(levels)
        levels.append(frontier)
        computed.update(frontier)
        anchored = True  # every node here matches a trusted node
        for n, node in frontier.items():
            if given:
                extra = given.get(n)
                if extra is not None:
                    if not _matches(extra, node):
                        raise VerificationError(f"{what}: proof node {n} does not match the run's own tree")
                    used.add(n)
            if n ^ flip in frontier:
                anchored = False  # a pair: its parent is checked instead
                continue
            trusted = get_trusted(n)
            if trusted is not None and not _matches(trusted, node):
                raise VerificationError(
                    f"{what}: tree node {n} does not match the trusted node (hash or size differs)")
            checked[n] = trusted is not None
            anchored = anchored and trusted is not None
            open_peak = open_peak or (trusted is None and n in peak_set)
        if anchored and not open_peak and len(used) == len(given):
            break  # everything below is anchored and nothing is left to learn
        up: dict[int, Node] = {}
        for n, node in frontier.items():
            s = n ^ flip
            sib = frontier.get(s)
            if sib is not None:
                if s < n:
                    continue  # combined at the left one
            elif n in peak_set:
                continue
            else:
                sib = given.get(s)
                if sib is not None:
                    used.add(s)
                    fed[s] = (n & ~flip) | up_bit
                else:
                    sib = get_trusted(s)
                    if sib is None:
                        continue  # this climb ends here
            left, right = (node, sib) if n < s else (sib, node)
            size = left.size + right.size
            if size > MAX_SIZE:
                raise VerificationError(f"{what}: node sizes overflow in the proof")
            p = (n & ~flip) | up_bit
            up[p] = Node(p, blake3(PARENT_TAG + size.to_bytes(8, "little") + left.hash + right.hash).digest(), size)
        frontier = up

    root_ok = False
    if any(p in computed for p in peaks):
        all_peaks = []
        for p in peaks:
            node = computed.get(p) or given.get(p) or get_trusted(p)
            if node is None:
                break
            all_peaks.append(node)
        else:
            if root_hash(all_peaks) != root:
                raise VerificationError(f"{what}: proof does not match the signed root of length {length}")
            root_ok = True
            used.update(p for p in peaks if p in given)

    # Top-down: a node is verified under a verified parent, as a checked peak,
    # or when it matches a trusted node (looked up only where still needed).
    verified: set[int] = set()
    for depth in range(len(levels) - 1, -1, -1):
        flip, up_bit = 2 << depth, 1 << depth
        for n, node in levels[depth].items():
            if (n & ~flip) | up_bit in verified or (root_ok and n in peak_set):
                verified.add(n)
                continue
            ok = checked.get(n)
            if ok is None:
                trusted = get_trusted(n)
                if trusted is not None and not _matches(trusted, node):
                    raise VerificationError(
                        f"{what}: tree node {n} does not match the trusted node (hash or size differs)")
                ok = trusted is not None
            if ok:
                verified.add(n)
    for leaf in climb:
        if leaf.index not in verified:
            top = leaf.index
            while flat.parent(top) in computed:
                top = flat.parent(top)
            raise VerificationError(
                f"{what}: the proof of block {leaf.index // 2} ends at tree node {top}, which is not trusted")
    for i in given:
        if i not in used:
            raise VerificationError(f"{what}: proof node {i} is not needed")
        if not (i in verified or fed.get(i) in verified or (root_ok and i in peak_set)):
            raise VerificationError(f"{what}: proof node {i} leads to no trusted node or signed root")
    nodes = [computed[n] for n in verified]
    nodes += [node for i, node in given.items() if i not in computed]
    nodes.sort()
    bad = []
    if leaves is not None:
        bad = [start + i for i, (a, c) in enumerate(zip(actual, climb)) if a.hash != c.hash or a.size != c.size]
    return VerifiedRange(nodes, bad)


def verify_runs(runs: Iterable[tuple[int, Sequence[object], Sequence[tuple[bytes, int]] | None, Sequence[Node]]],
                length: int, root: bytes, get_trusted: GetNode) -> VerifiedRange:
    """`verify_range` for several runs of one version sent together, in order
    (``(start, blocks, leaves, proof)`` each): each run may rely on the nodes
    the runs before it verified (as `plan_runs` leaves them out).  Returns
    every node verified and every bad block of all runs."""
    found: dict[int, Node] = {}

    def trusted(n: int) -> Node | None:
        node = found.get(n)
        return node if node is not None else get_trusted(n)

    bad: list[int] = []
    for start, blocks, leaves, proof in runs:
        result = verify_range(start, blocks, proof, length, root, trusted, leaves)
        for node in result.nodes:
            found[node.index] = node
        bad += result.bad
    return VerifiedRange(sorted(found.values()), bad)


# --- slow reference, for tests only ------------------------------------------
# Written from the definitions, without flat.py, so the two can check each other.

def _slow_hash_range(blocks: Sequence[bytes], first: int, count: int) -> tuple[bytes, int]:
    if count == 1:
        data = blocks[first]
        return blake3(b"\x00" + len(data).to_bytes(8, "little") + data).digest(), len(data)
    half = count // 2
    lh, ls = _slow_hash_range(blocks, first, half)
    rh, rs = _slow_hash_range(blocks, first + half, half)
    return blake3(b"\x01" + (ls + rs).to_bytes(8, "little") + lh + rh).digest(), ls + rs


def _slow_peaks(length: int) -> list[tuple[int, int]]:
    """(first block, block count) of each peak, by repeated largest power of two."""
    out, first = [], 0
    while length:
        count = 1
        while count * 2 <= length:
            count *= 2
        out.append((first, count))
        first += count
        length -= count
    return out


def _slow_index(first: int, count: int) -> int:
    return 2 * first + count - 1  # midpoint of leaf nodes 2*first .. 2*(first+count-1)


def slow_node(blocks: Sequence[bytes], index: int) -> Node:
    """The node `index` of the tree over `blocks`, by recursion (tests only)."""
    count = 1
    while index & count:
        count <<= 1
    # count = 2**depth; index = 2*first + count - 1
    first = (index - count + 1) // 2
    if first + count > len(blocks):
        raise ValueError(f"node {index} is not in a tree of {len(blocks)} blocks")
    h, s = _slow_hash_range(blocks, first, count)
    return Node(index, h, s)


def slow_root(blocks: Sequence[bytes]) -> bytes:
    """The root of the tree over `blocks`, by recursion (tests only)."""
    parts = [b"\x02"]
    for first, count in _slow_peaks(len(blocks)):
        h, s = _slow_hash_range(blocks, first, count)
        parts.append(h + _slow_index(first, count).to_bytes(8, "little") + s.to_bytes(8, "little"))
    return blake3(b"".join(parts)).digest()


def slow_proof(blocks: Sequence[bytes], block: int, length: int, siblings: int, peaks: bool) -> list[Node]:
    """`make_proof` computed from the blocks by recursion (tests only)."""
    for first, count in _slow_peaks(length):
        if first <= block < first + count:
            break
    else:
        raise ValueError("block outside length")
    proof = []
    lo, size = first, count
    # path from the peak down to the block, then reverse: siblings bottom-up
    path = []
    while size > 1:
        half = size // 2
        if block < lo + half:
            path.append((lo + half, half))
        else:
            path.append((lo, half))
            lo += half
        size = half
    sibs = list(reversed(path))[:siblings]
    for f, c in sibs:
        h, s = _slow_hash_range(blocks, f, c)
        proof.append(Node(_slow_index(f, c), h, s))
    if peaks:
        for f, c in _slow_peaks(length):
            if (f, c) != (first, count):
                h, s = _slow_hash_range(blocks, f, c)
                proof.append(Node(_slow_index(f, c), h, s))
    return proof


def slow_range_request(start: int, end: int, length: int, trusted: Iterable[int]) -> list[int]:
    """`range_proof_request` block by block, with spans instead of flat.py (tests only):
    each block walks up to its first trusted node or its peak; the siblings of
    the untrusted nodes walked, and (if a walk reached its peak) the peaks,
    are needed unless walked or trusted."""
    trusted = set(trusted)
    peaks = _slow_peaks(length)
    walked: set[int] = set()
    siblings: set[int] = set()
    root = False
    for block in range(start, end):
        first, count = next((f, c) for f, c in peaks if f <= block < f + c)
        lo, size = block, 1
        while True:
            walked.add(_slow_index(lo, size))
            if _slow_index(lo, size) in trusted:
                break
            if size == count:
                root = True
                break
            if (lo - first) // size % 2 == 0:  # a left child
                siblings.add(_slow_index(lo + size, size))
            else:
                siblings.add(_slow_index(lo - size, size))
                lo -= size
            size *= 2
    needed = {s for s in siblings if s not in walked and s not in trusted}
    if root:
        needed |= {_slow_index(f, c) for f, c in peaks} - walked - trusted
    return sorted(needed)
