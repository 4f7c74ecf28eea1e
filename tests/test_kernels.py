"""The C++ paged decode-attention kernel against the pure-torch path (gather + SDPA)."""

from __future__ import annotations

import shutil
import threading

import pytest
import torch

from sarathi.model import kernels
from sarathi.model.attention import AttentionMetadata, _decode_attention, causal_prefix_attention


def test_kernel_builds_where_a_compiler_exists(cpu_kernels):
    if shutil.which("c++") is None and shutil.which("g++") is None:
        pytest.skip("no C++ compiler on this machine: the torch path is used")
    assert cpu_kernels is not None, kernels.build_error()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
# (9, 3, 64): SmolLM2; (32, 8, 64): Llama-3.2-1B; (7, 1, 128): 4 + 3 heads per KV head; 48: generic path.
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(9, 3, 64), (4, 4, 128), (32, 8, 64), (7, 1, 128),
                                                     (8, 2, 48)])
def test_decode_kernel_matches_torch_path(cpu_kernels, dtype, heads, kv_heads, head_dim):
    if cpu_kernels is None:
        pytest.skip(f"kernel unavailable: {kernels.build_error()}")
    g = torch.Generator().manual_seed(heads * head_dim)
    b, bs, max_blocks = 7, 16, 9
    nb = b * max_blocks + 5
    kc = torch.randn(nb, bs, kv_heads, head_dim, generator=g).to(dtype)
    vc = torch.randn(nb, bs, kv_heads, head_dim, generator=g).to(dtype)
    tables = torch.randperm(nb, generator=g)[: b * max_blocks].view(b, max_blocks)  # scattered blocks
    lens = torch.tensor([1, 2, 15, 16, 17, 100, max_blocks * bs])
    q = torch.randn(b, heads, head_dim, generator=g).to(dtype)
    scale = head_dim**-0.5
    ref = _decode_attention(q, kc, vc, AttentionMetadata(lens, b, tables, lens, int(lens.max()), []), scale)
    meta = AttentionMetadata(lens, b, tables, lens, int(lens.max()), [], decode_kernel=cpu_kernels)
    out = _decode_attention(q, kc, vc, meta, scale)
    assert out.dtype == dtype and out.shape == ref.shape
    # fp32: summation order only; bf16: one rounding of the output (SDPA rounds the same way).
    tol = 1e-5 if dtype == torch.float32 else 1.6e-2
    torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol)


def test_decode_kernel_rejects_bad_tables(cpu_kernels):
    if cpu_kernels is None:
        pytest.skip(f"kernel unavailable: {kernels.build_error()}")
    kc = torch.zeros(4, 16, 1, 64)
    q = torch.zeros(1, 1, 64)
    with pytest.raises(RuntimeError, match="out of range"):
        cpu_kernels(q, kc, kc, torch.tensor([[7]]), torch.tensor([3]), 0.125)
    with pytest.raises(RuntimeError, match="longer than its table"):
        cpu_kernels(q, kc, kc, torch.tensor([[0]]), torch.tensor([17]), 0.125)


@pytest.mark.parametrize("heads,kv_heads,n,kv_len", [(9, 3, 5, 37), (4, 4, 16, 16), (8, 2, 1, 300)])
def test_cuda_prefix_chunk_path_equals_the_mask_path(heads, kv_heads, n, kv_len):
    """The CUDA path for a chunk after a cached prefix (bottom-right causal bias, KV heads expanded) is
    the same attention as the bool-mask path; checked here on CPU, where both run."""
    g = torch.Generator().manual_seed(n * kv_len)
    q = torch.randn(1, heads, n, 64, generator=g)
    k = torch.randn(1, kv_heads, kv_len, 64, generator=g)
    v = torch.randn(1, kv_heads, kv_len, 64, generator=g)
    mask = torch.arange(kv_len)[None, :] <= (torch.arange(n) + kv_len - n)[:, None]
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.125,
                                                           enable_gqa=True)
    torch.testing.assert_close(causal_prefix_attention(q, k, v, 0.125), ref, atol=1e-5, rtol=1e-5)


def test_decode_attention_over_whole_blocks_equals_exact_length():
    """On CUDA, decodes attend over whole blocks (the padding mask's length a multiple of the block size,
    which keeps SDPA on its fused kernel): the masked padding must not change the result."""
    g = torch.Generator().manual_seed(3)
    b, bs, width, heads, kv_heads = 4, 16, 5, 8, 2
    kc = torch.randn(b * width, bs, kv_heads, 64, generator=g)
    vc = torch.randn(b * width, bs, kv_heads, 64, generator=g)
    tables = torch.randperm(b * width, generator=g).view(b, width)
    lens = torch.tensor([1, 17, 40, 70])
    q = torch.randn(b, heads, 64, generator=g)
    exact = _decode_attention(q, kc, vc, AttentionMetadata(lens, b, tables, lens, 70, []), 0.125)
    whole = _decode_attention(q, kc, vc, AttentionMetadata(lens, b, tables, lens, width * bs, []), 0.125)
    torch.testing.assert_close(whole, exact, atol=1e-6, rtol=1e-6)


def test_a_stale_torch_build_lock_does_not_hang_the_build(cpu_kernels, tmp_path, monkeypatch):
    """A process killed mid-build leaves torch's ``lock`` file behind; the next build must not wait for
    it forever (it did: every later engine's kernel build, and the test session's, hung)."""
    if cpu_kernels is None:
        pytest.skip(f"kernel unavailable: {kernels.build_error()}")
    _, built = kernels._build_dir()
    monkeypatch.setenv("SARATHI_CACHE", str(tmp_path))
    _, path = kernels._build_dir()
    shutil.copytree(built, path)  # the cached build: loading it is quick
    (path / "lock").touch()
    monkeypatch.setattr(kernels, "_state", {"fn": None, "thread": None, "error": None})
    t = threading.Thread(target=kernels._build, daemon=True)
    t.start()
    t.join(120)
    assert not t.is_alive(), "the build waits for a stale lock"
    assert kernels.decode_attention() is not None, kernels.build_error()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads,kv_heads,head_dim,n,kv_len", [
    (9, 3, 64, 512, 512), (9, 3, 64, 37, 100), (4, 4, 128, 16, 16), (8, 2, 64, 2, 300), (9, 3, 64, 45, 1000),
])
def test_prefill_kernel_matches_sdpa(cpu_kernels, dtype, heads, kv_heads, head_dim, n, kv_len):
    """The prompt-chunk kernel is SDPA with the bottom-right causal mask (chunk after a cached prefix,
    grouped-query heads, q rows strided as in the fused projection): checked against float32 SDPA on the
    same inputs; bf16 within its rounding of the output and of the probabilities."""
    fn = kernels.prefill_attention(dtype)
    if fn is None:
        pytest.skip(f"no {dtype} prompt-chunk kernel on this CPU: SDPA is used")
    g = torch.Generator().manual_seed(n * kv_len)
    qkv = torch.randn(n, heads + 2 * kv_heads, head_dim, generator=g).to(dtype)
    q = qkv[:, :heads]  # a view: rows strided by the fused projection's width
    k = torch.randn(kv_len, kv_heads, head_dim, generator=g).to(dtype)
    v = torch.randn(kv_len, kv_heads, head_dim, generator=g).to(dtype)
    mask = torch.arange(kv_len)[None, :] <= (torch.arange(n) + kv_len - n)[:, None]
    ref = torch.nn.functional.scaled_dot_product_attention(
        *(x.float().transpose(0, 1)[None] for x in (q, k, v)), attn_mask=mask, scale=head_dim**-0.5,
        enable_gqa=True)[0].transpose(0, 1)
    out = fn(q, k, v, head_dim**-0.5)
    assert out.dtype == dtype and out.shape == (n, heads, head_dim)
    tol = 1e-5 if dtype == torch.float32 else 1.6e-2
    torch.testing.assert_close(out.float(), ref, atol=tol, rtol=tol)


def test_prefill_kernel_refuses_bad_input(cpu_kernels):
    fn = kernels.prefill_attention(torch.bfloat16)
    if fn is None:
        pytest.skip("no AVX512-BF16 on this CPU (or no kernel)")
    q, k = torch.zeros(4, 2, 64).bfloat16(), torch.zeros(8, 2, 64).bfloat16()
    with pytest.raises(RuntimeError, match="64 or 128"):
        small = torch.zeros(8, 2, 32).bfloat16()
        fn(small[:4], small, small, 1.0)
    with pytest.raises(RuntimeError, match="within its keys"):
        fn(q, k[:2], k[:2], 1.0)
    with pytest.raises(RuntimeError, match="share a dtype"):
        fn(q.float(), k, k, 1.0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fused_layer_ops_match_the_torch_ops(cpu_kernels, dtype):
    """Each fused op against the torch ops it replaces in a layer: the same float32 arithmetic and (bf16)
    roundings, so only the RMS's summation order and SiLU's exp can move a value (by one bf16 step, or a
    few float32 ulps)."""
    from sarathi.model.llama import add_rms_norm
    from sarathi.model.rope import apply_rope

    ops = kernels.fused_ops(dtype)
    if ops is None:
        pytest.skip(f"fused ops unavailable: {kernels.build_error() or 'no AVX-512'}")
    assert kernels.fused_ops(torch.float16) is None  # other dtypes keep torch's ops
    g = torch.Generator().manual_seed(0)
    t, n, inter = 37, 200, 333  # widths that are not multiples of 16: the masked tails
    x = (3 * torch.randn(t, n, generator=g)).to(dtype)
    d = torch.randn(t, n, generator=g).to(dtype)
    w = (1 + torch.randn(n, generator=g) / 4).to(dtype)

    def close(a: torch.Tensor, b: torch.Tensor) -> None:
        assert a.dtype == b.dtype == dtype and a.shape == b.shape
        if dtype == torch.float32:
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
            return
        differ = a != b
        assert differ.float().mean() < 0.01, f"{int(differ.sum())} of {a.numel()} differ"
        torch.testing.assert_close(a.float(), b.float(), rtol=2**-7, atol=1e-6)  # one bf16 step at most

    s_ref, h_ref = add_rms_norm(x, d, w, 1e-5)
    s, h = add_rms_norm(x, d, w, 1e-5, ops)
    assert torch.equal(s, s_ref)  # the residual add is exact: one rounding either way
    close(h, h_ref)
    close(add_rms_norm(x, None, w, 1e-5, ops)[1], add_rms_norm(x, None, w, 1e-5)[1])
    gu = (4 * torch.randn(t, 2 * inter, generator=g)).to(dtype)
    gate, up = gu.chunk(2, dim=-1)
    close(ops.silu_mul(gu), torch.nn.functional.silu(gate) * up)
    heads, rot, hd = 5, 4, 64
    qkv = torch.randn(t, heads, hd, generator=g).to(dtype)
    angles = torch.rand(t, 1, hd // 2, generator=g) * 100
    ref, rest = apply_rope(qkv[:, :rot], angles.cos(), angles.sin()), qkv[:, rot:].clone()
    ops.rope_(qkv, rot, angles.cos(), angles.sin())
    assert torch.equal(qkv[:, :rot], ref)  # same multiplies and adds in float32: bit-identical
    assert torch.equal(qkv[:, rot:], rest)  # heads past ``rot`` (the values) untouched
    with pytest.raises(RuntimeError):
        ops.silu_mul(gu.half())
