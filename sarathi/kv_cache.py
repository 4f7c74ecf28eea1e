"""Paged KV-cache bookkeeping: fixed-size blocks, per-request block tables. Pure Python (no torch).

The tensors live in the executor; this only decides which block ids each request owns.
"""

from __future__ import annotations

from sarathi.request import Request


class BlockManager:
    """Free-list allocator. Invariant: every block is either free or owned by exactly one request."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_kv_blocks must be >= 1, got {num_blocks}")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free = list(range(num_blocks - 1, -1, -1))  # pop() hands out low ids first
        self._is_free = [True] * num_blocks

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        return 1.0 - len(self._free) / self.num_blocks

    def blocks_needed(self, req: Request, num_new_tokens: int) -> int:
        """Extra blocks ``req`` needs to hold its computed tokens plus ``num_new_tokens`` more."""
        total = req.num_computed_tokens + num_new_tokens
        return max(0, -(-total // self.block_size) - len(req.block_ids))

    def can_allocate(self, req: Request, num_new_tokens: int) -> bool:
        return self.blocks_needed(req, num_new_tokens) <= len(self._free)

    def max_new_tokens(self, req: Request) -> int:
        """How many new tokens of ``req`` fit in its own blocks plus all free blocks."""
        slots = (len(req.block_ids) + len(self._free)) * self.block_size
        return max(0, slots - req.num_computed_tokens)

    def allocate(self, req: Request, num_new_tokens: int) -> None:
        need = self.blocks_needed(req, num_new_tokens)
        if need > len(self._free):
            raise RuntimeError(f"KV cache: {need} blocks needed, {len(self._free)} free")
        for _ in range(need):
            b = self._free.pop()
            self._is_free[b] = False
            req.block_ids.append(b)

    def free(self, req: Request) -> None:
        for b in req.block_ids:
            if self._is_free[b]:
                raise RuntimeError(f"KV cache: block {b} freed twice (request {req.request_id})")
            self._is_free[b] = True
            self._free.append(b)
        req.block_ids = []
