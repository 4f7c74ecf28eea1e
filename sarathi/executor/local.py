"""Runs the model in this process (CPU or CUDA): plan -> flattened tensors -> forward -> sample."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import torch

from sarathi.executor.base import Executor
from sarathi.model import kernels
from sarathi.model.attention import AttentionMetadata, PrefillChunk, configure_sdpa
from sarathi.model.sampler import prompt_logprobs, sample
from sarathi.scheduler.plan import ModelOutput, PromptLogprobSpec, SampledToken, SeqPlan, StepPlan

if TYPE_CHECKING:
    from sarathi.config import EngineArgs
    from sarathi.model.config import ModelConfig


class LocalExecutor(Executor):
    """Holds the model and the paged KV tensors ([num_blocks, block_size, kv_heads, head_dim] per
    layer for K and for V).

    The LM head runs on the sampled rows and, for the sequences whose plan asks for prompt logprobs
    (``SeqPlan.prompt_logprobs``), on those prompt rows too; other sequences pay nothing for them.
    """

    name = "local"
    supports_prompt_logprobs = True  # the engine refuses prompt_logprobs with executors lacking this
    # Grammar masks arrive in the plan (SamplingSpec.token_bitmask) and are applied by ``sample``.
    supports_structured_outputs = True

    def __init__(self, args: EngineArgs, model_config: ModelConfig) -> None:
        from sarathi.model.loader import load_model, resolve_model

        super().__init__(args, model_config)
        self.device = args.torch_device()
        configure_sdpa(self.device)
        self.dtype = args.torch_dtype(model_config.torch_dtype)
        self.model = load_model(resolve_model(args.model), model_config, self.dtype, self.device,
                                args.resolved_max_model_len(model_config))
        self.kv_caches: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.block_size = args.block_size
        self.generator = torch.Generator(device=self.device).manual_seed(args.seed)
        if self.device.type == "cpu":
            kernels.start_build()  # in the background: steps use the torch path until it is ready

    def kv_bytes_per_block(self, block_size: int) -> int:
        cfg = self.model_config
        elem = torch.tensor([], dtype=self.dtype).element_size()
        return 2 * cfg.num_hidden_layers * block_size * cfg.num_key_value_heads * cfg.head_dim * elem

    def init_kv_cache(self, num_blocks: int, block_size: int) -> None:
        cfg = self.model_config
        self.kv_caches = []  # drop the old tensors before allocating new ones
        self.block_size = block_size
        shape = (num_blocks, block_size, cfg.num_key_value_heads, cfg.head_dim)
        self.kv_caches = [
            (torch.zeros(shape, dtype=self.dtype, device=self.device),
             torch.zeros(shape, dtype=self.dtype, device=self.device))
            for _ in range(cfg.num_hidden_layers)
        ]

    def reseed(self, seed: int) -> None:
        self.generator = torch.Generator(device=self.device).manual_seed(seed)

    @torch.inference_mode()
    def execute(self, plan: StepPlan) -> ModelOutput:
        t0 = time.perf_counter()
        # Single-query entries first (batched decode attention), then multi-token prompt chunks.
        seqs = sorted(plan.seqs, key=lambda s: s.num_tokens > 1)
        input_ids, positions, slots, sample_rows, samplers = self._flatten(seqs)
        prompt_rows, prompt_seqs = self._prompt_logprob_rows(seqs)
        meta = self._metadata(seqs, slots)
        dev = self.device
        logits = self.model(
            _long(input_ids, dev), _long(positions, dev), meta, self.kv_caches,
            _long(sample_rows + prompt_rows, dev),
        )
        out = self._output(plan.step_id, logits, samplers, prompt_seqs)
        out.execute_time = time.perf_counter() - t0
        return out

    def _output(self, step_id: int, logits: torch.Tensor, samplers: list[SeqPlan],
                prompt_seqs: list[SeqPlan]) -> ModelOutput:
        """The step's output from the logits of its sampled rows, then its prompt-logprob rows."""
        out = ModelOutput(step_id)
        ns = len(samplers)
        if prompt_seqs:  # before sampling, which edits its own rows (bias, bans) in place
            specs: list[PromptLogprobSpec] = [s.prompt_logprobs for s in prompt_seqs]  # type: ignore[misc]
            out.prompt_logprobs = dict(zip((s.req_id for s in prompt_seqs),
                                           prompt_logprobs(logits[ns:], specs)))
        if samplers:
            res = sample(logits[:ns], [s.sample for s in samplers], self.generator)  # type: ignore[misc]
            out.sampled = {s.req_id: SampledToken(t, lp)
                           for s, t, lp in zip(samplers, res.token_ids, res.logprobs)}
        return out

    def _flatten(self, seqs: list[SeqPlan]) -> tuple[list[int], list[int], list[int], list[int],
                                                       list[SeqPlan]]:
        bs = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        sample_rows: list[int] = []
        samplers: list[SeqPlan] = []
        for s in seqs:
            start, end, table = s.start, s.start + s.num_tokens, s.block_table
            input_ids.extend(s.token_ids)
            positions.extend(range(start, end))
            slots.extend(table[p // bs] * bs + p % bs for p in range(start, end))
            if s.sample is not None:  # the chunk reaches the last known token: sample the next one
                sample_rows.append(len(input_ids) - 1)
                samplers.append(s)
        return input_ids, positions, slots, sample_rows, samplers

    @staticmethod
    def _prompt_logprob_rows(seqs: list[SeqPlan]) -> tuple[list[int], list[SeqPlan]]:
        """Flattened row indices (in ``_flatten``'s order) of the prompt rows whose logits the plans ask
        for, in order, and the sequences they belong to."""
        rows: list[int] = []
        owners: list[SeqPlan] = []
        offset = 0
        for s in seqs:
            spec = s.prompt_logprobs
            if spec is not None:
                base = offset + spec.first - s.start
                assert s.start <= spec.first and spec.first + len(spec.targets) <= s.start + s.num_tokens
                rows.extend(range(base, base + len(spec.targets)))
                owners.append(s)
            offset += s.num_tokens
        return rows, owners

    def _metadata(self, seqs: list[SeqPlan], slots: list[int]) -> AttentionMetadata:
        bs, dev = self.block_size, self.device
        decodes = [s for s in seqs if s.num_tokens == 1]
        tables = seq_lens = None
        max_len = 0
        if decodes:
            lens = [s.start + 1 for s in decodes]
            max_len = max(lens)
            width = -(-max_len // bs)
            if dev.type == "cuda":  # whole blocks: a key length that is a multiple of the block size keeps
                max_len = width * bs  # the padding mask aligned for CUDA's fused SDPA kernels
            tables = _long([s.block_table[:width] + [0] * (width - len(s.block_table[:width]))
                            for s in decodes], dev)
            seq_lens = _long(lens, dev)
        prefills = []
        q_start = len(decodes)
        for s in seqs[len(decodes):]:
            kv_len = s.start + s.num_tokens
            table = _long(s.block_table[: -(-kv_len // bs)], dev)
            start = _contiguous_start(s.block_table, kv_len, bs)
            prefills.append(PrefillChunk(q_start, s.num_tokens, kv_len, table, start_slot=start))
            q_start += s.num_tokens
        kernel = kernels.decode_attention() if dev.type == "cpu" and decodes else None
        chunk_kernel = kernels.prefill_attention(self.dtype) if dev.type == "cpu" and prefills else None
        ops = kernels.fused_ops(self.dtype) if dev.type == "cpu" else None
        return AttentionMetadata(_long(slots, dev), len(decodes), tables, seq_lens, max_len, prefills,
                                 decode_kernel=kernel, prefill_kernel=chunk_kernel, layer_ops=ops)


def _long(values: list, device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.long, device=device)


def _contiguous_start(block_ids: list[int], num_tokens: int, block_size: int) -> int | None:
    """First KV slot if the blocks holding ``num_tokens`` tokens are one ascending run, else None."""
    n = -(-num_tokens // block_size)
    first = block_ids[0]
    if block_ids[n - 1] - first == n - 1 and block_ids[:n] == list(range(first, first + n)):
        return first * block_size
    return None
