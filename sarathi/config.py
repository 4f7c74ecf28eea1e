"""Engine arguments (vLLM's names), validated before any model is loaded."""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

DEFAULT_CHUNK_SIZE = 512
DEFAULT_KV_CACHE_MEMORY = 2 * 1024**3
_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1024, "m": 1000**2, "mb": 1000**2,
          "mib": 1024**2, "g": 1000**3, "gb": 1000**3, "gib": 1024**3}


@dataclass
class EngineArgs:
    """Everything needed to build an engine. ``check()`` raises ValueError naming the bad field."""

    model: str | None = None
    dtype: str = "auto"
    scheduler: str = "sarathi"
    chunk_size: int | None = None
    max_num_seqs: int = 256
    max_num_batched_tokens: int | None = None
    tile_size: int | None = None
    block_size: int = 16
    num_kv_blocks: int | None = None
    kv_cache_memory: int | str | None = None
    max_model_len: int | None = None
    seed: int = 0
    device: str = "auto"

    def check(self) -> None:
        from sarathi.scheduler import SCHEDULERS

        if self.scheduler not in SCHEDULERS:
            raise ValueError(
                f"scheduler: unknown scheduler {self.scheduler!r}; choose one of {sorted(SCHEDULERS)}"
            )
        for name in ("chunk_size", "max_num_batched_tokens", "tile_size", "num_kv_blocks", "max_model_len"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < 1):
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        for name in ("max_num_seqs", "block_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16", "half", "float"):
            raise ValueError(f"dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"device must be auto, cpu or cuda[:N], got {self.device!r}")
        self.kv_cache_bytes()

    def kv_cache_bytes(self) -> int:
        v = self.kv_cache_memory
        if v is None:
            return DEFAULT_KV_CACHE_MEMORY
        if isinstance(v, int) and v > 0:
            return v
        m = re.fullmatch(r"\s*([0-9.]+)\s*([a-zA-Z]*)\s*", str(v))
        if not m or m.group(2).lower() not in _UNITS or float(m.group(1)) <= 0:
            raise ValueError(f"kv_cache_memory must be bytes or a size like '2GiB', got {v!r}")
        return int(float(m.group(1)) * _UNITS[m.group(2).lower()])

    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def torch_dtype(self, checkpoint_dtype: str | None) -> torch.dtype:
        """``auto`` keeps a bf16/fp16 checkpoint in 16 bits (bf16 on CPU) and uses float32 otherwise
        (e.g. GGUF files, which we dequantize to float32)."""
        name = {"half": "float16", "float": "float32"}.get(self.dtype, self.dtype)
        if name == "auto":
            if checkpoint_dtype in ("bfloat16", "float16"):
                on_cpu = self.torch_device().type == "cpu"
                name = "bfloat16" if on_cpu or checkpoint_dtype == "bfloat16" else "float16"
            else:
                name = "float32"
        return getattr(torch, name)
