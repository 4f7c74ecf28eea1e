"""The C++ paged decode-attention kernel against the pure-torch path (gather + SDPA)."""

from __future__ import annotations

import shutil

import pytest
import torch

from sarathi.model import kernels
from sarathi.model.attention import AttentionMetadata, _decode_attention


def test_kernel_builds_where_a_compiler_exists(cpu_kernels):
    if shutil.which("c++") is None and shutil.which("g++") is None:
        pytest.skip("no C++ compiler on this machine: the torch path is used")
    assert cpu_kernels is not None, kernels.build_error()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(9, 3, 64), (4, 4, 128), (8, 2, 48)])
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
