"""Scheduling policies behind one interface; ``make_scheduler`` picks one by name."""

from __future__ import annotations

from sarathi.kv_cache import BlockManager
from sarathi.scheduler.base import (
    ScheduledRequest,
    Scheduler,
    SchedulerConfig,
    SchedulerOutput,
    SeqUpdate,
)
from sarathi.scheduler.baselines import OrcaScheduler, RequestLevelScheduler, VllmScheduler
from sarathi.scheduler.plan import ModelOutput, SampledToken, SamplingSpec, SeqPlan, StepPlan
from sarathi.scheduler.sarathi import SarathiScheduler

SCHEDULERS: dict[str, type[Scheduler]] = {
    cls.name: cls for cls in (SarathiScheduler, VllmScheduler, OrcaScheduler, RequestLevelScheduler)
}


def make_scheduler(config: SchedulerConfig, kv: BlockManager) -> Scheduler:
    try:
        cls = SCHEDULERS[config.policy]
    except KeyError:
        raise ValueError(
            f"scheduler: unknown scheduler {config.policy!r}; choose one of {sorted(SCHEDULERS)}"
        ) from None
    return cls(config, kv)


__all__ = [
    "SCHEDULERS", "ModelOutput", "SampledToken", "SamplingSpec", "ScheduledRequest", "Scheduler",
    "SchedulerConfig", "SchedulerOutput", "SeqPlan", "SeqUpdate", "StepPlan", "make_scheduler",
]
