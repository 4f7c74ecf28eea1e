"""Paged KV-cache bookkeeping: fixed-size blocks, per-request block tables. Pure Python (no torch).

The tensors live in the executor; this only decides which block ids each request owns.
"""

from __future__ import annotations

from sarathi.request import Request


class BlockManager:
    """Block allocator. Invariant: every block is either free or owned by exactly one request.

    It prefers to give a request the block right after its last one, and starts a new request in the
    middle of the largest free gap (leaving room for the request before the gap to keep growing).
    Requests therefore usually own one contiguous run of blocks, which lets attention read their K/V
    as a view instead of gathering blocks (a copy) every layer; any block layout stays correct.
    """

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_kv_blocks must be >= 1, got {num_blocks}")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._is_free = bytearray(b"\x01") * num_blocks
        self._num_free = num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self._num_free

    @property
    def usage(self) -> float:
        return 1.0 - self._num_free / self.num_blocks

    def blocks_needed(self, req: Request, num_new_tokens: int) -> int:
        """Extra blocks ``req`` needs to hold its computed tokens plus ``num_new_tokens`` more."""
        total = req.num_computed_tokens + num_new_tokens
        return max(0, -(-total // self.block_size) - len(req.block_ids))

    def can_allocate(self, req: Request, num_new_tokens: int) -> bool:
        return self.blocks_needed(req, num_new_tokens) <= self._num_free

    def max_new_tokens(self, req: Request) -> int:
        """How many new tokens of ``req`` fit in its own blocks plus all free blocks."""
        slots = (len(req.block_ids) + self._num_free) * self.block_size
        return max(0, slots - req.num_computed_tokens)

    def allocate(self, req: Request, num_new_tokens: int) -> None:
        need = self.blocks_needed(req, num_new_tokens)
        if need > self._num_free:
            raise RuntimeError(f"KV cache: {need} blocks needed, {self._num_free} free")
        last = req.block_ids[-1] if req.block_ids else -2
        for _ in range(need):
            b = last + 1 if 0 <= last + 1 < self.num_blocks and self._is_free[last + 1] else self._fresh()
            self._is_free[b] = 0
            self._num_free -= 1
            req.block_ids.append(b)
            last = b

    def _fresh(self) -> int:
        """A free block to start a new run: the middle of the largest free gap (its start when the gap
        begins the cache, since no request before it needs room to grow)."""
        best_start, best_len, pos = 0, 0, 0
        for run in bytes(self._is_free).split(b"\x00"):
            if len(run) > best_len:
                best_start, best_len = pos, len(run)
            pos += len(run) + 1
        return best_start if best_start == 0 else best_start + best_len // 2

    def free(self, req: Request) -> None:
        for b in req.block_ids:
            if self._is_free[b]:
                raise RuntimeError(f"KV cache: block {b} freed twice (request {req.request_id})")
            self._is_free[b] = 1
            self._num_free += 1
        req.block_ids = []
