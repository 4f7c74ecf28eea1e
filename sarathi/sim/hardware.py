"""Hardware specs for the cost model: peak FLOP/s per dtype, memory bandwidth and size, the matmul tile
(the tile quantization staircase), interconnects for tensor and pipeline parallelism, and overheads.

GPU numbers are the vendors' dense (no sparsity) tensor-core peaks and memory bandwidths. The
efficiencies say how much of a peak real kernels reach; the A6000's are fitted to the SARATHI paper's
own LLaMA-13B timings (1024 prompt tokens in 234.8 ms: 72% of peak; 4 decodes at context 1024 in
49.96 ms: ~80% of bandwidth), and the other GPUs reuse them. ``local`` is measured on this machine by
``sarathi simulate --profile-hardware`` and cached as JSON (see :mod:`sarathi.sim.calibrate`).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

GiB = 1024**3


@dataclass
class HardwareSpec:
    """One accelerator (per-device numbers) and the links between devices.

    ``linear_scale`` / ``attention_scale`` / ``other_scale`` multiply the roofline time of each part;
    they are 1 for the GPU specs and fitted by calibration for a measured machine, whose kernels may
    sit far from the roofline (a CPU running small matmuls from Python).
    """

    name: str
    peak_flops: dict[str, float]  # dtype -> FLOP/s
    mem_bw: float  # bytes/s
    memory_bytes: float
    tile: int = 128  # GEMM rows computed per tile: M is padded to a multiple of this
    matmul_efficiency: float = 0.72
    attention_efficiency: float = 0.5
    bw_efficiency: float = 0.8
    tp_bw: float = 300e9  # bytes/s per device, per direction, between tensor-parallel peers
    tp_latency: float = 5e-6  # seconds per collective step
    pp_bw: float = 25e9  # bytes/s between pipeline stages (often across nodes)
    pp_latency: float = 10e-6
    layer_overhead_s: float = 25e-6  # kernel launches and small ops per decoder layer
    step_overhead_s: float = 0.0  # fixed per step (scheduling, input preparation, sampling)
    token_overhead_s: float = 0.0  # per scheduled token (host-side input preparation)
    seq_overhead_s: float = 0.0  # per scheduled sequence (block tables, sampler rows)
    # The local executor attends a decode batch as one padded SDPA call over the longest context (each
    # decode costs the maximum), where GPU paged-attention kernels read each decode's own KV only.
    decode_attention_padded: bool = False
    linear_scale: float = 1.0
    attention_scale: float = 1.0
    other_scale: float = 1.0
    notes: str = ""
    measured: dict[str, Any] = field(default_factory=dict)

    def flops(self, dtype: str) -> float:
        """Peak FLOP/s for ``dtype`` (float16 and bfloat16 share tensor cores)."""
        if dtype in self.peak_flops:
            return self.peak_flops[dtype]
        alias = {"float16": "bfloat16", "bfloat16": "float16"}.get(dtype)
        if alias in self.peak_flops:
            return self.peak_flops[alias]
        raise ValueError(f"hardware: {self.name} has no peak for dtype {dtype!r} "
                         f"(has {sorted(self.peak_flops)})")

    @property
    def is_gpu(self) -> bool:
        return self.name != "local" and not self.name.startswith("local")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> HardwareSpec:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def save(self, path: str | Path) -> Path:
        """Write the spec as JSON, atomically (a temporary file renamed over ``path``), so a reader never
        sees half a profile even when two processes measure this machine at once."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=2) + "\n")
        os.replace(tmp, path)
        return path


HARDWARE: dict[str, HardwareSpec] = {
    "a6000": HardwareSpec(
        "a6000", {"float16": 154.8e12, "bfloat16": 154.8e12, "float32": 38.7e12}, 768e9, 48 * GiB,
        tp_bw=25e9, tp_latency=10e-6, pp_bw=25e9,  # PCIe 4.0 x16 between cards
        notes="RTX A6000 48GB; efficiencies fitted to the SARATHI paper's LLaMA-13B timings"),
    "a100-80gb": HardwareSpec(
        "a100-80gb", {"float16": 312e12, "bfloat16": 312e12, "float32": 19.5e12}, 2039e9, 80 * GiB,
        tp_bw=300e9, pp_bw=25e9,  # NVLink 3 within a node; 200 Gb/s InfiniBand between nodes
        notes="A100 SXM 80GB"),
    "h100": HardwareSpec(
        "h100", {"float16": 989e12, "bfloat16": 989e12, "float32": 67e12}, 3350e9, 80 * GiB,
        tp_bw=450e9, pp_bw=50e9, layer_overhead_s=15e-6,  # NVLink 4; 400 Gb/s InfiniBand
        notes="H100 SXM 80GB"),
    "h200": HardwareSpec(
        "h200", {"float16": 989e12, "bfloat16": 989e12, "float32": 67e12}, 4800e9, 141e9,
        tp_bw=450e9, pp_bw=50e9, layer_overhead_s=15e-6,
        notes="H200 SXM 141GB"),
}
ALIASES = {"a100": "a100-80gb", "rtx-a6000": "a6000", "h100-sxm": "h100", "h200-sxm": "h200"}


def local_profile_path() -> Path:
    """Where the measured spec of this machine is cached (``$SARATHI_CACHE`` or ~/.cache/sarathi)."""
    root = Path(os.environ.get("SARATHI_CACHE") or Path.home() / ".cache" / "sarathi")
    return root / "hardware_local.json"


def get_hardware(name: str | HardwareSpec) -> HardwareSpec:
    """A preset by name, ``local`` (the cached profile of this machine), or a spec JSON file."""
    if isinstance(name, HardwareSpec):
        return name
    key = ALIASES.get(name.lower(), name.lower())
    if key in HARDWARE:
        return HARDWARE[key]
    if key == "local":
        path = local_profile_path()
        if not path.exists():
            raise ValueError(f"hardware: no profile of this machine at {path}; measure it with "
                             "`sarathi simulate --profile-hardware` (`sarathi tune/simulate --hardware "
                             "local` and `--chunk-size auto` measure a quick one on first use; "
                             "$SARATHI_CACHE moves the cache)")
        return HardwareSpec.from_json(json.loads(path.read_text()))
    if name.endswith(".json") and Path(name).exists():
        return HardwareSpec.from_json(json.loads(Path(name).read_text()))
    raise ValueError(f"hardware: unknown hardware {name!r}; choose one of {sorted(HARDWARE)}, local, "
                     "or a spec .json file")
