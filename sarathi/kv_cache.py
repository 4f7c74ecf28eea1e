"""Paged KV-cache bookkeeping: fixed-size blocks, per-request block tables. Pure Python (no torch).

The tensors live in the executor; this only decides which block ids each request owns, and (with
prefix caching) which full blocks hold which tokens so that a later request with the same prefix
reuses them instead of computing them again.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict

from sarathi.request import Request

# A full block's identity: (parent block id, parent generation, the block's token ids). The parent is
# the block holding the previous block_size tokens ((-1, 0) for the first block), so a key pins the
# whole prefix exactly (dict equality, no hash collisions); the generation changes whenever a block is
# evicted and reused, so a key naming an evicted parent never matches again.
BlockKey = tuple[int, int, tuple[int, ...]]


class BlockManager:
    """Block allocator. Invariant: every block is exactly one of
    - free: in the free runs (``_is_free``), owned by nobody, holding nothing reusable;
    - held: owned by ``_ref[b] >= 1`` requests (more than one only for a shared, cached full block);
    - cached-idle (prefix caching only): owned by nobody but still registered under its key, kept in
      LRU order and evicted (made free) only when a new block is needed and no free one is left.
    ``num_free_blocks`` counts free and cached-idle blocks: both can be handed out.

    It prefers to give a request the block right after its last one, and starts a new request in the
    middle of the largest free gap (leaving room for the request before the gap to keep growing).
    Requests therefore usually own one contiguous run of blocks, which lets attention read their K/V
    as a view instead of gathering blocks (a copy) every layer; any block layout stays correct.

    Free blocks are kept as maximal runs (``_runs``: start -> length, ``_run_end``: end -> start) with a
    lazy max-heap of run lengths, so every operation is O(log n) in the number of runs: a simulated
    GPU holds 10^5..10^6 blocks, where scanning a bitmap per new request dominated the simulation.
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = False) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_kv_blocks must be >= 1, got {num_blocks}")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._is_free = bytearray(b"\x01") * num_blocks
        self._num_free = num_blocks  # blocks in the free runs (not counting cached-idle ones)
        self._runs: dict[int, int] = {}
        self._run_end: dict[int, int] = {}
        self._heap: list[tuple[int, int]] = []  # (-length, start); stale entries are skipped on read
        self._add_run(0, num_blocks)
        self._ref = [0] * num_blocks
        self._gen = [0] * num_blocks
        self._cached: dict[BlockKey, int] = {}  # key -> block
        self._key_of: dict[int, BlockKey] = {}  # block -> key
        self._idle: OrderedDict[int, None] = OrderedDict()  # cached blocks nobody holds, LRU first
        self.num_query_tokens = 0  # prompt tokens looked up in the prefix cache
        self.num_hit_tokens = 0  # ... of which were found there

    @property
    def num_free_blocks(self) -> int:
        return self._num_free + len(self._idle)

    @property
    def num_cached_blocks(self) -> int:
        return len(self._key_of)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    def blocks_needed(self, req: Request, num_new_tokens: int) -> int:
        """Extra blocks ``req`` needs to hold its computed tokens plus ``num_new_tokens`` more."""
        total = req.num_computed_tokens + num_new_tokens
        return max(0, -(-total // self.block_size) - len(req.block_ids))

    def can_allocate(self, req: Request, num_new_tokens: int) -> bool:
        return self.blocks_needed(req, num_new_tokens) <= self.num_free_blocks

    def max_new_tokens(self, req: Request) -> int:
        """How many new tokens of ``req`` fit in its own blocks plus all free blocks."""
        slots = (len(req.block_ids) + self.num_free_blocks) * self.block_size
        return max(0, slots - req.num_computed_tokens)

    def allocate(self, req: Request, num_new_tokens: int) -> None:
        need = self.blocks_needed(req, num_new_tokens)
        if need > self.num_free_blocks:
            raise RuntimeError(f"KV cache: {need} blocks needed, {self.num_free_blocks} free")
        ids = req.block_ids
        while need:
            if not self._num_free:  # only cached-idle blocks left: evict the least recently used
                b = self._evict()
                self._ref[b] = 1
                ids.append(b)
                need -= 1
                continue
            nxt = ids[-1] + 1 if ids else -1
            if 0 <= nxt < self.num_blocks and self._is_free[nxt]:
                start = nxt  # the free run right after the request's last block starts there
            else:
                start, nxt = self._fresh()
            length = self._take_run(start)
            # Take as much of the run as needed from ``nxt`` on; give back what lies on either side.
            if nxt > start:
                self._add_run(start, nxt - start)
            n = min(need, start + length - nxt)
            ids.extend(range(nxt, nxt + n))
            self._is_free[nxt:nxt + n] = bytes(n)
            for b in range(nxt, nxt + n):
                self._ref[b] = 1
            if nxt + n < start + length:
                self._add_run(nxt + n, start + length - nxt - n)
            self._num_free -= n
            need -= n

    def free(self, req: Request) -> None:
        """Drop ``req``'s hold on its blocks: a block nobody holds becomes cached-idle if it is
        registered, else free. Released last block first, so LRU eviction takes a prefix's tail before
        its head (a head evicted first would strand the rest of the chain)."""
        for b in reversed(req.block_ids):
            if self._ref[b] <= 0:
                raise RuntimeError(f"KV cache: block {b} freed twice (request {req.request_id})")
            self._ref[b] -= 1
            if self._ref[b]:
                continue
            if b in self._key_of:
                self._idle[b] = None  # most recently used last
            else:
                self._release(b)
        req.block_ids = []
        req.num_registered_blocks = 0

    # ---- prefix caching -------------------------------------------------------------------------
    def match(self, req: Request) -> list[int]:
        """The cached blocks holding the longest prefix of ``req``'s tokens, as whole blocks, leaving at
        least one token to compute (the model must produce logits to sample from). Takes nothing."""
        if not self.enable_prefix_caching:
            return []
        bs, toks = self.block_size, req.token_ids
        parent: tuple[int, int] = (-1, 0)
        blocks: list[int] = []
        for i in range((len(toks) - 1) // bs):
            b = self._cached.get((*parent, tuple(toks[i * bs:(i + 1) * bs])))
            if b is None:
                break
            blocks.append(b)
            parent = (b, self._gen[b])
        return blocks

    def share(self, req: Request, blocks: list[int]) -> None:
        """Give ``req`` (holding no blocks, nothing computed) the cached ``blocks`` from ``match``: its
        first ``len(blocks) * block_size`` tokens count as computed."""
        assert not req.block_ids and req.num_computed_tokens == 0
        for b in blocks:
            if self._ref[b] == 0:
                del self._idle[b]
            self._ref[b] += 1
        req.block_ids = list(blocks)
        req.num_registered_blocks = len(blocks)
        req.num_computed_tokens = req.num_cached_tokens = len(blocks) * self.block_size

    def idle_blocks_in(self, blocks: list[int]) -> int:
        """How many of ``blocks`` are cached-idle (taking them uses up free capacity)."""
        return sum(1 for b in blocks if self._ref[b] == 0)

    def register(self, req: Request) -> None:
        """Record ``req``'s full blocks whose K/V is written (call only when no plan holding ``req`` is
        in flight: then all of its ``num_computed_tokens`` are in the cache) so later requests can
        share them. A block whose content is already cached under another block stays private."""
        if not self.enable_prefix_caching:
            return
        bs, ids, toks = self.block_size, req.block_ids, req.token_ids
        full = min(req.num_computed_tokens // bs, len(ids))
        for i in range(req.num_registered_blocks, full):
            b = ids[i]
            if b in self._key_of:
                continue  # shared from the cache already
            parent = (-1, 0) if i == 0 else (ids[i - 1], self._gen[ids[i - 1]])
            key = (*parent, tuple(toks[i * bs:(i + 1) * bs]))
            if key not in self._cached:
                self._cached[key] = b
                self._key_of[b] = key
        req.num_registered_blocks = max(req.num_registered_blocks, full)

    def reset_prefix_cache(self) -> None:
        """Forget every cached block (held blocks stay with their requests; idle ones become free)."""
        for b in list(self._idle):
            self._evict_block(b)
        for b in list(self._key_of):
            del self._cached[self._key_of.pop(b)]
            self._gen[b] += 1

    def _evict(self) -> int:
        """The least recently used cached-idle block, forgotten and handed out (not via the runs)."""
        b = next(iter(self._idle))
        self._forget(b)
        return b

    def _evict_block(self, b: int) -> None:
        self._forget(b)
        self._release(b)

    def _forget(self, b: int) -> None:
        del self._idle[b]
        del self._cached[self._key_of.pop(b)]
        self._gen[b] += 1

    # ---- free runs --------------------------------------------------------------------------
    def _release(self, b: int) -> None:
        """Put block ``b`` back into the free runs, merging with its neighbours."""
        self._is_free[b] = 1
        self._num_free += 1
        start, length = b, 1
        left = self._run_end.get(b)  # a free run ending right before b
        if left is not None:
            length += self._take_run(left)
            start = left
        if b + 1 in self._runs:
            length += self._take_run(b + 1)
        self._add_run(start, length)

    def _fresh(self) -> tuple[int, int]:
        """(run start, first block) to start a new run of blocks: the middle of the largest free run
        (its start when the run begins the cache, since no request before it needs room to grow).
        Among equally long runs the lowest one."""
        heap, runs = self._heap, self._runs
        while True:
            neg, start = heap[0]
            if runs.get(start) == -neg:
                break
            heapq.heappop(heap)
        return start, (start if start == 0 else start + (-neg) // 2)

    def _add_run(self, start: int, length: int) -> None:
        self._runs[start] = length
        self._run_end[start + length] = start
        heapq.heappush(self._heap, (-length, start))
        if len(self._heap) > 4 * len(self._runs) + 64:  # drop stale entries: memory stays O(runs)
            self._heap = [(-n, s) for s, n in self._runs.items()]
            heapq.heapify(self._heap)

    def _take_run(self, start: int) -> int:
        length = self._runs.pop(start)
        del self._run_end[start + length]
        return length
