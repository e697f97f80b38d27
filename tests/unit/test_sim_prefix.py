"""The simulated engine's prefix cache (sim/prefix_cache.py): whole blocks, chained, LRU
within the KV pool, never the last token, and what vLLM reports of it."""
from kvrouter.sim.prefix_cache import PrefixCache, block_hashes


def words(n, start=0):
    return " ".join(f"w{i}" for i in range(start, start + n))


def test_whole_leading_blocks_are_hits_and_never_the_last_token():
    c = PrefixCache(block=16, capacity_blocks=100)
    prompt = words(40)                                 # 2 whole blocks and 8 tokens
    assert c.lookup(prompt) == 0
    c.insert(prompt, 100)
    assert c.lookup(prompt) == 32                      # the 8-token tail is never a block
    assert c.lookup(words(40) + " more words here") == 32
    assert c.lookup(words(20)) == 16                   # one leading block in common
    assert c.lookup(words(40, start=1)) == 0           # shifted: nothing in common
    exact = words(32)
    c.insert(exact, 100)
    assert c.lookup(exact) == 16                       # all cached: the last token is computed


def test_a_block_is_known_by_everything_before_it():
    a, b = block_hashes(words(16) + " " + words(16, 100), 16), \
        block_hashes(words(16, 50) + " " + words(16, 100), 16)
    assert a[1] != b[1]                                # same second block, other first


def test_least_recently_used_blocks_leave_first_within_the_capacity():
    c = PrefixCache(block=16, capacity_blocks=4)
    old, new = words(32), words(32, 1000)
    c.insert(old, 4)
    c.insert(new, 4)
    assert c.lookup(old) == 16 and c.lookup(new) == 16
    c.lookup(old)                                       # old used again: new is now the LRU
    c.insert(words(32, 2000), 4)
    assert c.lookup(old) == 16 and c.lookup(new) == 0
    c.clear()
    assert c.lookup(old) == 0
