"""Helpers shared by the ``sarathi bench`` commands: machine description, limits, JSON, tables.

Every result JSON carries ``meta`` (see :func:`run_meta`): when it ran, on what CPU, with how many
torch threads, the git commit, and ``os.getloadavg()`` so that readers can judge how noisy the
numbers are (the benchmark machines are often shared).
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def loadavg() -> list[float]:
    """``os.getloadavg()`` rounded (1, 5 and 15 minute averages)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover - not on every platform
        return []


def cpu_info() -> dict[str, Any]:
    """CPU model, core count and the flags that matter for fp32/bf16 matmuls (Linux ``/proc/cpuinfo``)."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        text = Path("/proc/cpuinfo").read_text()
        for line in text.splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    interesting = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_tile", "fma")
    return {
        "model": model,
        "logical_cpus": os.cpu_count(),
        "flags": {f: f in flags for f in interesting},
        "native_bf16": "avx512_bf16" in flags or "amx_bf16" in flags,
    }


def git_commit() -> str | None:
    """``HEAD`` of the checkout this module lives in, with ``+dirty`` when files are modified."""
    root = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                              text=True, timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("+dirty" if dirty else "")


def set_threads(threads: int | None) -> int:
    """Apply ``torch.set_num_threads`` (when given) and return the thread count in use."""
    import torch

    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def run_meta(command: str, args: dict[str, Any] | None = None) -> dict[str, Any]:
    """What every result JSON records about the run and the machine."""
    import torch

    return {
        "command": command,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "args": args or {},
        "cpu": cpu_info(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "git_commit": git_commit(),
        "loadavg_start": loadavg(),
    }


def measure_limits(threads: int | None = None, quick: bool = False) -> dict[str, Any]:
    """fp32 + bf16 GEMM peaks and memory bandwidth on this machine, via ``roofline.measure_limits``.

    bf16 is measured with a smaller GEMM because without native bf16 (no avx512_bf16/AMX) it is
    emulated and several times slower; its peak is still what a bf16 model could reach here.
    """
    from sarathi.bench import roofline

    n = 1024 if quick else 2048
    repeats = 3 if quick else 5
    limits = roofline.measure_limits(("float32",), threads, gemm_n=n, bw_size_mib=256 if quick else 512,
                                     repeats=repeats)
    limits["gemm_gflops"]["bfloat16"] = roofline.measure_gemm_gflops("bfloat16", min(n, 1024), warmup=1,
                                                                    repeats=max(2, repeats - 2))
    limits["ridge_flop_per_byte"] = {
        dt: roofline.ridge_point(g, limits["mem_bw_gbs"]) for dt, g in limits["gemm_gflops"].items()
    }
    limits["loadavg"] = loadavg()
    return limits


def model_shape(engine: Any) -> Any:
    """The roofline shape (:class:`roofline.LlamaShape`) of an engine's loaded model."""
    from sarathi.bench.roofline import LlamaShape

    c = engine.model_config
    return LlamaShape(hidden=c.hidden_size, intermediate=c.intermediate_size, layers=c.num_hidden_layers,
                      heads=c.num_attention_heads, kv_heads=c.num_key_value_heads, vocab=c.vocab_size,
                      head_dim=c.head_dim, tied_embeddings=c.tie_word_embeddings)


def dtype_name(engine: Any) -> str:
    """``"float32"`` / ``"bfloat16"`` / ``"float16"`` for the engine's weights."""
    return str(engine.dtype).removeprefix("torch.")


def _clean(obj: Any) -> Any:
    """Make ``obj`` strict-JSON friendly: non-finite floats become ``None``."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def save_json(obj: Any, path: str | Path) -> Path:
    """Write ``obj`` as indented JSON (creating folders); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_clean(obj), indent=2, default=str) + "\n")
    return path


def fmt(value: Any, digits: int = 1) -> str:
    """A table cell: floats rounded, ``None`` as ``-``."""
    if value is None:
        return "-"
    if isinstance(value, float):
        if not math.isfinite(value):
            return "-"
        return f"{value:.{digits}f}"
    return str(value)


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str]],
                   digits: int = 1) -> str:
    """Render ``rows`` as a Markdown table; ``columns`` are ``(key, header)`` pairs."""
    head = "| " + " | ".join(h for _, h in columns) + " |"
    sep = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(fmt(r.get(k), digits) for k, _ in columns) + " |" for r in rows]
    return "\n".join([head, sep, *body])
