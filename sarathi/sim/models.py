"""Model shapes for the simulator: named presets of the paper-scale models, or any HF config.json.

Presets need no weights or tokenizer. Context lengths are raised where the papers ran longer sequences
than the original model card allows (LLaMA-33B and GPT-3 at 3K-4K tokens): the cost model does not care
how positions are encoded. GPT-3 has a plain 2-matrix MLP of width 4h; it is written here as a gated
(3-matrix) MLP of width 8h/3, which has the same weights and FLOPs.
"""

from __future__ import annotations

import json
from pathlib import Path

from sarathi.model.config import ModelConfig


def _llama(hidden: int, inter: int, layers: int, heads: int, kv: int, vocab: int = 32000, ctx: int = 4096,
           arch: str = "LlamaForCausalLM") -> ModelConfig:
    return ModelConfig(arch, vocab, hidden, inter, layers, heads, kv, hidden // heads, 1e-5, 10000.0, ctx,
                       False, torch_dtype="float16", eos_token_ids=(2,))


MODELS: dict[str, ModelConfig] = {
    "llama-2-7b": _llama(4096, 11008, 32, 32, 32),
    "llama-2-13b": _llama(5120, 13824, 40, 40, 40),
    "llama-2-70b": _llama(8192, 28672, 80, 64, 8),
    "llama-13b": _llama(5120, 13824, 40, 40, 40),  # LLaMA-1 13B: the same shape as Llama-2-13B
    "llama-33b": _llama(6656, 17920, 60, 52, 52),  # LLaMA-1 "30B"/"33B"; context raised to 4K (see above)
    "mistral-7b": _llama(4096, 14336, 32, 32, 8, ctx=32768, arch="MistralForCausalLM"),
    "gpt3-175b": _llama(12288, 32768, 96, 96, 96, vocab=50257),
}


def get_model_config(name: str | ModelConfig) -> ModelConfig:
    """A preset by name, the ``config.json`` of an HF folder (or the file itself), a checkpoint (GGUF), or a
    ``ModelConfig`` (e.g. a loaded engine's), returned as it is."""
    if isinstance(name, ModelConfig):
        return name
    if name.lower() in MODELS:
        return MODELS[name.lower()]
    path = Path(name)
    if path.is_dir():
        path = path / "config.json"
    if path.is_file() and path.suffix == ".json":
        return ModelConfig.from_hf(json.loads(path.read_text()))
    if path.exists():  # a checkpoint we can read (GGUF file): its shape, without its weights
        from sarathi.model.loader import load_model_config, resolve_model

        return load_model_config(resolve_model(str(path)))
    raise ValueError(f"model: unknown model {name!r}; choose a preset ({', '.join(sorted(MODELS))}) or "
                     "give an HF config.json / folder")
