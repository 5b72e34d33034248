"""Flat-tree arithmetic: known values and properties."""

from hypothesis import given, strategies as st

from p2pfs import flat


def test_index_depth_offset_known_values():
    assert [flat.index(0, o) for o in range(4)] == [0, 2, 4, 6]
    assert [flat.index(1, o) for o in range(3)] == [1, 5, 9]
    assert [flat.index(2, o) for o in range(2)] == [3, 11]
    assert flat.index(3, 0) == 7
    assert [flat.depth(n) for n in range(8)] == [0, 1, 0, 2, 0, 1, 0, 3]
    assert [flat.offset(n) for n in range(8)] == [0, 0, 1, 0, 2, 1, 3, 0]


def test_parent_sibling_children_known_values():
    assert [flat.parent(n) for n in (0, 2, 1, 5, 4, 6, 3, 11)] == [1, 1, 3, 3, 5, 5, 7, 7]
    assert [flat.sibling(n) for n in (0, 2, 1, 5, 3, 11, 8)] == [2, 0, 5, 1, 11, 3, 10]
    assert flat.children(0) is None
    assert flat.children(6) is None
    assert flat.children(1) == (0, 2)
    assert flat.children(3) == (1, 5)
    assert flat.children(7) == (3, 11)
    assert flat.children(9) == (8, 10)


def test_spans_known_values():
    assert (flat.left_span(3), flat.right_span(3)) == (0, 6)
    assert (flat.left_span(9), flat.right_span(9)) == (8, 10)
    assert flat.span(0) == (0, 1)
    assert flat.span(6) == (3, 4)
    assert flat.span(3) == (0, 4)
    assert flat.span(11) == (4, 8)
    assert flat.span(7) == (0, 8)


def test_full_roots_known_values():
    assert flat.full_roots(0) == []
    assert flat.full_roots(1) == [0]
    assert flat.full_roots(2) == [1]
    assert flat.full_roots(3) == [1, 4]
    assert flat.full_roots(4) == [3]
    assert flat.full_roots(5) == [3, 8]
    assert flat.full_roots(7) == [3, 9, 12]
    assert flat.full_roots(8) == [7]
    assert flat.full_roots(11) == [7, 17, 20]


def test_peak_of_and_in_tree():
    assert [flat.peak_of(b, 7) for b in range(7)] == [3, 3, 3, 3, 9, 9, 12]
    assert flat.in_tree(3, 4) and not flat.in_tree(3, 3)
    assert flat.in_tree(4, 3) and not flat.in_tree(6, 3)


nodes = st.integers(min_value=0, max_value=2**40)


@given(nodes)
def test_index_roundtrip(n):
    assert flat.index(flat.depth(n), flat.offset(n)) == n


@given(nodes)
def test_parent_children_sibling_agree(n):
    p = flat.parent(n)
    assert flat.depth(p) == flat.depth(n) + 1
    left, right = flat.children(p)
    assert n in (left, right)
    assert flat.sibling(n) == (right if n == left else left)
    assert flat.sibling(flat.sibling(n)) == n
    first, end = flat.span(p)
    assert (first, end) == (flat.span(left)[0], flat.span(right)[1])
    assert flat.left_span(p) == 2 * first and flat.right_span(p) == 2 * (end - 1)
    assert flat.span(n)[0] * 2 == flat.left_span(n)


@given(st.integers(min_value=0, max_value=2**40))
def test_full_roots_tile_the_log(length):
    roots = flat.full_roots(length)
    assert len(roots) == bin(length).count("1")
    pos = 0
    for r in roots:
        first, end = flat.span(r)
        assert first == pos
        pos = end
    assert pos == length
    assert all(flat.in_tree(r, length) for r in roots)
    assert all(not flat.in_tree(flat.parent(r), length) for r in roots)
