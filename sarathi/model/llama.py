"""Llama-family decoder (Llama 2/3, Mistral, Qwen2, SmolLM2, TinyLlama) over a token-flattened batch.

Every linear layer runs as ONE matmul over all tokens of the step, prompt chunks and decodes alike:
this is how decodes piggyback on a prefill chunk's weight reads. q/k/v and gate/up are fused into
single projections so each layer reads its weights in as few GEMMs as possible.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sarathi.config import cpu_vendor
from sarathi.model.attention import AttentionMetadata, paged_attention, write_kv
from sarathi.model.config import ModelConfig
from sarathi.model.rope import RotaryEmbedding, apply_rope

# oneDNN with a pre-packed weight (blocked for the core's vector width, so every call skips the
# reorder) beats the default GEMM for small batches on CPU. fp32, AVX-512 Xeon: 1.2-2x for 4..96 rows,
# a tie or a loss outside that range, so the packed copy is used only there. fp32 on AMD EPYC, where
# torch's default fp32 GEMM (MKL) is slow: 1.05-2.8x for 32..512 rows (e.g. 215 vs 171 GFLOP/s at 512 rows
# of SmolLM2's MLP, 196 vs 70 at 32 rows of a 1B MLP): used always there. bf16 (AVX512-BF16 EPYC):
# bit-identical results, 1.5-4x faster for 1..32 rows and still 2-8% faster at 512 rows: used always.
PACKED_ROWS = range(3, 97)
ALL_ROWS = range(1, 2**62)


class Linear(nn.Linear):
    """nn.Linear that may hold a oneDNN-packed copy of its weight for CPU matmuls."""

    packed: torch.Tensor | None = None
    packed_rows: range = PACKED_ROWS  # batch sizes (rows) that use the packed copy

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None and x.shape[0] in self.packed_rows:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)


def pack_for_cpu(model: nn.Module) -> bool:
    """Add packed weight copies to every Linear when running fp32 or bf16 on a CPU with oneDNN.

    Costs one extra copy of the linear weights; returns whether packing happened.
    """
    linears = [m for m in model.modules() if isinstance(m, Linear)]
    w = linears[0].weight if linears else None
    if w is None or w.device.type != "cpu" or w.dtype not in (torch.float32, torch.bfloat16):
        return False
    if not torch.backends.mkldnn.is_available():
        return False
    rows = PACKED_ROWS if w.dtype == torch.float32 and cpu_vendor() != "AuthenticAMD" else ALL_ROWS
    try:
        for m in linears:
            m.packed = torch.ops.mkldnn._reorder_linear_weight(m.weight.detach(), 16)
            m.packed_rows = rows
    except (RuntimeError, AttributeError):  # an older/newer torch without this op: plain GEMM
        for m in linears:
            m.packed = None
        return False
    return True


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        self.eps = cfg.rms_norm_eps
        q_size = self.num_heads * self.head_dim
        kv_size = self.num_kv_heads * self.head_dim
        self.input_norm = nn.Parameter(torch.ones(cfg.hidden_size))
        self.qkv_proj = Linear(cfg.hidden_size, q_size + 2 * kv_size, bias=cfg.attention_bias)
        self.o_proj = Linear(q_size, cfg.hidden_size, bias=False)
        self.post_norm = nn.Parameter(torch.ones(cfg.hidden_size))
        self.gate_up_proj = Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        delta: torch.Tensor | None,
        rope: tuple[torch.Tensor, torch.Tensor],
        meta: AttentionMetadata,
        kv_cache: tuple[torch.Tensor, torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The hidden state entering the layer is ``x + delta`` (``delta`` None: just ``x``); returns the
        leaving one the same way, so each residual add is fused with the RMSNorm that follows it."""
        t = x.shape[0]
        ops = meta.layer_ops
        x, h = add_rms_norm(x, delta, self.input_norm, self.eps, ops)
        qkv = self.qkv_proj(h).view(t, -1, self.head_dim)
        nq, nkv = self.num_heads, self.num_kv_heads
        # q and k heads are adjacent in the fused projection: rotate them in one go.
        if ops is not None:
            cos, sin = rope
            ops.rope_(qkv, nq + nkv, cos, sin)  # in place: q and k stay views of qkv
            q, k = qkv[:, :nq], qkv[:, nq : nq + nkv]
        else:
            q, k = apply_rope(qkv[:, : nq + nkv], *rope).split((nq, nkv), dim=1)
        v = qkv[:, nq + nkv :]
        k_cache, v_cache = kv_cache
        write_kv(k_cache, v_cache, k, v, meta.slot_mapping)
        attn = paged_attention(q, k, v, k_cache, v_cache, meta, self.head_dim**-0.5)
        x, h = add_rms_norm(x, self.o_proj(attn.view(t, -1)), self.post_norm, self.eps, ops)
        gate_up = self.gate_up_proj(h)
        if ops is not None:
            act = ops.silu_mul(gate_up)
        else:
            gate, up = gate_up.chunk(2, dim=-1)
            act = F.silu(gate) * up
        return x, self.down_proj(act)


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float,
                 ops: Any | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(s, rms_norm(s))`` for ``s = x + delta`` (``x`` if delta is None), in one pass with ``ops``."""
    if ops is not None:
        return (x, ops.rms_norm(x, weight, eps)) if delta is None else ops.add_rms_norm(x, delta, weight, eps)
    if delta is not None:
        x = x + delta
    return x, rms_norm(x, weight, eps)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm computed in float32 (as HF does) and cast back."""
    if x.dtype == torch.float32:  # one fused kernel, bit-identical to the formula below in fp32
        return F.rms_norm(x, weight.shape, weight, eps)
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


class LlamaForCausalLM(nn.Module):
    """Token-flattened causal LM. ``forward`` returns float32 logits only for ``logits_indices``.

    ``layers=(start, end)`` builds one pipeline stage: only decoder layers ``start..end-1`` (held as
    local layers 0..end-start-1), the embedding only on the first stage, the final norm and LM head
    only on the last, so a stage allocates nothing it does not run.
    """

    def __init__(self, cfg: ModelConfig, max_positions: int, layers: tuple[int, int] | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.start, self.end = layers or (0, cfg.num_hidden_layers)
        self.is_first = self.start == 0
        self.is_last = self.end == cfg.num_hidden_layers
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size) if self.is_first else None
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(self.end - self.start))
        self.norm = nn.Parameter(torch.ones(cfg.hidden_size)) if self.is_last else None
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False) if self.is_last else None
        self.rope = RotaryEmbedding(cfg, max_positions)

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        logits_indices: torch.Tensor,
        hidden: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits of the ``logits_indices`` rows; a stage that is not the last returns its hidden states
        ([T, hidden]) instead, and a stage that is not the first starts from ``hidden``."""
        if self.embed_tokens is not None:
            x = self.embed_tokens(input_ids)
        else:
            assert hidden is not None, "a stage after the first needs the previous stage's hidden states"
            x = hidden
        rope = self.rope.tables(positions)
        delta = None
        for layer, cache in zip(self.layers, kv_caches):
            x, delta = layer(x, delta, rope, meta, cache)
        if self.lm_head is None or self.norm is None:
            return x if delta is None else x + delta
        # The LM head is the largest single matmul of a small model: run it only on the tokens we
        # sample from (last token of each finished chunk and each decode), not on every prompt token.
        rows = x[logits_indices]
        _, h = add_rms_norm(rows, None if delta is None else delta[logits_indices], self.norm,
                            self.cfg.rms_norm_eps, meta.layer_ops)
        return self.lm_head(h).float()
