"""Optional C++ CPU kernels, compiled on first use with the machine's compiler and cached.

``decode_attention()`` returns the compiled paged decode-attention function,
``prefill_attention(dtype)`` the prompt-chunk attention for a dtype (AVX-512 CPUs: float32, and bfloat16
with AVX512-BF16) and ``fused_ops(dtype)`` a decoder layer's fused elementwise ops (bf16 and float32,
AVX-512), or None while they are not available (no compiler, a failed build, a CUDA run, or
``SARATHI_KERNELS=0``); callers then use the pure-torch path, which the kernels are parity-tested
against. The build (~30-60 s on 2 cores) runs in a background thread so engine start never waits for it:
steps use the torch path until it is ready. The cache key includes the source hash, the compiler flags,
the torch version and the CPU's flags, because the build uses ``-march=native`` (a cache shared by two CPU
models must not hand one the other's instructions)."""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

logger = logging.getLogger("sarathi")

_SRC = Path(__file__).with_name("decode_attention.cpp")
_SOURCES = [_SRC, _SRC.with_name("prefill_attention.cpp"), _SRC.with_name("fused_ops.cpp")]
_HEADERS = [_SRC.with_name("avx512_math.h")]  # included by the sources: part of the cache key
# -ffp-contract=off: no fused multiply-adds the source does not ask for, so the fused layer ops round as
# torch's separate multiplies and adds do.
_CFLAGS = ["-O3", "-march=native", "-fopenmp", "-ffp-contract=off"]
_lock = threading.Lock()
_state: dict[str, Any] = {"fn": None, "prefill": None, "prefill_dtypes": set(), "ops": None, "thread": None,
                          "error": None}


def enabled() -> bool:
    return os.environ.get("SARATHI_KERNELS", "1") != "0"


def _build_dir() -> tuple[str, Path]:
    import torch

    from sarathi.config import cpu_flags

    key = hashlib.sha256(b"".join(p.read_bytes() for p in _SOURCES + _HEADERS) + torch.__version__.encode()
                         + " ".join(_CFLAGS + sorted(cpu_flags())).encode()).hexdigest()[:12]
    root = Path(os.environ.get("SARATHI_CACHE") or Path.home() / ".cache" / "sarathi")
    name = f"sarathi_decode_attention_{key}"
    return name, root / "kernels" / name


def _exclusive(path: Path) -> Any:
    """An open file holding an exclusive advisory lock (waits for other processes' builds)."""
    import fcntl

    f = open(path, "w")  # closed by the caller (a with block), which releases the lock
    fcntl.flock(f, fcntl.LOCK_EX)
    return f


def _build() -> None:
    from torch.utils import cpp_extension

    name, path = _build_dir()
    path.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    cached = any(path.glob("*.so"))
    try:
        # torch's own build lock is a plain file that a process killed mid-build leaves behind, after
        # which every later build waits for it forever. Builds of this directory run under this flock,
        # which the OS releases when its holder dies: holding it, any torch lock left is stale.
        with _exclusive(path / "sarathi.flock"):
            (path / "lock").unlink(missing_ok=True)
            mod = cpp_extension.load(name, [str(p) for p in _SOURCES], build_directory=str(path),
                                     verbose=False,
                                     extra_cflags=_CFLAGS,
                                     extra_ldflags=["-fopenmp"])
    except Exception as e:  # no compiler, headers, or a broken toolchain: the torch path stays
        _state["error"] = f"{type(e).__name__}: {e}"
        logger.warning("C++ decode-attention kernel unavailable (%s); using the torch path",
                       str(e).splitlines()[0] if str(e) else type(e).__name__)
        return
    _state["fn"] = mod.decode_attention
    _state["prefill"] = mod.prefill_attention
    _state["prefill_dtypes"] = set(mod.prefill_attention_dtypes())
    _state["ops"] = mod if mod.fused_ops_available() else None
    logger.info("C++ decode-attention kernel %s in %.1f s", "loaded" if cached else "built",
                time.perf_counter() - t0)


def start_build(wait: bool = False) -> None:
    """Compile (or load the cached build of) the kernels, in the background unless ``wait``."""
    if not enabled():
        return
    with _lock:
        t = _state["thread"]
        if t is None:
            t = _state["thread"] = threading.Thread(target=_build, name="sarathi-kernel-build", daemon=True)
            t.start()
    if wait:
        t.join()


def decode_attention() -> Callable[..., Any] | None:
    """The compiled kernel, or None if it is not (yet) available."""
    return _state["fn"]


def prefill_attention(dtype: Any) -> Callable[..., Any] | None:
    """The compiled prompt-chunk attention for ``dtype`` (a torch dtype: float32 on CPUs with AVX-512,
    bfloat16 with AVX512-BF16 too), or None."""
    return _state["prefill"] if str(dtype).removeprefix("torch.") in _state["prefill_dtypes"] else None


def fused_ops(dtype: Any) -> Any | None:
    """The module with the fused layer ops (``rms_norm``, ``add_rms_norm``, ``silu_mul``, ``rope_``;
    sarathi/model/llama.py says where each goes) for bf16 or float32 on AVX-512 CPUs, or None: torch ops."""
    return _state["ops"] if str(dtype).removeprefix("torch.") in ("bfloat16", "float32") else None


def build_error() -> str | None:
    return _state["error"]
