"""Paged attention over a token-flattened batch, with the metadata passed explicitly.

The batch is ``[num_tokens, ...]``: first the single-query entries (decodes, or 1-token prompt chunks),
then the multi-token prompt chunks. Single-query entries are attended in one batched call over their
gathered block tables; each prompt chunk is one call, causal over its own tokens and full over its
request's cached prefix. Only attention needs to know which token belongs to which request.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right


def configure_sdpa(device: torch.device) -> None:
    """Pick SDPA backends for this process's device. On CUDA, cuDNN's fused attention (PyTorch's first
    choice on Hopper) builds an execution plan per new (q_len, kv_len) shape; chunked prefills and growing
    decode lengths give nearly every step new shapes. With it, a 1B model's prefill-heavy run on an H200
    took 4.6x (sarathi, chunk 512) and 2.9x (vllm policy) longer than with flash / memory-efficient
    attention, which need no per-shape set-up (benchmarks/results/gpu/). No effect on CPU."""
    if device.type == "cuda":
        torch.backends.cuda.enable_cudnn_sdp(False)


@dataclass
class PrefillChunk:
    """A prompt chunk of ``q_len`` tokens at ``[q_start, q_start + q_len)`` in the flattened batch.

    ``kv_len`` counts the request's tokens once this chunk is in the cache (cached prefix + chunk).
    """

    q_start: int
    q_len: int
    kv_len: int
    block_table: torch.Tensor  # [ceil(kv_len / block_size)] int64
    mask: torch.Tensor | None = None  # [q_len, kv_len] bool; None: no cached prefix, plain causal
    start_slot: int | None = None  # set when the blocks are one contiguous run: read K/V as a view

    def __post_init__(self) -> None:
        if self.kv_len != self.q_len and self.mask is None:
            # Query i sits at absolute position kv_len - q_len + i and sees every key up to it.
            dev = self.block_table.device
            qpos = torch.arange(self.q_len, device=dev) + (self.kv_len - self.q_len)
            self.mask = torch.arange(self.kv_len, device=dev)[None, :] <= qpos[:, None]


@dataclass
class AttentionMetadata:
    """Where each token's K/V goes and what each query may attend to."""

    slot_mapping: torch.Tensor  # [num_tokens] int64: block_id * block_size + offset
    num_decode_tokens: int
    decode_block_tables: torch.Tensor | None  # [num_decodes, max_blocks] int64 (padded with 0)
    decode_seq_lens: torch.Tensor | None  # [num_decodes] int64, KV length including the new token
    decode_max_len: int
    prefills: list[PrefillChunk]
    decode_mask: torch.Tensor | None = None  # [num_decodes, 1, 1, decode_max_len] bool, built once
    # The compiled CPU kernel (sarathi.model.kernels) reading K/V blocks in place, when available;
    # None: gather + SDPA in torch. Chosen once per step, so every layer of a step takes the same path.
    decode_kernel: Callable[..., Any] | None = None
    # The compiled prompt-chunk attention for this dtype (CPUs with AVX-512; sarathi.model.kernels), or
    # None: SDPA. Also chosen once per step.
    prefill_kernel: Callable[..., Any] | None = None
    # The compiled fused elementwise ops of a layer (norms, SiLU gate, RoPE; sarathi.model.kernels),
    # or None: torch ops. Not attention, but chosen per step with the kernels above for the same reason.
    layer_ops: Any | None = None

    def __post_init__(self) -> None:
        if self.decode_kernel is not None:
            return  # the kernel needs no mask
        if self.decode_seq_lens is not None and self.decode_mask is None:
            pos = torch.arange(self.decode_max_len, device=self.decode_seq_lens.device)
            self.decode_mask = (pos[None, :] < self.decode_seq_lens[:, None])[:, None, None, :]


def write_kv(
    k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor
) -> None:
    """Scatter this step's keys/values ([T, KVH, D]) into the paged caches ([blocks, bs, KVH, D])."""
    kvh, d = k.shape[1], k.shape[2]
    k_cache.view(-1, kvh, d).index_copy_(0, slots, k)
    v_cache.view(-1, kvh, d).index_copy_(0, slots, v)


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """q: [T, H, D]; k, v: [T, KVH, D] (this step's, already written to the cache). Returns [T, H, D]."""
    out = torch.empty_like(q)
    nd = meta.num_decode_tokens
    if nd:
        out[:nd] = _decode_attention(q[:nd], k_cache, v_cache, meta, scale)
    for c in meta.prefills:
        sl = slice(c.q_start, c.q_start + c.q_len)
        out[sl] = _chunk_attention(q[sl], k[sl], v[sl], k_cache, v_cache, c, scale, meta.prefill_kernel)
    return out


def _decode_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata, scale: float
) -> torch.Tensor:
    b, h, d = q.shape
    kvh = k_cache.shape[2]
    length = meta.decode_max_len
    tables = meta.decode_block_tables
    assert tables is not None and meta.decode_seq_lens is not None
    if meta.decode_kernel is not None:
        return meta.decode_kernel(q, k_cache, v_cache, tables, meta.decode_seq_lens, scale)
    # Gather every decode's blocks into a dense [B, KVH, L, D] view (padding masked out by the mask).
    k = _gather(k_cache, tables).view(b, -1, kvh, d)[:, :length].transpose(1, 2)
    v = _gather(v_cache, tables).view(b, -1, kvh, d)[:, :length].transpose(1, 2)
    # GQA without copying K/V: the G query heads sharing a KV head become SDPA's "query length".
    qg = q.view(b, kvh, h // kvh, d)
    o = F.scaled_dot_product_attention(qg, k, v, attn_mask=meta.decode_mask, scale=scale)
    return o.reshape(b, h, d)


def _gather(cache: torch.Tensor, tables: torch.Tensor) -> torch.Tensor:
    """Copy the listed blocks out of the cache. index_select on a 2-D view is ~2x faster on CPU than
    advanced indexing of the 4-D cache."""
    return cache.view(cache.shape[0], -1).index_select(0, tables.reshape(-1))


def _chunk_attention(
    q: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    c: PrefillChunk,
    scale: float,
    kernel: Callable[..., Any] | None = None,
) -> torch.Tensor:
    n, h, d = q.shape
    kvh = k_new.shape[1]
    if c.kv_len == n:  # first chunk: nothing cached before it, attend to this step's K/V directly
        k, v = k_new, v_new
    elif c.start_slot is not None:
        k = k_cache.view(-1, kvh, d)[c.start_slot : c.start_slot + c.kv_len]
        v = v_cache.view(-1, kvh, d)[c.start_slot : c.start_slot + c.kv_len]
    else:
        k = _gather(k_cache, c.block_table).view(-1, kvh, d)[: c.kv_len]
        v = _gather(v_cache, c.block_table).view(-1, kvh, d)[: c.kv_len]
    # The executor picked the kernel for this dtype. bf16 (dot-product units): 2.1-3.6x SDPA on every
    # shape measured. float32 (FMAs): 1.3-1.6x while the cached prefix is at most as long as the chunk,
    # but 0.8-0.9x SDPA on short chunks after long prefixes (benchmarks/README.md), so those keep SDPA.
    if kernel is not None and d in (64, 128) and (q.dtype == torch.bfloat16 or c.kv_len <= 2 * n):
        return kernel(_rows(q), _rows(k), _rows(v), scale)
    qh = q.transpose(0, 1).unsqueeze(0)  # [1, H, n, D]
    kh = k.transpose(0, 1).unsqueeze(0)  # [1, KVH, kv_len, D]
    vh = v.transpose(0, 1).unsqueeze(0)
    if c.mask is None:
        o = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=scale, enable_gqa=True)
    elif q.is_cuda:
        o = causal_prefix_attention(qh, kh, vh, scale)
    else:
        o = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=c.mask, scale=scale, enable_gqa=True)
    return o.squeeze(0).transpose(0, 1)


def causal_prefix_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """SDPA of q [1, H, n, D] over k, v [1, KVH, kv_len, D] where query i sits at position kv_len - n + i
    (a chunk after a cached prefix), for CUDA: an explicit bool mask sends CUDA SDPA to its unfused math
    path, while the bottom-right causal bias is the same mask applied inside the memory-efficient kernel.
    That kernel has no GQA, so the KV heads are expanded (a copy the size of this request's K/V, small
    next to the math path's [H, n, kv_len] scores)."""
    n, kv_len = q.shape[2], k.shape[2]
    g = q.shape[1] // k.shape[1]
    return F.scaled_dot_product_attention(q, k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1),
                                          attn_mask=causal_lower_right(n, kv_len), scale=scale)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x [T, heads, D] with each row's heads adjacent and dense (the kernels' layout), copying if not."""
    return x if x.stride(2) == 1 and x.stride(1) == x.shape[2] else x.contiguous()
