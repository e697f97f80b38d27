"""An approximate prefix tree over prompt blocks, one tenant per replica: which replica has
most likely kept a prompt's prefix in its KV cache, because it was sent the longest run of
the same leading blocks (the cache-aware routing of SGLang's gateway and vLLM's router,
over block hashes instead of characters).

Pure: no clock (recency is an insert counter), no I/O. Eviction is explicit (``evict``),
run by its caller off the request path.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple


class _Node:
    __slots__ = ("children", "tenants", "parent", "block")

    def __init__(self, parent: Optional["_Node"], block: int):
        self.children: Dict[int, _Node] = {}
        self.tenants: Dict[int, int] = {}   # replica -> insert counter when last sent here
        self.parent = parent
        self.block = block


class PrefixTree:
    def __init__(self) -> None:
        self.root = _Node(None, 0)
        self.tick = 0
        self.sizes: Dict[int, int] = {}     # replica -> blocks it holds in the tree

    def match(self, blocks: Sequence[int]) -> Tuple[int, Optional[int]]:
        """(leading blocks matched, the replica that holds them; the most recent one on a
        tie), or (0, None)."""
        node, depth, best = self.root, 0, None
        for block in blocks:
            child = node.children.get(block)
            if child is None or not child.tenants:
                break
            node, depth = child, depth + 1
            best = max(child.tenants, key=lambda r: (child.tenants[r], -r))
        return (depth, best) if best is not None else (0, None)

    def matched_by(self, blocks: Sequence[int]) -> Dict[int, int]:
        """Leading blocks matched, per replica that holds any of them."""
        out: Dict[int, int] = {}
        node = self.root
        for depth, block in enumerate(blocks, 1):
            node = node.children.get(block)   # type: ignore[assignment]
            if node is None:
                break
            for replica in node.tenants:
                out[replica] = depth
        return out

    def insert(self, blocks: Sequence[int], replica: int) -> None:
        self.tick += 1
        node = self.root
        for block in blocks:
            child = node.children.get(block)
            if child is None:
                child = node.children[block] = _Node(node, block)
            if replica not in child.tenants:
                self.sizes[replica] = self.sizes.get(replica, 0) + 1
            child.tenants[replica] = self.tick
            node = child

    def remove(self, replica: int) -> None:
        """Forget everything ``replica`` held (it was removed, or its cache was lost)."""
        self._drop(self.root, lambda n: replica in n.tenants, replica)
        self.sizes.pop(replica, None)

    def evict(self, max_blocks_per_replica: int) -> None:
        """Keep each replica at most ``max_blocks_per_replica`` blocks: its least recently
        sent leaves go first (a leaf's ancestors were sent at least as recently)."""
        for replica, size in list(self.sizes.items()):
            over = wanted = size - max_blocks_per_replica
            if over <= 0:
                continue
            leaves: List[_Node] = []
            self._leaves_of(self.root, replica, leaves)
            leaves.sort(key=lambda n: n.tenants[replica])
            while over > 0 and leaves:
                leaf = leaves.pop(0)
                del leaf.tenants[replica]
                over -= 1
                parent = leaf.parent
                if not leaf.tenants and not leaf.children and parent is not None:
                    del parent.children[leaf.block]
                if parent is not None and parent is not self.root and \
                        replica in parent.tenants and \
                        not any(replica in c.tenants for c in parent.children.values()):
                    leaves.append(parent)
                    leaves.sort(key=lambda n: n.tenants[replica])
            self.sizes[replica] = size - (wanted - over)

    def _leaves_of(self, node: _Node, replica: int, out: List[_Node]) -> None:
        for child in node.children.values():
            if replica not in child.tenants:
                continue
            if any(replica in c.tenants for c in child.children.values()):
                self._leaves_of(child, replica, out)
            else:
                out.append(child)

    def _drop(self, node: _Node, held, replica: int) -> None:
        for block, child in list(node.children.items()):
            if held(child):
                self._drop(child, held, replica)
                del child.tenants[replica]
                if not child.tenants and not child.children:
                    del node.children[block]
