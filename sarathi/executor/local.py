"""Runs the model in this process (CPU or CUDA): batch -> flattened tensors -> forward -> sample."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sarathi.model.attention import AttentionMetadata, PrefillChunk
from sarathi.model.config import ModelConfig
from sarathi.model.llama import LlamaForCausalLM
from sarathi.model.sampler import sample
from sarathi.request import Request
from sarathi.scheduler import ScheduledRequest, SchedulerOutput


@dataclass
class SampledToken:
    request: Request
    token_id: int
    logprobs: tuple[float, int, list[int], list[float]] | None


class LocalExecutor:
    """Holds the model and the paged KV tensors ([num_blocks, block_size, kv_heads, head_dim] per
    layer for K and for V). ``execute`` reads each request's ``num_computed_tokens`` as the start of
    its new tokens; the engine advances the counters afterwards."""

    def __init__(self, model: LlamaForCausalLM, cfg: ModelConfig, num_blocks: int, block_size: int,
                 dtype: torch.dtype, device: torch.device, eos_ids: tuple[int, ...], seed: int) -> None:
        self.model = model
        self.block_size = block_size
        self.device = device
        self.eos_ids = eos_ids
        shape = (num_blocks, block_size, cfg.num_key_value_heads, cfg.head_dim)
        self.kv_caches = [
            (torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
            for _ in range(cfg.num_hidden_layers)
        ]
        self.generator = torch.Generator(device=device).manual_seed(seed)

    @staticmethod
    def kv_bytes_per_block(cfg: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
        elem = torch.tensor([], dtype=dtype).element_size()
        return 2 * cfg.num_hidden_layers * block_size * cfg.num_key_value_heads * cfg.head_dim * elem

    @torch.inference_mode()
    def execute(self, batch: SchedulerOutput) -> list[SampledToken]:
        # Single-query entries first (batched decode attention), then multi-token prompt chunks.
        entries = sorted(batch.scheduled, key=lambda s: s.num_new_tokens > 1)
        input_ids, positions, slots, sample_rows, sample_reqs = self._flatten(entries)
        meta = self._metadata(entries, slots)
        dev = self.device
        logits = self.model(
            _long(input_ids, dev), _long(positions, dev), meta, self.kv_caches, _long(sample_rows, dev),
        )
        if not sample_reqs:
            return []
        out = sample(logits, sample_reqs, self.eos_ids, self.generator)
        return [SampledToken(r, t, lp) for r, t, lp in zip(sample_reqs, out.token_ids, out.logprobs)]

    def _flatten(self, entries: list[ScheduledRequest]) -> tuple[list[int], list[int], list[int],
                                                                  list[int], list[Request]]:
        bs = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        sample_rows: list[int] = []
        sample_reqs: list[Request] = []
        for e in entries:
            req, start = e.request, e.request.num_computed_tokens
            end = start + e.num_new_tokens
            input_ids.extend(req.token_ids[start:end])
            positions.extend(range(start, end))
            table = req.block_ids
            slots.extend(table[p // bs] * bs + p % bs for p in range(start, end))
            if end == req.num_tokens:  # the chunk reaches the last known token: sample the next one
                sample_rows.append(len(input_ids) - 1)
                sample_reqs.append(req)
        return input_ids, positions, slots, sample_rows, sample_reqs

    def _metadata(self, entries: list[ScheduledRequest], slots: list[int]) -> AttentionMetadata:
        bs, dev = self.block_size, self.device
        decodes = [e for e in entries if e.num_new_tokens == 1]
        tables = seq_lens = None
        max_len = 0
        if decodes:
            lens = [e.request.num_computed_tokens + 1 for e in decodes]
            max_len = max(lens)
            width = -(-max_len // bs)
            tables = _long([e.request.block_ids[:width]
                            + [0] * (width - len(e.request.block_ids[:width])) for e in decodes], dev)
            seq_lens = _long(lens, dev)
        prefills = []
        q_start = len(decodes)
        for e in entries[len(decodes):]:
            kv_len = e.request.num_computed_tokens + e.num_new_tokens
            table = _long(e.request.block_ids[: -(-kv_len // bs)], dev)
            start = _contiguous_start(e.request.block_ids, kv_len, bs)
            prefills.append(PrefillChunk(q_start, e.num_new_tokens, kv_len, table, start_slot=start))
            q_start += e.num_new_tokens
        return AttentionMetadata(_long(slots, dev), len(decodes), tables, seq_lens,
                                 max_len, prefills)


def _long(values: list, device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.long, device=device)


def _contiguous_start(block_ids: list[int], num_tokens: int, block_size: int) -> int | None:
    """First KV slot if the blocks holding ``num_tokens`` tokens are one ascending run, else None."""
    n = -(-num_tokens // block_size)
    first = block_ids[0]
    if block_ids[n - 1] - first == n - 1 and block_ids[:n] == list(range(first, first + n)):
        return first * block_size
    return None
