"""The approximate prefix tree (control/prefix.py)."""
from kvrouter.control.prefix import PrefixTree


def test_match_insert_remove():
    t = PrefixTree()
    assert t.match([1, 2, 3]) == (0, None)
    t.insert([1, 2, 3], 0)
    t.insert([1, 2, 9, 9], 1)
    assert t.match([1, 2, 3, 4]) == (3, 0)
    assert t.match([1, 2, 9]) == (3, 1)
    assert t.match([1, 2]) == (2, 1)           # both hold it: the most recent
    assert t.matched_by([1, 2, 3]) == {0: 3, 1: 2}
    assert t.sizes == {0: 3, 1: 4}
    t.remove(1)
    assert t.match([1, 2, 9]) == (2, 0) and t.sizes == {0: 3}
    t.remove(0)
    assert t.match([1]) == (0, None) and t.root.children == {}


def test_eviction_keeps_each_replica_under_its_cap_least_recent_first():
    t = PrefixTree()
    t.insert([1, 2, 3], 0)        # old
    t.insert([7, 8, 9], 0)        # newer
    t.insert([1, 2, 3, 4], 1)     # another replica's, untouched
    t.evict(4)
    assert t.sizes[0] == 4
    assert t.match([7, 8, 9]) == (3, 0)       # the recent conversation stays whole
    assert t.matched_by([1, 2, 3]).get(0) == 1  # the old one lost its tail first
    assert t.match([1, 2, 3, 4]) == (4, 1) and t.sizes[1] == 4
    t.evict(0)
    assert t.sizes == {0: 0, 1: 0} and t.root.children == {}
