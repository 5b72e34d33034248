"""Merkle tree: hashing formulas, builder, proofs and verification vs the slow reference."""

from __future__ import annotations

import pytest
from blake3 import blake3
from hypothesis import HealthCheck, given, settings, strategies as st

from p2pfs import flat, tree
from p2pfs.errors import VerificationError
from p2pfs.types import Node

SIZES = [1, 2, 3, 4, 5, 7, 8, 9, 15, 16, 17, 31, 32, 33, 63, 64, 65, 70]


def blocks_of(n: int, size: int = 3) -> list[bytes]:
    return [bytes([i % 256, i // 256]) * size + b"x" * (i % 5) for i in range(n)]


def build(blocks):
    """(builder, {index: node}) for the whole log."""
    b = tree.TreeBuilder()
    nodes = {}
    for data in blocks:
        for node in b.append(data):
            nodes[node.index] = node
    return b, nodes


def proof_nodes(nodes, length):
    """The nodes a holder of the first `length` blocks has (those inside that tree)."""
    return {i: n for i, n in nodes.items() if flat.in_tree(i, length)}


# --- formulas, byte by byte ------------------------------------------------

def test_leaf_formula():
    data = b"hello"
    assert tree.leaf_node(3, data) == Node(6, blake3(b"\x00" + (5).to_bytes(8, "little") + data).digest(), 5)
    assert tree.leaf_node(0, b"") == Node(0, blake3(b"\x00" + bytes(8)).digest(), 0)


def test_parent_formula():
    a, b = tree.leaf_node(0, b"ab"), tree.leaf_node(1, b"cde")
    p = tree.parent_node(a, b)
    assert p == Node(1, blake3(b"\x01" + (5).to_bytes(8, "little") + a.hash + b.hash).digest(), 5)
    with pytest.raises(ValueError):
        tree.parent_node(b, a)
    with pytest.raises(ValueError):
        tree.parent_node(a, tree.leaf_node(2, b""))


def test_root_formula():
    peaks = [Node(3, b"a" * 32, 10), Node(8, b"b" * 32, 7)]
    want = blake3(b"\x02" + b"a" * 32 + (3).to_bytes(8, "little") + (10).to_bytes(8, "little")
                  + b"b" * 32 + (8).to_bytes(8, "little") + (7).to_bytes(8, "little")).digest()
    assert tree.root_hash(peaks) == want
    assert tree.root_hash([]) == blake3(b"\x02").digest() == tree.slow_root([])


def test_domain_tags_separate_leaf_and_parent():
    # A leaf whose data looks like a parent's input must not collide with that parent.
    a, b = tree.leaf_node(0, b"x"), tree.leaf_node(1, b"y")
    p = tree.parent_node(a, b)
    fake = tree.leaf_node(0, (2).to_bytes(8, "little") + a.hash + b.hash)
    assert fake.hash != p.hash


# --- builder ---------------------------------------------------------------

@pytest.mark.parametrize("n", [0] + SIZES + [127, 128, 129])
def test_builder_matches_slow_root_for_every_prefix(n):
    blocks = blocks_of(n)
    b = tree.TreeBuilder()
    assert b.root() == tree.slow_root([])
    for i, data in enumerate(blocks):
        new = b.append(data)
        assert new[0] == tree.leaf_node(i, data)
        assert [x.index for x in new] == [2 * i] + [flat.parent(x.index) for x in new[:-1]]
        for node in new:
            assert node == tree.slow_node(blocks, node.index)
        assert b.length == i + 1
        assert [p.index for p in b.peaks] == flat.full_roots(i + 1)
        assert b.root() == tree.slow_root(blocks[: i + 1])


def test_builder_resumes_from_peaks():
    blocks = blocks_of(13)
    full, _ = build(blocks)
    half, _ = build(blocks[:6])
    resumed = tree.TreeBuilder(half.length, list(half.peaks))
    for data in blocks[6:]:
        resumed.append(data)
    assert resumed.root() == full.root()
    with pytest.raises(ValueError):
        tree.TreeBuilder(5, half.peaks)


def test_empty_and_zero_byte_blocks():
    blocks = [b"", b"", b"a", b""]
    b, nodes = build(blocks)
    assert b.root() == tree.slow_root(blocks)
    assert nodes[3].size == 1
    proof = tree.make_proof(3, 4, 2, True, nodes.get)
    assert tree.verify_block(3, b"", proof, 4, b.root(), lambda i: None)
    with pytest.raises(VerificationError):
        tree.verify_block(3, b"\x00", proof, 4, b.root(), lambda i: None)


# --- proofs, exhaustively over small logs ----------------------------------

def all_proofs(blocks, length, trusted):
    """For every block < length: (block, proof, request) against the given trusted dict."""
    _, nodes = build(blocks[:length])
    for block in range(length):
        siblings, peaks = tree.proof_request(block, length, trusted.__contains__)
        yield block, tree.make_proof(block, length, siblings, peaks, nodes.get), (siblings, peaks)


@pytest.mark.parametrize("n", SIZES)
def test_every_proof_verifies_and_matches_slow_reference(n):
    blocks = blocks_of(n + 2)
    for length in range(1, n + 1):
        root = tree.slow_root(blocks[:length])
        for block, proof, (siblings, peaks) in all_proofs(blocks, length, {}):
            assert peaks
            assert proof == tree.slow_proof(blocks, block, length, siblings, peaks)
            new = tree.verify_block(block, blocks[block], proof, length, root, lambda i: None)
            for node in new:
                assert node == tree.slow_node(blocks, node.index)
            # leaf, siblings, parents up to the peak, the other peaks
            assert {x.index for x in new} >= {2 * block, flat.peak_of(block, length)} | set(
                flat.full_roots(length))


@pytest.mark.parametrize("n", [5, 16, 33])
def test_trusted_nodes_make_proofs_shorter(n):
    blocks = blocks_of(n)
    root = tree.slow_root(blocks)
    trusted: dict[int, Node] = {}
    full = []
    for block, proof, _ in all_proofs(blocks, n, {}):
        full.append(len(proof))
    _, nodes = build(blocks)
    for block in range(n):
        siblings, peaks = tree.proof_request(block, n, trusted.__contains__)
        proof = tree.make_proof(block, n, siblings, peaks, nodes.get)
        assert len(proof) <= full[block]
        if block:
            assert not peaks  # the peaks were verified with block 0
        new = tree.verify_block(block, blocks[block], proof, n, root, trusted.get)
        trusted.update((x.index, x) for x in new)
    assert sum(len(tree.make_proof(b, n, *tree.proof_request(b, n, trusted.__contains__), nodes.get))
               for b in range(n)) == 0


def test_nodes_from_a_shorter_head_stay_trusted():
    blocks = blocks_of(12)
    trusted: dict[int, Node] = {}
    _, nodes = build(blocks)
    for block in range(4):  # verified against length 4
        req = tree.proof_request(block, 4, trusted.__contains__)
        proof = tree.make_proof(block, 4, *req, nodes.get)
        trusted.update((x.index, x) for x in tree.verify_block(block, blocks[block], proof, 4,
                                                               tree.slow_root(blocks[:4]), trusted.get))
    root12 = tree.slow_root(blocks)
    req = tree.proof_request(5, 12, trusted.__contains__)
    assert req == (3, True)  # node 3 is a sibling, not an ancestor of block 5 - still needs peaks
    req = tree.proof_request(2, 12, trusted.__contains__)
    assert req == (0, False)
    assert tree.verify_block(2, blocks[2], [], 12, root12, trusted.get) == []


def test_extra_siblings_are_accepted_when_consistent():
    blocks = blocks_of(8)
    _, nodes = build(blocks)
    root = tree.slow_root(blocks)
    full = tree.make_proof(1, 8, 3, True, nodes.get)
    trusted = {1: nodes[1]}
    new = tree.verify_block(1, blocks[1], full, 8, root, trusted.get)
    assert 1 not in {x.index for x in new}


# --- tampering -------------------------------------------------------------

def tamper_cases(proof):
    """Every single-field change of every proof node, plus reorderings and truncations."""
    for i, node in enumerate(proof):
        yield f"hash {i}", proof[:i] + [node._replace(hash=bytes([node.hash[0] ^ 1]) + node.hash[1:])] + proof[i + 1:]
        yield f"size {i}", proof[:i] + [node._replace(size=node.size + 1)] + proof[i + 1:]
        if node.size:
            yield f"size- {i}", proof[:i] + [node._replace(size=node.size - 1)] + proof[i + 1:]
        for idx in {node.index + 1, node.index + 2, max(node.index - 2, 0), flat.parent(node.index)} - {node.index}:
            yield f"index {i}->{idx}", proof[:i] + [node._replace(index=idx)] + proof[i + 1:]
        yield f"drop {i}", proof[:i] + proof[i + 1:]
    if len(proof) > 1:
        yield "swap", [proof[1], proof[0]] + proof[2:]
    yield "dup", proof + proof[-1:] if proof else [Node(0, bytes(32), 0)]


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8, 11])
def test_any_change_fails(n):
    blocks = blocks_of(n)
    for length in range(1, n + 1):
        root = tree.slow_root(blocks[:length])
        for block, proof, _ in all_proofs(blocks, length, {}):
            data = blocks[block]
            tree.verify_block(block, data, proof, length, root, lambda i: None)
            for what, bad in tamper_cases(proof):
                with pytest.raises(VerificationError, match=f"block {block}"):
                    tree.verify_block(block, data, bad, length, root, lambda i: None)
            bad_data = [data + b"!", data[:-1], bytes([data[0] ^ 0x80]) + data[1:]]
            for d in bad_data:
                with pytest.raises(VerificationError, match=f"block {block}"):
                    tree.verify_block(block, d, proof, length, root, lambda i: None)
            with pytest.raises(VerificationError, match=f"block {block}"):
                tree.verify_block(block, data, proof, length, bytes([root[0] ^ 1]) + root[1:], lambda i: None)
            with pytest.raises(VerificationError, match=f"block {block}"):
                tree.verify_block(block, data, proof, length, root[:31], lambda i: None)
            # the same proof under another length (a different peak layout) must fail
            if length + 1 <= n:
                with pytest.raises(VerificationError, match=f"block {block}"):
                    tree.verify_block(block, data, proof, length + 1,
                                      tree.slow_root(blocks[:length + 1]), lambda i: None)
        with pytest.raises(VerificationError, match=f"block {length}"):
            tree.verify_block(length, b"", [], length, root, lambda i: None)
        with pytest.raises(VerificationError, match="block -1"):
            tree.verify_block(-1, b"", [], length, root, lambda i: None)


def test_wrong_trusted_node_fails():
    blocks = blocks_of(8)
    _, nodes = build(blocks)
    root = tree.slow_root(blocks)
    proof = tree.make_proof(2, 8, 1, False, nodes.get)
    good = {5: nodes[5]}
    tree.verify_block(2, blocks[2], proof, 8, root, good.get)
    for bad in (nodes[5]._replace(hash=bytes(32)), nodes[5]._replace(size=nodes[5].size + 1)):
        with pytest.raises(VerificationError, match="block 2"):
            tree.verify_block(2, blocks[2], proof, 8, root, {5: bad}.get)
    with pytest.raises(VerificationError, match="block 2: proof ends"):
        tree.verify_block(2, blocks[2], proof, 8, root, lambda i: None)


def test_make_proof_lookup_errors():
    blocks = blocks_of(6)
    _, nodes = build(blocks)
    with pytest.raises(LookupError):
        tree.make_proof(6, 6, 0, False, nodes.get)
    with pytest.raises(LookupError):
        tree.make_proof(0, 6, -1, False, nodes.get)
    missing = dict(nodes)
    del missing[2]
    with pytest.raises(LookupError):
        tree.make_proof(0, 6, 1, False, missing.get)
    # siblings are capped at the peak
    assert tree.make_proof(0, 6, 99, False, nodes.get) == tree.make_proof(0, 6, 2, False, nodes.get)


# --- hypothesis --------------------------------------------------------------

block_data = st.one_of(st.just(b""), st.binary(min_size=1, max_size=3), st.binary(min_size=60, max_size=70))
logs = st.lists(block_data, min_size=1, max_size=70)
interesting_lengths = st.sampled_from([1, 2, 3, 4, 5, 7, 8, 9, 15, 16, 17, 31, 32, 33, 63, 64, 65])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(logs, st.data())
def test_random_logs_every_proof_verifies(blocks, data):
    b, nodes = build(blocks)
    assert b.root() == tree.slow_root(blocks)
    length = data.draw(st.integers(1, len(blocks)), label="length")
    root = tree.slow_root(blocks[:length])
    held = proof_nodes(nodes, length)
    # a random trusted set: nodes verified earlier (correct ones, from this tree or a shorter one)
    trusted_ids = data.draw(st.sets(st.sampled_from(sorted(held))), label="trusted")
    trusted = {i: held[i] for i in trusted_ids}
    for block in range(length):
        full = tree.make_proof(block, length, *tree.proof_request(block, length, lambda i: False), held.get)
        siblings, peaks = tree.proof_request(block, length, trusted.__contains__)
        proof = tree.make_proof(block, length, siblings, peaks, held.get)
        assert proof == tree.slow_proof(blocks, block, length, siblings, peaks)
        assert len(proof) <= len(full)
        new = tree.verify_block(block, blocks[block], proof, length, root, trusted.get)
        for node in new:
            assert node == tree.slow_node(blocks, node.index)
            assert node.index not in trusted
        assert tree.verify_block(block, blocks[block], full, length, root, lambda i: None)


@settings(max_examples=40, deadline=None)
@given(interesting_lengths, st.data())
def test_boundary_lengths(length, data):
    blocks = [bytes([i % 7]) * (i % 4) for i in range(length)]
    b, nodes = build(blocks)
    root = b.root()
    assert root == tree.slow_root(blocks)
    block = data.draw(st.integers(0, length - 1))
    proof = tree.make_proof(block, length, *tree.proof_request(block, length, lambda i: False), nodes.get)
    tree.verify_block(block, blocks[block], proof, length, root, lambda i: None)
    for what, bad in tamper_cases(proof):
        with pytest.raises(VerificationError):
            tree.verify_block(block, blocks[block], bad, length, root, lambda i: None)


def node_strategy(max_index=300):
    return st.builds(
        Node,
        st.one_of(st.integers(0, max_index), st.integers(-5, 2**70), st.booleans(), st.none()),
        st.one_of(st.binary(min_size=32, max_size=32), st.binary(max_size=40), st.text(max_size=3), st.none()),
        st.one_of(st.integers(0, 300), st.integers(-5, 2**66), st.just(2**64 - 1), st.none(), st.floats()),
    )


fuzz_proofs = st.one_of(
    st.lists(node_strategy(), max_size=12),
    st.lists(st.one_of(node_strategy(), st.tuples(st.integers()), st.binary(), st.none(), st.integers()), max_size=6),
    st.none(), st.binary(max_size=8), st.integers(), st.text(max_size=4),
)


@settings(max_examples=400, deadline=None)
@given(st.integers(1, 70), st.data())
def test_fuzz_verify_block_only_raises_verification_error(length, data):
    blocks = [bytes([i % 256]) for i in range(length)]
    b, nodes = build(blocks)
    block = data.draw(st.integers(-2, length + 2))
    proof = data.draw(fuzz_proofs)
    if data.draw(st.booleans()) and isinstance(proof, list) and 0 <= block < length:
        # splice random nodes into a real proof
        real = tree.make_proof(block, length, 99, True, nodes.get)
        at = data.draw(st.integers(0, len(real)))
        proof = real[:at] + proof + real[at + data.draw(st.integers(0, 2)):]
    trusted = data.draw(st.sampled_from([{}, proof_nodes(nodes, length)]))
    root = data.draw(st.sampled_from([b.root(), bytes(32), b"short"]))
    d = blocks[block] if 0 <= block < length else b"z"
    try:
        tree.verify_block(block, d, proof, length, root, trusted.get)
    except VerificationError as e:
        assert f"block {block}" in str(e)


@settings(max_examples=200, deadline=None)
@given(logs, st.data())
def test_tampering_fails_with_partial_trusted_sets(blocks, data):
    _, nodes = build(blocks)
    length = data.draw(st.integers(1, len(blocks)), label="length")
    root = tree.slow_root(blocks[:length])
    held = proof_nodes(nodes, length)
    trusted = {i: held[i] for i in data.draw(st.sets(st.sampled_from(sorted(held))), label="trusted")}
    block = data.draw(st.integers(0, length - 1), label="block")
    siblings, peaks = tree.proof_request(block, length, trusted.__contains__)
    proof = tree.make_proof(block, length, siblings, peaks, held.get)
    tree.verify_block(block, blocks[block], proof, length, root, trusted.get)
    for what, bad in tamper_cases(proof):
        with pytest.raises(VerificationError, match=f"block {block}"):
            tree.verify_block(block, blocks[block], bad, length, root, trusted.get)
    if 2 * block not in trusted:
        with pytest.raises(VerificationError, match=f"block {block}"):
            tree.verify_block(block, blocks[block] + b"!", proof, length, root, trusted.get)
    if peaks:
        with pytest.raises(VerificationError, match=f"block {block}"):
            tree.verify_block(block, blocks[block], proof, length, bytes(32), trusted.get)


def test_dangling_node_after_trusted_leaf_fails():
    blocks = blocks_of(4)
    _, nodes = build(blocks)
    root = tree.slow_root(blocks)
    trusted = {2: nodes[2]}
    assert tree.verify_block(1, blocks[1], [], 4, root, trusted.get) == []
    with pytest.raises(VerificationError, match="block 1"):
        tree.verify_block(1, blocks[1], [nodes[9 if 9 in nodes else 5]], 4, root, trusted.get)


def test_malformed_arguments_are_verification_errors():
    blocks = blocks_of(5)
    b, nodes = build(blocks)
    root = b.root()
    proof = tree.make_proof(4, 5, 0, True, nodes.get)
    assert tree.verify_block(4, memoryview(blocks[4]), proof, 5, root, lambda i: None)
    as_lists = [list(x) for x in proof]
    assert tree.verify_block(4, blocks[4], as_lists, 5, root, lambda i: None)
    for args in [
        (4, blocks[4], proof, 2**63, root),
        (4, blocks[4], proof, -1, root),
        (True, blocks[4], proof, 5, root),
        (4, "text", proof, 5, root),
        (4, blocks[4], {"a": 1}, 5, root),
        (4, blocks[4], proof, 5, None),
        (4, blocks[4], [[3, "h", 1]], 5, root),
    ]:
        with pytest.raises(VerificationError):
            tree.verify_block(*args, lambda i: None)


def test_pure_core_imports():
    import ast
    import pathlib

    for mod in ("flat", "tree"):
        src = pathlib.Path(tree.__file__).with_name(f"{mod}.py").read_text()
        names = set()
        for node in ast.walk(ast.parse(src)):
            if isinstance(node, ast.Import):
                names.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                names.add("." * node.level + (node.module or ""))
        allowed = {"__future__", "typing", "blake3", ".", ".errors", ".types"}
        assert names <= allowed, (mod, names - allowed)


@settings(max_examples=100, deadline=None)
@given(logs)
def test_builder_matches_slow_reference_for_random_logs(blocks):
    b = tree.TreeBuilder()
    seen = {}
    for i, data in enumerate(blocks):
        for node in b.append(data):
            assert node.index not in seen
            seen[node.index] = node
        assert b.root() == tree.slow_root(blocks[: i + 1])
    assert all(node == tree.slow_node(blocks, i) for i, node in seen.items())
    assert set(seen) == {i for i in range(2 * len(blocks)) if flat.in_tree(i, len(blocks))}


def test_wrong_sibling_that_we_already_trust_is_named():
    blocks = blocks_of(8)
    _, nodes = build(blocks)
    root = tree.slow_root(blocks)
    proof = tree.make_proof(1, 8, 3, True, nodes.get)
    bad = [proof[0]._replace(hash=bytes(32))] + proof[1:]
    with pytest.raises(VerificationError, match="block 1: proof node 0 does not match the trusted node"):
        tree.verify_block(1, blocks[1], bad, 8, root, {0: nodes[0]}.get)


# --- runs: range proofs ------------------------------------------------------------

def run_case(blocks, start, end, trusted_ids=()):
    """(held nodes, root, trusted dict, plan, proof, claimed leaves) for a run of a log."""
    length = len(blocks)
    _, nodes = build(blocks)
    held = proof_nodes(nodes, length)
    trusted = {i: held[i] for i in trusted_ids}
    plan = tree.range_plan(start, end, length, trusted.__contains__)
    proof = tree.make_range_proof(start, end, length, plan.needed, held.get)
    leaves = [(held[2 * b].hash, held[2 * b].size) for b in range(start, end)]
    return held, tree.slow_root(blocks), trusted, plan, proof, leaves


RUN_LENGTHS = [1, 2, 3, 4, 5, 7, 8, 9, 15, 16, 17, 31, 32, 33, 63, 64, 65]


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8, 9, 16, 17, 33])
def test_every_run_of_small_logs_verifies_untrusted(n):
    blocks = blocks_of(n)
    for start in range(n):
        for end in range(start + 1, n + 1):
            held, root, _, plan, proof, leaves = run_case(blocks, start, end)
            assert plan.needed == tree.slow_range_request(start, end, n, ())
            for with_leaves in (None, leaves):
                result = tree.verify_range(start, blocks[start:end], proof, n, root, lambda i: None, with_leaves)
                assert result.bad == []
                assert all(node == tree.slow_node(blocks, node.index) for node in result.nodes)
                got = {node.index for node in result.nodes}
                assert got >= plan.proven and got >= set(flat.full_roots(n))
                # the run proves what every single block's own proof would
                for b in range(start, end):
                    single = tree.make_proof(b, n, *tree.proof_request(b, n, lambda i: False), held.get)
                    assert {x.index for x in tree.verify_block(b, blocks[b], single, n, root, lambda i: None)} <= got


def test_a_run_needs_fewer_nodes_than_its_blocks_one_by_one():
    blocks = blocks_of(64)
    _, _, _, plan, proof, _ = run_case(blocks, 16, 32)
    one_by_one = sum(len(tree.make_proof(b, 64, 6, True, build(blocks)[1].get)) for b in range(16, 32))
    assert plan.needed == [15, 95]  # node 47 is the run; blocks 0-15 and 32-63 lead to the root
    assert len(proof) == 2 < one_by_one


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(logs, st.data())
def test_random_runs_with_partial_and_growing_trust(blocks, data):
    length = data.draw(st.one_of(st.integers(1, len(blocks)), st.just(len(blocks))), label="length")
    blocks = blocks[:length]
    start = data.draw(st.integers(0, length - 1), label="start")
    end = data.draw(st.one_of(st.integers(start + 1, length), st.just(length),
                              st.sampled_from([start + 1, start + 2])).filter(lambda e: e <= length), label="end")
    _, nodes = build(blocks)
    held = proof_nodes(nodes, length)
    ids = sorted(held)
    trusted_ids = data.draw(st.sets(st.sampled_from(ids)), label="trusted")
    held, root, trusted, plan, proof, leaves = run_case(blocks, start, end, trusted_ids)
    assert plan.needed == tree.slow_range_request(start, end, length, trusted_ids)
    assert not set(plan.needed) & set(trusted_ids)
    result = tree.verify_range(start, blocks[start:end], proof, length, root, trusted.get, leaves)
    assert result.bad == []
    assert all(node == held[node.index] for node in result.nodes)
    assert {node.index for node in result.nodes} | set(trusted_ids) >= plan.proven
    # more nodes became trusted while the request was out: the same proof still verifies
    later = dict(trusted)
    later.update((i, held[i]) for i in data.draw(st.sets(st.sampled_from(ids)), label="later"))
    for with_leaves in (None, leaves):
        again = tree.verify_range(start, blocks[start:end], proof, length, root, later.get, with_leaves)
        assert again.bad == [] and all(node == held[node.index] for node in again.nodes)
    # one damaged block is pinned to itself; the rest of the run verifies
    k = data.draw(st.integers(start, end - 1), label="damaged")
    damaged = list(blocks[start:end])
    damaged[k - start] = bytes([damaged[k - start][0] ^ 1]) + damaged[k - start][1:] if damaged[k - start] else b"!"
    pinned = tree.verify_range(start, damaged, proof, length, root, trusted.get, leaves)
    assert pinned.bad == [k]
    assert {node.index for node in pinned.nodes} == {node.index for node in result.nodes}
    with pytest.raises(VerificationError):  # without the leaves the whole run fails
        tree.verify_range(start, damaged, proof, length, root, trusted.get)


def run_tamper_cases(proof, leaves, length):
    """Every single change of a proof node or claimed leaf, drops, duplicates, extras."""
    for what, bad in tamper_cases(proof):
        if what != "swap":  # range proof nodes carry their index: their order is free
            yield what, bad, leaves
    for i, (digest, size) in enumerate(leaves):
        others = leaves[:i], leaves[i + 1:]
        yield f"leaf hash {i}", proof, [*others[0], (bytes([digest[0] ^ 1]) + digest[1:], size), *others[1]]
        yield f"leaf size {i}", proof, [*others[0], (digest, size + 1), *others[1]]
    yield "leaf dropped", proof, leaves[:-1]
    extra = [i for i in range(2 * length) if flat.in_tree(i, length) and i not in {n.index for n in proof}]
    for i in extra[:3]:
        yield f"extra node {i}", proof + [Node(i, bytes(32), 1)], leaves


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8, 11, 17])
def test_any_change_to_a_run_fails(n):
    blocks = blocks_of(n)
    for start in range(n):
        for end in sorted({start + 1, start + 2, n} - {e for e in range(n + 2) if e > n}):
            held, root, _, plan, proof, leaves = run_case(blocks, start, end)
            name = f"block {start}" if end - start == 1 else f"blocks {start}-{end - 1}"
            for what, bad_proof, bad_leaves in run_tamper_cases(proof, leaves, n):
                with pytest.raises(VerificationError, match=name):
                    tree.verify_range(start, blocks[start:end], bad_proof, n, root, lambda i: None, bad_leaves)
            for wrong_root in (bytes([root[0] ^ 1]) + root[1:], root[:31]):
                with pytest.raises(VerificationError, match=name):
                    tree.verify_range(start, blocks[start:end], proof, n, wrong_root, lambda i: None, leaves)
            for i in range(start, end):  # one changed byte or size of any block, without leaves
                for damaged in (blocks[i] + b"!", blocks[i][:-1], bytes([blocks[i][0] ^ 0x80]) + blocks[i][1:]):
                    run = list(blocks[start:end])
                    run[i - start] = damaged
                    with pytest.raises(VerificationError, match=name):
                        tree.verify_range(start, run, proof, n, root, lambda i: None)
            if end < n:  # the same proof under a longer length
                with pytest.raises(VerificationError):
                    tree.verify_range(start, blocks[start:end], proof, n + 1,
                                      tree.slow_root(blocks_of(n + 1)), lambda i: None, leaves)
            with pytest.raises(VerificationError):  # the run shifted by one
                tree.verify_range(start + 1, blocks[start:end], proof, n + 1,
                                  tree.slow_root(blocks_of(n + 1)), lambda i: None, leaves)


def test_a_wrong_trusted_node_fails_the_run():
    blocks = blocks_of(16)
    held, root, trusted, plan, proof, leaves = run_case(blocks, 4, 8, [11])
    assert plan.needed == []  # node 11 (blocks 4-7) is trusted: it anchors the whole run
    tree.verify_range(4, blocks[4:8], proof, 16, root, trusted.get, leaves)
    for bad in (held[11]._replace(hash=bytes(32)), held[11]._replace(size=held[11].size + 1)):
        with pytest.raises(VerificationError, match="blocks 4-7: tree node 11 does not match"):
            tree.verify_range(4, blocks[4:8], proof, 16, root, {11: bad}.get, leaves)


def test_run_arguments_are_checked():
    blocks = blocks_of(6)
    held, root, _, plan, proof, leaves = run_case(blocks, 2, 5)
    for args in [
        (2, blocks[2:5], proof, 4, root),       # past the length
        (-1, blocks[2:5], proof, 6, root),
        (True, blocks[2:5], proof, 6, root),
        (2, [], proof, 6, root),
        (2, "abc", proof, 6, root),
        (2, blocks[2:5], proof, 2**63, root),
        (2, blocks[2:5], None, 6, root),
        (2, blocks[2:5], proof, 6, None),
        (2, [b"a", 7, b"c"], proof, 6, root),
    ]:
        with pytest.raises(VerificationError):
            tree.verify_range(*args, lambda i: None)
    for bad_leaves in ([(b"short", 3)] * 3, [(bytes(32), -1)] * 3, [None] * 3, leaves[:2], "xyz"):
        with pytest.raises(VerificationError):
            tree.verify_range(2, blocks[2:5], proof, 6, root, lambda i: None, bad_leaves)
    # leaves hashed by the caller (a worker thread) are taken as they are
    hashed = [tree.leaf_node(b, blocks[b]) for b in range(2, 5)]
    assert tree.verify_range(2, hashed, proof, 6, root, lambda i: None, leaves).bad == []
    with pytest.raises(ValueError):
        tree.verify_range(2, hashed[::-1], proof, 6, root, lambda i: None, leaves)
    with pytest.raises(ValueError):
        tree.range_plan(3, 3, 6, lambda i: False)
    with pytest.raises(ValueError):
        tree.range_plan(5, 7, 6, lambda i: False)


def test_make_range_proof_lookup_errors():
    blocks = blocks_of(6)
    _, nodes = build(blocks)
    with pytest.raises(LookupError):
        tree.make_range_proof(2, 7, 6, [], nodes.get)
    with pytest.raises(LookupError):  # node 7 spans blocks 0-7: not covered by length 6
        tree.make_range_proof(0, 2, 6, [7], nodes.get)
    with pytest.raises(LookupError):
        tree.make_range_proof(0, 2, 6, [-1], nodes.get)
    with pytest.raises(LookupError):
        tree.make_range_proof(0, 2, 6, [5], {}.get)
    assert tree.make_range_proof(0, 2, 6, [5, 9], nodes.get) == [nodes[5], nodes[9]]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(logs, st.data())
def test_several_runs_in_one_reply(blocks, data):
    length = len(blocks)
    cuts = sorted(data.draw(st.sets(st.integers(0, length), min_size=2, max_size=8), label="cuts"))
    ranges = [(a, b) for a, b in zip(cuts, cuts[1:]) if data.draw(st.booleans())] or [(cuts[0], cuts[1])]
    ranges = [r for r in ranges if r[0] < r[1]] or [(0, length)]
    _, nodes = build(blocks)
    held = proof_nodes(nodes, length)
    root = tree.slow_root(blocks)
    plans = tree.plan_runs(ranges, length)
    alone = [tree.range_proof_request(a, b, length, lambda i: False) for a, b in ranges]
    assert plans[0] == alone[0] and sum(map(len, plans)) <= sum(map(len, alone))
    runs = [(a, blocks[a:b], [(held[2 * i].hash, held[2 * i].size) for i in range(a, b)],
             tree.make_range_proof(a, b, length, need, held.get)) for (a, b), need in zip(ranges, plans)]
    result = tree.verify_runs(runs, length, root, lambda i: None)
    assert result.bad == [] and all(node == held[node.index] for node in result.nodes)
    # the runs lean on each other: out of order a later run's proof is too short
    if len(runs) > 1 and len(plans[1]) < len(alone[1]):
        with pytest.raises(VerificationError):
            tree.verify_runs(runs[1:], length, root, lambda i: None)


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 40), st.data())
def test_fuzz_verify_range_only_raises_verification_error(length, data):
    blocks = [bytes([i % 256]) for i in range(length)]
    _, nodes = build(blocks)
    start = data.draw(st.integers(-2, length + 1))
    count = data.draw(st.integers(0, 5))
    proof = data.draw(fuzz_proofs)
    if isinstance(proof, list) and 0 <= start < length and data.draw(st.booleans()):
        end = min(length, start + max(count, 1))
        real = tree.make_range_proof(start, end, length, tree.range_proof_request(
            start, end, length, lambda i: False), nodes.get)
        at = data.draw(st.integers(0, len(real)))
        proof = real[:at] + proof + real[at + data.draw(st.integers(0, 2)):]
    run = data.draw(st.one_of(st.just([b"z"] * count), st.lists(st.one_of(st.binary(max_size=3), st.none(),
                                                                            st.integers()), max_size=4)))
    leaves = data.draw(st.one_of(st.none(), st.lists(st.one_of(
        st.tuples(st.binary(min_size=32, max_size=32), st.integers(-1, 3)),
        st.tuples(st.binary(max_size=33)), st.none()), max_size=5)))
    trusted = data.draw(st.sampled_from([{}, proof_nodes(nodes, length)]))
    root = data.draw(st.sampled_from([tree.slow_root(blocks), bytes(32), b"short"]))
    try:
        tree.verify_range(start, run, proof, length, root, trusted.get, leaves)
    except VerificationError:
        pass


def test_run_proof_extras_are_named():
    blocks = blocks_of(8)
    held, root, _, plan, proof, leaves = run_case(blocks, 2, 4)
    assert plan.needed == [1, 11]
    cases = [
        (proof + [held[13]], "proof node 13 is not needed"),          # a true node, not asked for
        (proof + [Node(15, bytes(32), 1)], "proof node 15 is outside the tree of length 8"),
        (proof + [proof[0]], "proof node 1 appears twice"),
        (proof + [held[5]._replace(hash=bytes(32))], "proof node 5 does not match the run's own tree"),
        (proof[1:], "the proof of block 2 ends at tree node 5, which is not trusted"),
    ]
    for bad, message in cases:
        with pytest.raises(VerificationError, match=f"blocks 2-3: {message}"):
            tree.verify_range(2, blocks[2:4], bad, 8, root, lambda i: None, leaves)
