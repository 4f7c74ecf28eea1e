"""Executors by name. The engine asks for a class here and never imports a concrete executor, so an
executor's heavy dependencies (torch, torch.distributed, ...) load only when it is chosen."""

from __future__ import annotations

import importlib

from sarathi.executor.base import Executor

# name -> "module:Class"; the pipeline-parallel and simulated executors register here too.
EXECUTORS: dict[str, str] = {
    "local": "sarathi.executor.local:LocalExecutor",
    "pipeline": "sarathi.executor.pipeline:PipelineExecutor",
    "simulated": "sarathi.executor.simulated:SimulatedExecutor",
}


def get_executor_class(name: str) -> type[Executor]:
    try:
        module, cls = EXECUTORS[name].split(":")
    except KeyError:
        raise ValueError(f"executor: unknown executor {name!r}; choose one of {sorted(EXECUTORS)}") from None
    return getattr(importlib.import_module(module), cls)


__all__ = ["EXECUTORS", "Executor", "get_executor_class"]
