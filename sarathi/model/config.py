"""Architecture hyper-parameters of a Llama-family decoder, read from HF config.json or GGUF metadata."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# HF `architectures` entries we implement, and whether their q/k/v projections carry a bias.
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": False,
    "MistralForCausalLM": False,
    "Qwen2ForCausalLM": True,
}


@dataclass
class ModelConfig:
    """Shape of the network. Invariant: ``num_attention_heads % num_key_value_heads == 0``."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool = False
    rope_scaling: dict[str, Any] | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    torch_dtype: str | None = None
    sliding_window: int | None = None

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"model config: {name} must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                "model config: num_attention_heads must be a multiple of num_key_value_heads "
                f"({self.num_attention_heads} vs {self.num_key_value_heads})"
            )
        rope_type = (self.rope_scaling or {}).get("rope_type", (self.rope_scaling or {}).get("type"))
        if rope_type not in (None, "default", "linear", "llama3"):
            raise ValueError(f"model config: rope_scaling type {rope_type!r} is not supported")

    @property
    def max_model_len(self) -> int:
        """Longest sequence we serve exactly: the context, capped by a sliding window we do not model."""
        if self.sliding_window:
            return min(self.max_position_embeddings, self.sliding_window)
        return self.max_position_embeddings

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> ModelConfig:
        archs = cfg.get("architectures") or []
        arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
        if arch is None:
            raise ValueError(
                f"model: unsupported architecture {archs or cfg.get('model_type')!r}; "
                f"supported: {sorted(SUPPORTED_ARCHITECTURES)}"
            )
        try:
            heads = int(cfg["num_attention_heads"])
            hidden = int(cfg["hidden_size"])
            eos = cfg.get("eos_token_id")
            eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
            use_window = cfg.get("use_sliding_window", arch == "MistralForCausalLM")
            # transformers >= 5 writes `rope_parameters` (theta + scaling); older files have both apart.
            rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
            theta = float(rope.pop("rope_theta", cfg.get("rope_theta", 10000.0)))
            if rope.get("rope_type", rope.get("type")) in (None, "default"):
                rope = {}
            return cls(
                architecture=arch,
                vocab_size=int(cfg["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(cfg["intermediate_size"]),
                num_hidden_layers=int(cfg["num_hidden_layers"]),
                num_attention_heads=heads,
                num_key_value_heads=int(cfg.get("num_key_value_heads") or heads),
                head_dim=int(cfg.get("head_dim") or hidden // heads),
                rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
                rope_theta=theta,
                max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
                tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                attention_bias=bool(cfg.get("attention_bias", SUPPORTED_ARCHITECTURES[arch])),
                rope_scaling=rope or None,
                bos_token_id=cfg.get("bos_token_id"),
                eos_token_ids=eos_ids,
                torch_dtype=cfg.get("torch_dtype") or cfg.get("dtype"),
                sliding_window=cfg.get("sliding_window") if use_window else None,
            )
        except KeyError as e:
            raise ValueError(f"model config: missing field {e.args[0]!r} in config.json") from None

    @classmethod
    def from_gguf(cls, meta: dict[str, Any], vocab_size: int) -> ModelConfig:
        arch = meta.get("general.architecture")
        hf_arch = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}.get(arch)
        if hf_arch is None:
            raise ValueError(f"model: unsupported GGUF architecture {arch!r}; supported: llama, qwen2")
        try:
            heads = int(meta[f"{arch}.attention.head_count"])
            hidden = int(meta[f"{arch}.embedding_length"])
            eos = meta.get("tokenizer.ggml.eos_token_id")
            return cls(
                architecture=hf_arch,
                vocab_size=int(meta.get(f"{arch}.vocab_size", vocab_size)),
                hidden_size=hidden,
                intermediate_size=int(meta[f"{arch}.feed_forward_length"]),
                num_hidden_layers=int(meta[f"{arch}.block_count"]),
                num_attention_heads=heads,
                num_key_value_heads=int(meta.get(f"{arch}.attention.head_count_kv", heads)),
                head_dim=int(meta.get(f"{arch}.attention.key_length", hidden // heads)),
                rms_norm_eps=float(meta[f"{arch}.attention.layer_norm_rms_epsilon"]),
                rope_theta=float(meta.get(f"{arch}.rope.freq_base", 10000.0)),
                max_position_embeddings=int(meta.get(f"{arch}.context_length", 2048)),
                tie_word_embeddings=False,  # decided by the loader: no output.weight means tied
                attention_bias=arch == "qwen2",
                bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
                eos_token_ids=(int(eos),) if eos is not None else (),
            )
        except KeyError as e:
            raise ValueError(f"model: GGUF metadata lacks {e.args[0]!r}") from None
