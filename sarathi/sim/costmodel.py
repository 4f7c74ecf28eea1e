"""Step-time cost model: a roofline over a step's FLOPs and bytes, per pipeline stage.

A step is a set of prompt chunks ``(tokens, past)`` and decodes (each attends to ``context`` tokens,
itself included). On one device of a TP x PP layout its time is, per decoder layer:

- **linear**: q/k/v, o, gate/up and down projections as one GEMM each over all T tokens of the step
  (prompt rows and decode rows together: the weights are read once, which is why piggybacked decodes
  are nearly free). Each GEMM takes ``max(FLOPs / (peak x eff), bytes / (bandwidth x eff))`` with M = T
  padded up to the matmul tile, so T = tile + 1 costs a whole extra tile: the staircase.
- **attention**: one kernel per prompt chunk (causal over its own tokens, full over its cached prefix,
  which it re-reads) and one batched kernel for all decodes (each reads its whole KV).
- **other**: norms, RoPE, SiLU, residual adds, KV-cache writes (memory-bound, per token) plus a fixed
  per-layer launch overhead.
- **communication**: two all-reduces of the activations per layer with TP (ring: ``2 (t-1)`` steps);
  one activation send per stage boundary with PP.
Stage 0 also embeds, the last stage runs the LM head on the rows that sample; host-side overheads
(per step, per token, per sequence) are charged once, to stage 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from sarathi.sim.hardware import HardwareSpec, get_hardware

if TYPE_CHECKING:
    from sarathi.model.config import ModelConfig
    from sarathi.scheduler.plan import StepPlan

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass
class StepCost:
    """Seconds per pipeline stage, and the same time split by kind (summed over stages)."""

    stage_s: list[float]
    linear_s: float = 0.0
    attention_s: float = 0.0
    other_s: float = 0.0
    comm_s: float = 0.0
    overhead_s: float = 0.0
    parts: dict[str, float] = field(default_factory=dict)

    @property
    def total_s(self) -> float:
        """Latency of the step through every stage (what one plan takes end to end)."""
        return sum(self.stage_s)


def causal_pairs(n: int, past: int) -> float:
    """(query, key) pairs a chunk of ``n`` tokens behind ``past`` cached tokens attends to."""
    return n * (past + (n + 1) / 2)


class CostModel:
    """Predicts a step's time for one model on one hardware spec with TP x PP devices."""

    def __init__(self, cfg: ModelConfig, hardware: HardwareSpec | str, dtype: str = "float16", tp: int = 1,
                 pp: int = 1) -> None:
        if tp < 1 or pp < 1:
            raise ValueError(f"tensor/pipeline parallel sizes must be >= 1, got {tp} x {pp}")
        if cfg.num_attention_heads % tp:
            raise ValueError(f"tensor_parallel_size {tp} does not divide {cfg.num_attention_heads} heads")
        if pp > cfg.num_hidden_layers:
            raise ValueError(f"pipeline_parallel_size {pp} exceeds {cfg.num_hidden_layers} layers")
        if dtype not in DTYPE_BYTES:
            raise ValueError(f"dtype: cost model knows {sorted(DTYPE_BYTES)}, got {dtype!r}")
        self.cfg, self.hw, self.dtype, self.tp, self.pp = cfg, get_hardware(hardware), dtype, tp, pp
        hw = self.hw
        self.e = DTYPE_BYTES[dtype]
        self.flops = hw.flops(dtype) * hw.matmul_efficiency
        self.attn_flops = hw.flops(dtype) * hw.attention_efficiency
        self.bw = hw.mem_bw * hw.bw_efficiency
        h, hd = cfg.hidden_size, cfg.head_dim
        self.heads = cfg.num_attention_heads // tp
        self.kv_heads = max(1, cfg.num_key_value_heads // tp)  # KV heads are replicated when tp > kv
        inter = -(-cfg.intermediate_size // tp)
        # (K, N) of each GEMM of a layer on one TP shard.
        self.gemms = [(h, (self.heads + 2 * self.kv_heads) * hd), (self.heads * hd, h), (h, 2 * inter),
                      (inter, h)]
        # Elements moved per token per layer by the memory-bound ops (see ``other``).
        self.other_elems = 10 * h + 2 * (self.heads + self.kv_heads) * hd + 3 * inter + 2 * self.kv_heads * hd
        base, extra = divmod(cfg.num_hidden_layers, pp)
        self.stage_layers = [base + (1 if i < extra else 0) for i in range(pp)]
        self.vocab_shard = -(-cfg.vocab_size // tp)
        self._linear: dict[int, float] = {}

    # ---- pieces (seconds, one layer unless said otherwise) ---------------------------------------
    def gemm_s(self, m: int, k: int, n: int) -> float:
        """One GEMM of ``m`` rows: roofline with M padded to the tile (the staircase)."""
        if m <= 0:
            return 0.0
        tile = self.hw.tile
        mp = -(-m // tile) * tile
        return max(2.0 * mp * k * n / self.flops, (k * n + m * k + m * n) * self.e / self.bw)

    def linear_s(self, tokens: int) -> float:
        """All projections of one layer over ``tokens`` rows (cached: the hot path of a simulation)."""
        t = self._linear.get(tokens)
        if t is None:
            t = self.hw.linear_scale * sum(self.gemm_s(tokens, k, n) for k, n in self.gemms)
            self._linear[tokens] = t
        return t

    def prefill_attention_s(self, n: int, past: int) -> float:
        """One prompt chunk's attention: causal over itself, full over (and re-reading) its prefix."""
        hd = self.cfg.head_dim
        flops = 4.0 * self.heads * hd * causal_pairs(n, past)
        nbytes = ((past + n) * 2 * self.kv_heads + 2 * n * self.heads) * hd * self.e
        return self.hw.attention_scale * max(flops / self.attn_flops, nbytes / self.bw)

    def decode_attention_s(self, total_context: int, num: int) -> float:
        """One batched kernel for ``num`` decodes reading ``total_context`` cached tokens in all."""
        if num == 0:
            return 0.0
        hd = self.cfg.head_dim
        flops = 4.0 * self.heads * hd * total_context
        nbytes = (total_context * 2 * self.kv_heads + 2 * num * self.heads) * hd * self.e
        return self.hw.attention_scale * max(flops / self.attn_flops, nbytes / self.bw)

    def other_s(self, tokens: int) -> float:
        return self.hw.other_scale * (tokens * self.other_elems * self.e / self.bw + self.hw.layer_overhead_s)

    def tp_comm_s(self, tokens: int) -> float:
        """Two ring all-reduces of the layer's output activations."""
        t = self.tp
        if t == 1:
            return 0.0
        nbytes = tokens * self.cfg.hidden_size * self.e
        return 2 * (2 * (t - 1) * self.hw.tp_latency + 2 * (t - 1) / t * nbytes / self.hw.tp_bw)

    def lm_head_s(self, rows: int) -> float:
        h = self.cfg.hidden_size
        return self.hw.linear_scale * self.gemm_s(rows, h, self.vocab_shard) if rows else 0.0

    # ---- a whole step ----------------------------------------------------------------------------
    def step(self, chunks: Sequence[tuple[int, int]], decodes: Sequence[int], num_sampled: int | None = None,
             ) -> StepCost:
        """Cost of prompt ``chunks`` ``(tokens, past)`` plus ``decodes`` (contexts, self included);
        ``num_sampled`` rows go through the LM head (default: every decode and every chunk)."""
        hw, cfg = self.hw, self.cfg
        tokens = sum(n for n, _ in chunks) + len(decodes)
        if tokens == 0:
            return StepCost([0.0] * self.pp)
        if num_sampled is None:
            num_sampled = len(decodes) + len(chunks)
        lin = self.linear_s(tokens)
        att = sum(self.prefill_attention_s(n, p) for n, p in chunks)
        if decodes:
            read = len(decodes) * max(decodes) if hw.decode_attention_padded else sum(decodes)
            att += self.decode_attention_s(read, len(decodes))
        oth = self.other_s(tokens)
        tpc = self.tp_comm_s(tokens)
        send = hw.pp_latency + tokens * cfg.hidden_size * self.e / hw.pp_bw if self.pp > 1 else 0.0
        head = self.lm_head_s(num_sampled)
        embed = tokens * cfg.hidden_size * self.e / self.bw
        overhead = hw.step_overhead_s + hw.token_overhead_s * tokens + \
            hw.seq_overhead_s * (len(chunks) + len(decodes))
        stages = []
        for i, layers in enumerate(self.stage_layers):
            t = layers * (lin + att + oth + tpc)
            if i == 0:
                t += embed + overhead
            if i == self.pp - 1:
                t += head
            else:
                t += send
            stages.append(t)
        layers_all = cfg.num_hidden_layers
        return StepCost(stages, linear_s=layers_all * lin + head, attention_s=layers_all * att,
                        other_s=layers_all * oth + embed, comm_s=layers_all * tpc + (self.pp - 1) * send,
                        overhead_s=overhead)

    def plan_cost(self, plan: StepPlan, decode_share: bool = False) -> tuple[StepCost, float]:
        """Cost of an engine ``StepPlan``, and (with ``decode_share``) the seconds its decodes add: all
        of a decode-only step, the marginal cost ``cost(step) - cost(step without decodes)`` of a mixed
        one (the paper's arithmetic; exact here, as the model has no noise). Single-token entries are
        attended in the batched decode kernel (as the local executor does), longer ones as chunks."""
        chunks, decodes, sampled, chunk_sampled = [], [], 0, 0
        for s in plan.seqs:
            n = len(s.token_ids)
            if n == 1:
                decodes.append(s.start + 1)
            else:
                chunks.append((n, s.start))
                chunk_sampled += s.sample is not None
            sampled += s.sample is not None
        cost = self.step(chunks, decodes, sampled)
        if not decode_share or not decodes:
            return cost, 0.0
        if not chunks:
            return cost, cost.total_s
        return cost, max(0.0, cost.total_s - self.step(chunks, [], chunk_sampled).total_s)

    def weight_bytes_per_device(self) -> float:
        """Weights one device holds (its TP shard of its PP stage's layers, plus embeddings)."""
        cfg = self.cfg
        per_layer = sum(k * n for k, n in self.gemms) + 2 * cfg.hidden_size
        emb = cfg.vocab_size * cfg.hidden_size / self.tp * (1 if cfg.tie_word_embeddings else 2)
        return (max(self.stage_layers) * per_layer + emb) * self.e

    def kv_bytes_per_token(self) -> int:
        """K and V of one token on one device (its KV heads, its stage's layers)."""
        return 2 * max(self.stage_layers) * self.kv_heads * self.cfg.head_dim * self.e
