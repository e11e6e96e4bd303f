"""`RadixCache`: the radix prefix cache over token ids and KV page ids (driver-side, pure Python).

Keys are whole pages of `page_size` tokens: a node holds a page-aligned run of token ids and the page ids
that store their KV, and children are keyed by their first page of tokens (as SGLang's RadixCache does with
page_size > 1). Under pipeline parallelism the driver makes every match/insert/evict decision here once and
each stage applies the resulting page ids to its own pool.

Hybrid models (Gated-DeltaNet linear attention next to full attention) also need the recurrent state at the
point where a reused prefix ends. With `hybrid=True` a node may carry a `state_slot`: a snapshot of the
linear-attention state after exactly the tokens from the root to the end of that node, and a match only ends
at such a node (the root, with the zero state, always qualifies), as SGLang's MambaRadixCache does.

Ownership: pages and state slots passed to `insert` belong to the cache from then on (except the duplicates
it reports); `evict`, `evict_state_slots` and `reset` hand ids back for the caller to free. Nodes locked by
running requests (`lock`, which also locks every ancestor) are never evicted. Recency is a logical clock, so
eviction order is deterministic."""

from __future__ import annotations

import heapq
import itertools
from typing import NamedTuple


class RadixNode:
    __slots__ = ("children", "id", "key", "last_access", "lock_ref", "pages", "parent", "state_slot")

    def __init__(self, key: tuple[int, ...], pages: list[int], parent: RadixNode | None, last_access: int,
                 node_id: int):
        self.key, self.pages, self.parent = key, pages, parent
        self.children: dict[tuple[int, ...], RadixNode] = {}
        self.lock_ref = 0
        self.last_access = last_access
        self.state_slot: int | None = None
        self.id = node_id

    def __repr__(self) -> str:
        return (f"RadixNode(id={self.id}, tokens={len(self.key)}, pages={self.pages}, lock_ref={self.lock_ref}, "
                f"state_slot={self.state_slot})")


class MatchResult(NamedTuple):
    page_ids: list[int]  # KV pages of the matched prefix, in token order
    matched_len: int  # tokens matched: len(page_ids) * page_size
    node: RadixNode  # where the match ends (lock it while the request uses the pages); the root when nothing matched


class InsertResult(NamedTuple):
    cached_pages: int  # leading pages of the insert that the tree already held: the caller's pages at those
    #                    positions are not taken (free those that are not the tree's own, see `insert`)
    state_slot_kept: bool  # whether the given state_slot now belongs to the cache (else the caller frees it)
    node: RadixNode  # the node ending exactly at the inserted tokens
    held_pages: int  # leading pages of the insert the cache holds from now on (all of them here)


class RadixCache:
    keeps_prefixes = True  # (the do-nothing `NaiveCache` keeps none)

    def __init__(self, page_size: int, hybrid: bool = False):
        if page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {page_size}")
        self.page_size, self.hybrid = page_size, hybrid
        self._node_ids = itertools.count()
        self.reset()

    # --- state -----------------------------------------------------------------------------------------------

    def reset(self) -> tuple[list[int], list[int]]:
        """Empty the tree; returns (page_ids, state_slots) it held, for the caller to free.
        Refused while any node is locked."""
        root = getattr(self, "root", None)
        if root is not None and self._protected_pages:
            raise RuntimeError(f"reset of a radix cache with {self._protected_pages} locked pages")
        pages, slots = [], []
        stack = list(root.children.values()) if root is not None else []
        while stack:
            node = stack.pop()
            pages.extend(node.pages)
            if node.state_slot is not None:
                slots.append(node.state_slot)
            stack.extend(node.children.values())
        self.root = RadixNode((), [], None, 0, next(self._node_ids))
        self._clock = 0
        self._total_pages = 0
        self._protected_pages = 0
        self._num_state_slots = 0
        return pages, slots

    @property
    def total_cached_pages(self) -> int:
        return self._total_pages

    @property
    def protected_pages(self) -> int:
        """Pages in nodes locked by running requests."""
        return self._protected_pages

    @property
    def evictable_pages(self) -> int:
        return self._total_pages - self._protected_pages

    @property
    def num_state_slots(self) -> int:
        """State snapshot slots the cache holds."""
        return self._num_state_slots

    # --- lookup and insertion --------------------------------------------------------------------------------

    def match_prefix(self, token_ids) -> MatchResult:
        """The longest cached page-aligned prefix of `token_ids` (with `hybrid`, the longest whose end carries a
        state snapshot). A caller that must compute at least one token (for its logits) passes all but the last
        prompt token."""
        ps = self.page_size
        key = tuple(token_ids[:len(token_ids) // ps * ps])
        node, pos, pages = self.root, 0, []
        best, best_len, best_pages = self.root, 0, 0
        while pos < len(key):
            child = node.children.get(key[pos:pos + ps])
            if child is None:
                break
            k = self._common_pages(child.key, key, pos)
            if k < len(child.pages):
                if self.hybrid:
                    break  # a match ending inside a node has no state snapshot there
                child = self._split(child, k)
            node, pos = child, pos + k * ps
            pages.extend(child.pages)
            if not self.hybrid or child.state_slot is not None:
                best, best_len, best_pages = child, pos, len(pages)
        self._touch(best)
        return MatchResult(pages[:best_pages], best_len, best)

    def cached_len(self, token_ids) -> int:
        """Tokens of the longest cached page-aligned prefix of `token_ids`, wherever the state snapshots are (for a
        hybrid tree, where a request's tokens leave the cached KV; `match_prefix` may end earlier). Changes
        nothing: no split, no recency."""
        ps = self.page_size
        key = tuple(token_ids[:len(token_ids) // ps * ps])
        node, pos = self.root, 0
        while pos < len(key):
            child = node.children.get(key[pos:pos + ps])
            if child is None:
                break
            k = self._common_pages(child.key, key, pos)
            pos += k * ps
            if k < len(child.pages):
                break
            node = child
        return pos

    def insert(self, token_ids, page_ids, state_slot: int | None = None) -> InsertResult:
        """Cache `token_ids` (a whole number of pages) stored in `page_ids` (one per page). Positions the tree
        already holds keep the tree's pages: `cached_pages` says how many leading pages that is. A request whose
        own prefix came from `match_prefix` (its first m pages are the tree's) frees
        page_ids[m:cached_pages] as duplicates. With `hybrid`, `state_slot` is a snapshot of the linear-attention
        state after exactly these tokens; it is kept unless that prefix already has one."""
        ps = self.page_size
        if len(token_ids) % ps:
            raise ValueError(f"insert of {len(token_ids)} tokens: not a multiple of page_size {ps}")
        if len(page_ids) != len(token_ids) // ps:
            raise ValueError(f"insert of {len(token_ids)} tokens needs {len(token_ids) // ps} pages, "
                             f"got {len(page_ids)}")
        if state_slot is not None and not self.hybrid:
            raise ValueError("state_slot given to a radix cache built without hybrid=True")
        if state_slot is not None and not token_ids:
            raise ValueError("a state snapshot of the empty prefix is the zero state; it is not cached")
        key = tuple(token_ids)
        self._clock += 1
        node, pos, cached = self.root, 0, 0
        while pos < len(key):
            child = node.children.get(key[pos:pos + ps])
            if child is None:
                leaf = RadixNode(key[pos:], list(page_ids[pos // ps:]), node, self._clock, next(self._node_ids))
                node.children[leaf.key[:ps]] = leaf
                self._total_pages += len(leaf.pages)
                node, pos = leaf, len(key)
                break
            k = self._common_pages(child.key, key, pos)
            if k < len(child.pages):
                child = self._split(child, k)
            node, pos, cached = child, pos + k * ps, cached + k
        kept = False
        if state_slot is not None and node.state_slot is None:
            node.state_slot = state_slot
            self._num_state_slots += 1
            kept = True
        self._touch(node)
        return InsertResult(cached, kept, node, len(key) // ps)

    # --- reference counts ------------------------------------------------------------------------------------

    def lock(self, node: RadixNode) -> None:
        """Protect `node` and its ancestors from eviction (one count per call)."""
        while node is not self.root:
            if node.lock_ref == 0:
                self._protected_pages += len(node.pages)
            node.lock_ref += 1
            node = node.parent

    def unlock(self, node: RadixNode) -> None:
        if node is not self.root and node.lock_ref <= 0:
            raise RuntimeError(f"unlock of an unlocked node {node!r}")
        while node is not self.root:
            node.lock_ref -= 1
            if node.lock_ref == 0:
                self._protected_pages -= len(node.pages)
            node = node.parent

    def unlocked_pages_on_path(self, node: RadixNode) -> int:
        """Pages from `node` up to the root that no lock protects (locking `node` takes them off the
        evictable pages)."""
        count = 0
        while node is not self.root:
            if node.lock_ref == 0:
                count += len(node.pages)
            node = node.parent
        return count

    # --- eviction --------------------------------------------------------------------------------------------

    def evict(self, num_pages: int) -> tuple[list[int], list[int]]:
        """Drop unlocked leaves, least recently used first, until at least `num_pages` pages are freed or none is
        left to drop. Returns (freed page ids, freed state slots)."""
        heap = [(n.last_access, n.id, n) for n in self._nodes() if not n.children and n.lock_ref == 0]
        heapq.heapify(heap)
        freed_pages, freed_slots = [], []
        while len(freed_pages) < num_pages and heap:
            _, _, leaf = heapq.heappop(heap)
            parent = leaf.parent
            self._remove_leaf(leaf, freed_pages, freed_slots)
            if parent is not self.root and not parent.children and parent.lock_ref == 0:
                heapq.heappush(heap, (parent.last_access, parent.id, parent))
        return freed_pages, freed_slots

    def evict_state_slots(self, num_slots: int) -> tuple[list[int], list[int]]:
        """Hybrid: drop state snapshots of unlocked nodes, least recently used first, until `num_slots` are freed
        or none is left. A leaf left without a snapshot can no longer end a match, so it is dropped too (and so
        are ancestors that become such leaves). A node and its ancestors used in the same access are equally
        recent; the older node (the ancestor) goes first. Returns (freed page ids, freed state slots)."""
        heap = [(n.last_access, n.id, n) for n in self._nodes() if n.state_slot is not None and n.lock_ref == 0]
        heapq.heapify(heap)
        freed_pages, freed_slots = [], []
        while len(freed_slots) < num_slots and heap:
            _, _, node = heapq.heappop(heap)
            if node.parent is None or node.state_slot is None:
                continue  # already dropped with a descendant's cascade
            freed_slots.append(node.state_slot)
            node.state_slot = None
            self._num_state_slots -= 1
            while node is not self.root and not node.children and node.state_slot is None and node.lock_ref == 0:
                parent = node.parent
                self._remove_leaf(node, freed_pages, freed_slots)
                node = parent
        return freed_pages, freed_slots

    # --- internals -------------------------------------------------------------------------------------------

    def _nodes(self):
        stack = list(self.root.children.values())
        while stack:
            node = stack.pop()
            yield node
            stack.extend(node.children.values())

    def _common_pages(self, node_key: tuple[int, ...], key: tuple[int, ...], pos: int) -> int:
        """Whole pages at the start of node_key equal to key[pos:]."""
        ps = self.page_size
        limit = min(len(node_key), len(key) - pos) // ps
        k = 0
        while k < limit and node_key[k * ps:(k + 1) * ps] == key[pos + k * ps:pos + (k + 1) * ps]:
            k += 1
        return k

    def _split(self, child: RadixNode, k: int) -> RadixNode:
        """Cut `child` after its first k pages; returns the new upper node. The upper node inherits the lock count
        (every lock of child passed through it) and recency; the snapshot stays at the child's end."""
        ps = self.page_size
        upper = RadixNode(child.key[:k * ps], child.pages[:k], child.parent, child.last_access, next(self._node_ids))
        upper.lock_ref = child.lock_ref
        child.parent.children[upper.key[:ps]] = upper
        child.key, child.pages, child.parent = child.key[k * ps:], child.pages[k:], upper
        upper.children[child.key[:ps]] = child
        return upper

    def _touch(self, node: RadixNode) -> None:
        """Mark node and its ancestors used now, so an ancestor is never older than its descendants."""
        self._clock += 1
        while node is not None:
            node.last_access = self._clock
            node = node.parent

    def _remove_leaf(self, leaf: RadixNode, freed_pages: list[int], freed_slots: list[int]) -> None:
        del leaf.parent.children[leaf.key[:self.page_size]]
        leaf.parent = None
        self._total_pages -= len(leaf.pages)
        freed_pages.extend(leaf.pages)
        if leaf.state_slot is not None:
            freed_slots.append(leaf.state_slot)
            leaf.state_slot = None
            self._num_state_slots -= 1
