"""``--chunk-size auto``: the token budget ``sarathi tune`` recommends for the loaded model on this machine.

``LLMEngine`` calls :func:`auto_chunk_size` when ``chunk_size == "auto"`` (``LLM(chunk_size="auto")``,
``sarathi generate|serve --chunk-size auto``). The inputs, and the default of each:

- **hardware**: the ``local`` spec, this machine as measured by :mod:`sarathi.sim.calibrate`, read from
  ``local_profile_path()`` (``$SARATHI_CACHE/hardware_local.json``, default ~/.cache/sarathi). Without
  one, a quick profile is measured once (logged; 10 s here in bfloat16, about 20 s in float32) and
  cached there.
- **model**: the engine's own ``ModelConfig`` (the loaded checkpoint's shape, not a preset) and the dtype
  the engine runs it in.
- **workload**: P = 1024 prompt and D = P / 10 = 102 output tokens (``sarathi tune``'s defaults), scaled
  down in the same ratio when P + D exceeds ``min(max_model_len, KV-cache tokens)``.
- **batch** B = min(max_num_seqs, KV-cache tokens // (P + D)): no more requests of that length can hold
  their KV at once, so the scheduler never runs a larger batch of them. (2 GiB of KV holds 46,603 float32
  or 93,206 bfloat16 tokens of SmolLM2-135M: B = 41 or 82; max_num_seqs' default 256 would ask for a
  budget no batch reaches.)
- **TBT SLO**: the caller's ``slo_tbt_ms``, else Sarathi-Serve's *relaxed* SLO, 25 x the predicted
  decode-only step of one request at the workload's mean context (P + D / 2).

Decision: :func:`sarathi.sim.tune.choose_budget`, the tuner's own rule (the P:D rule
``C = (B - 1) x P / D`` rounded to the matmul tile, capped by the largest tile multiple whose predicted
full step meets the SLO), clamped to ``[max(16, tile), max_model_len]``. Only the cost model is
evaluated (at most max_model_len / tile budgets, milliseconds); no candidate is simulated.

Why a default SLO, and why the relaxed one, on a CPU: without an SLO the tuner returns the P:D rule
alone, which only asks that every decode can ride along a chunk and ignores what the step then costs.
On this machine's CPU the batch is large (B = 41 in float32, 82 in bfloat16 with the default 2 GiB of KV)
and every sequence of a step carries a host overhead of several ms, so the P:D rule (400 and 816 tokens)
predicts full steps of 2.9 s and 3.1 s: each running request would wait that long for every token.
Sarathi-Serve defines its SLOs relative to the machine, as multiples of a lone decode step (strict 5x,
relaxed 25x), which keeps the rule independent of how fast the CPU is and of the thread count the profile
was measured with. With the full profile of this 2-core EPYC the relaxed SLO gives 320 tokens in float32
(2.4 s SLO; 96% of the best predicted full-step throughput) and 192 in bfloat16 (1.2 s; 62%), and a quick
profile measured in bfloat16 gives 190 (0.93 s); the strict SLO allows no more than one tile (16 tokens,
about 40% of the best throughput). The tuner's full step assumes all B - 1 decodes ride along every
step, which overstates a small budget's step time (with fewer prompt tokens per step, fewer requests are
decoding at once), so the SLO cap is conservative. An interactive target can be given to
:func:`auto_choice` as ``slo_tbt_ms`` (``EngineArgs`` has no field for it yet).

The choice is cached per (model shape, dtype, profile file, max_num_seqs, max_model_len, KV tokens,
tile, P, D, SLO) in ``chunk_size_auto.json`` next to the profile, so a second engine start reads one
small file (under a millisecond). Caveats: the profile is fitted on the default model in the dtype the
default engine ran (``measured.dtype``) with one torch thread, and other models, dtypes and thread
counts are extrapolated by the roofline (the measured peaks of both dtypes, the fitted scales of one);
it describes the device the profile ran on (the CPU, unless the default model ran on a GPU); ``auto``
always means this machine, even for a simulated executor.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sarathi.sim.costmodel import CostModel
from sarathi.sim.hardware import HardwareSpec, local_profile_path
from sarathi.sim.tune import choose_budget, full_step_ms

if TYPE_CHECKING:
    from sarathi.config import EngineArgs
    from sarathi.model.config import ModelConfig

logger = logging.getLogger("sarathi")

DEFAULT_PROMPT_LEN = 1024
DEFAULT_PD_RATIO = 10.0
RELAXED_SLO_FACTOR = 25.0  # Sarathi-Serve: relaxed TBT SLO = 25 x a lone decode step (strict: 5 x)
MIN_CHUNK = 16
RULE_VERSION = 1  # bump when the decision changes, so cached choices are recomputed
MAX_CACHE_ENTRIES = 64
SHAPE_FIELDS = ("architecture", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "head_dim", "tie_word_embeddings")


@dataclass
class AutoChoice:
    """What ``--chunk-size auto`` chose and from what. Invariant:
    ``1 <= chunk_size <= max_model_len`` and ``chunk_size >= min(max(16, tile), max_model_len)``."""

    chunk_size: int
    pd_rule: int
    slo_max: int | None
    slo_tbt_ms: float
    slo_default: bool  # True: the relaxed SLO (25 x a lone decode step), not the caller's
    B: int
    P: int
    D: int
    tile: int
    step_ms: float  # predicted full step at the chosen budget
    kv_tokens: int
    max_model_len: int
    dtype: str
    profile: str  # the profile file it was computed from
    cached: bool = False
    inputs: dict[str, Any] = field(default_factory=dict)

    def tune_command(self, model: str) -> str:
        """The ``sarathi tune`` invocation that prints the same recommendation."""
        pp = self.inputs.get("pp", 1)
        return (f"sarathi tune --model {model} --hardware local{f' --pp {pp}' if pp > 1 else ''} "
                f"--max-num-seqs {self.B} --prompt-len {self.P} --output-len {self.D} --slo-tbt-ms "
                f"{self.slo_tbt_ms:.3f} --tile-size {self.tile} --dtype {self.dtype} --no-simulate")


def cache_path() -> Path:
    """The cache of decisions: next to the profile (``$SARATHI_CACHE`` or ~/.cache/sarathi)."""
    return local_profile_path().with_name("chunk_size_auto.json")


def workload_defaults(limit: int, prompt_len: int | None = None, output_len: int | None = None,
                      ) -> tuple[int, int]:
    """Typical (P, D): the given ones or tune's defaults (1024, P / 10), scaled down in proportion so that
    P + D <= ``limit`` (the longest request the engine can hold). Both are >= 1."""
    P = prompt_len or DEFAULT_PROMPT_LEN
    D = output_len or max(1, round(P / DEFAULT_PD_RATIO))
    if P + D > limit:
        D = max(1, int(limit * D / (P + D)))
        P = max(1, limit - D)
    return P, D


def lone_decode_ms(cost: CostModel, context: int) -> float:
    """Predicted decode-only step of a single request attending to ``context`` tokens."""
    return cost.step([], [context]).total_s * 1e3


def _default_model() -> str:
    from sarathi.model.loader import default_model_path

    try:
        return default_model_path()
    except ValueError:
        return "<default model .gguf>"


def _engine_dtype(args: EngineArgs, model_config: ModelConfig) -> str:
    return str(args.torch_dtype(model_config.torch_dtype)).removeprefix("torch.")


def _load_profile() -> tuple[HardwareSpec, str, Path]:
    """The local spec (measured now if missing) and a digest of its file."""
    from sarathi.sim.calibrate import ensure_local_profile

    path = local_profile_path()
    try:
        spec = ensure_local_profile()
    except ValueError as e:  # e.g. the default model package, needed to measure, is missing
        from sarathi.errors import InvalidArgument

        raise InvalidArgument("chunk_size", f"chunk_size auto needs a profile of this machine at {path}: {e}"
                              ) from e
    return spec, hashlib.sha256(path.read_bytes()).hexdigest()[:16], path


def _read_cache() -> dict[str, Any]:
    try:
        data = json.loads(cache_path().read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):  # missing or damaged: recompute (it is cheap)
        return {}


def _write_cache(key: str, entry: dict[str, Any]) -> None:
    data = _read_cache()
    data[key] = entry
    if len(data) > MAX_CACHE_ENTRIES:  # drop the oldest
        for k in sorted(data, key=lambda k: data[k].get("created", 0))[:len(data) - MAX_CACHE_ENTRIES]:
            del data[k]
    path = cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
        os.replace(tmp, path)
    except OSError as e:  # a read-only cache costs a recomputation next time, nothing else
        logger.warning("chunk_size auto: cannot cache the choice at %s: %s", path, e)


def auto_choice(args: EngineArgs, model_config: ModelConfig, *, num_kv_tokens: int | None = None,
                dtype: str | None = None, prompt_len: int | None = None, output_len: int | None = None,
                slo_tbt_ms: float | None = None) -> AutoChoice:
    """The budget ``--chunk-size auto`` runs with, and why (see the module docstring).

    ``num_kv_tokens``: the engine's KV-cache size in tokens (default: from ``num_kv_blocks`` or
    ``kv_cache_memory`` as the engine computes it); ``dtype``: what the engine runs in (default: the
    ``EngineArgs.dtype`` rule). Deterministic for the same inputs and profile file; the second call with
    them reads the cache and measures nothing.
    """
    spec, digest, profile = _load_profile()
    dtype = dtype or _engine_dtype(args, model_config)
    pp = max(1, args.pipeline_parallel_size)
    cost = CostModel(model_config, spec, dtype, 1, pp)
    max_len = args.resolved_max_model_len(model_config)
    if num_kv_tokens is None:
        num_kv_tokens = (args.num_kv_blocks * args.block_size if args.num_kv_blocks
                         else args.kv_cache_bytes() // cost.kv_bytes_per_token())
    P, D = workload_defaults(max(2, min(max_len, num_kv_tokens)), prompt_len, output_len)
    B = max(1, min(args.max_num_seqs, num_kv_tokens // (P + D)))
    tile = args.tile_size or spec.tile
    inputs = {"rule": RULE_VERSION, "model": {k: getattr(model_config, k) for k in SHAPE_FIELDS},
              "dtype": dtype, "profile": digest, "pp": pp, "max_num_seqs": args.max_num_seqs,
              "max_model_len": max_len, "kv_tokens": num_kv_tokens, "tile": tile, "P": P, "D": D,
              "slo_tbt_ms": slo_tbt_ms}
    key = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:24]
    hit = _read_cache().get(key)
    if isinstance(hit, dict) and hit.get("inputs") == inputs:
        try:
            choice = AutoChoice(**{k: v for k, v in hit.items() if k not in ("created", "cached")},
                                cached=True)
        except TypeError:  # an entry edited by hand: recompute it
            pass
        else:
            logger.info("chunk_size auto: %d (cached for this model and profile)", choice.chunk_size)
            return choice
    slo_default = slo_tbt_ms is None
    slo = RELAXED_SLO_FACTOR * lone_decode_ms(cost, P + D // 2) if slo_tbt_ms is None else slo_tbt_ms
    chosen, pd, slo_max = choose_budget(cost, B, P, D, tile, slo, max_budget=max(tile, max_len))
    chunk = min(max(chosen, MIN_CHUNK, tile), max_len)
    step = full_step_ms(cost, chunk, B, P, D)
    choice = AutoChoice(chunk, pd, slo_max, slo, slo_default, B, P, D, tile, step, num_kv_tokens, max_len,
                        dtype, str(profile), inputs=inputs)
    _write_cache(key, {**asdict(choice), "created": time.time()})
    logger.info("chunk_size auto: %d (P:D rule %d for B %d, P %d, D %d; %s TBT SLO %.0f ms allows up to %s; "
                "tile %d; predicted full step %.0f ms on %s); the same as `%s`", chunk, pd, B, P, D,
                "relaxed" if slo_default else "given", slo, slo_max, tile, choice.step_ms, profile,
                choice.tune_command(args.model or _default_model()))
    return choice


def auto_chunk_size(args: EngineArgs, model_config: ModelConfig, **kwargs: Any) -> int:
    """``--chunk-size auto``: the budget for ``model_config`` on this machine (keyword arguments: see
    :func:`auto_choice`). A positive int within ``[min(max(16, tile), max_model_len), max_model_len]``."""
    return auto_choice(args, model_config, **kwargs).chunk_size
