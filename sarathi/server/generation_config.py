"""``--generation-config auto|vllm|FOLDER``: the server's default sampling parameters, as vLLM takes them.

A model's ``generation_config.json`` holds its creator's recommended sampling settings. With ``auto`` (the
default) they are read from the model's HF folder (a GGUF file has none); with ``vllm`` they are ignored;
with a folder, they are read from ``FOLDER/generation_config.json``. They become the defaults of requests
that do not set the field themselves: a request's own value always wins.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any

from sarathi.errors import InvalidArgument
from sarathi.sampling_params import SamplingParams

logger = logging.getLogger("sarathi.server")

FIELD = "generation_config"
FILE_NAME = "generation_config.json"
# generation_config.json key -> request / SamplingParams field (vLLM's list; max_new_tokens is max_tokens).
KEYS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
        "repetition_penalty": "repetition_penalty", "max_new_tokens": "max_tokens"}
# transformers.GenerationConfig's own defaults. vLLM reads the file through GenerationConfig.to_diff_dict(),
# which drops values equal to these, so e.g. "top_k": 50 is not applied there; we do the same.
HF_DEFAULTS: dict[str, Any] = {"temperature": 1.0, "top_p": 1.0, "top_k": 50, "repetition_penalty": 1.0}


@dataclasses.dataclass(frozen=True)
class GenerationDefaults:
    """Default sampling parameters (SamplingParams field names) and the file they came from.

    Invariant: ``params`` only holds keys of ``KEYS.values()`` whose values ``SamplingParams`` accepts.
    """

    params: dict[str, Any] = dataclasses.field(default_factory=dict)
    source: str | None = None

    def describe(self) -> str:
        if not self.params:
            return "none"
        return ", ".join(f"{k}={v}" for k, v in self.params.items())


def _model_file(model: str | None) -> str | None:
    """The generation_config.json of the model's HF folder, None for a GGUF model or a folder without one."""
    from sarathi.model.loader import resolve_model

    try:
        src = resolve_model(model)
    except ValueError:  # no checkpoint here (e.g. an engine built around a bare model shape): no file
        return None
    path = os.path.join(src.path, FILE_NAME)
    return path if src.kind == "hf" and os.path.isfile(path) else None


def load_generation_defaults(mode: str | None, model: str | None) -> GenerationDefaults:
    """The defaults for ``--generation-config mode`` of ``--model model``; raises
    ``InvalidArgument("generation_config")`` for a mode that is neither auto, vllm nor a folder with a
    readable file, and for a file whose values SamplingParams refuses (so the server never starts with
    defaults that would fail every request)."""
    mode = "auto" if mode is None else mode
    if mode == "vllm":
        return GenerationDefaults()
    if mode == "auto":
        path = _model_file(model)
        if path is None:
            return GenerationDefaults()
    else:
        folder = os.path.expanduser(mode)
        if not os.path.isdir(folder):
            raise InvalidArgument(FIELD, f"{FIELD}: must be 'auto', 'vllm' or a folder holding {FILE_NAME}; "
                                         f"{mode!r} is not a folder")
        path = os.path.join(folder, FILE_NAME)
        if not os.path.isfile(path):
            raise InvalidArgument(FIELD, f"{FIELD}: the folder {mode!r} has no {FILE_NAME}")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise InvalidArgument(FIELD, f"{FIELD}: cannot read {path}: {e}") from None
    if not isinstance(data, dict):
        raise InvalidArgument(FIELD, f"{FIELD}: {path} must hold a JSON object")
    params = {}
    for key, name in KEYS.items():
        value = data.get(key)
        if value is None or (key in HF_DEFAULTS and value == HF_DEFAULTS[key] and type(value) is not bool):
            continue
        params[name] = value
    try:
        SamplingParams(**params)
    except ValueError as e:
        raise InvalidArgument(FIELD, f"{FIELD}: {path} holds a value the server cannot use: {e}") from None
    return GenerationDefaults(params, path)


def log_generation_defaults(defaults: GenerationDefaults, mode: str | None) -> None:
    """One start-up line saying which defaults requests get, and from where."""
    if defaults.params:
        logger.info("default sampling params from %s (--generation-config %s): %s; a request's own values "
                    "win; --generation-config vllm ignores the file", defaults.source, mode or "auto",
                    defaults.describe())
    else:
        logger.info("default sampling params: none from --generation-config %s (built-in defaults)",
                    mode or "auto")
