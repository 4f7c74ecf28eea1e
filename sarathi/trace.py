"""Chrome / Perfetto traces of engine steps (``--trace FILE.json``, ``LLM(trace=...)``).

A ``Tracer`` collects complete ("X") events and writes them as one JSON object
``{"traceEvents": [...], "displayTimeUnit": "ms", "otherData": {...}}`` that ``json.load``,
chrome://tracing and ui.perfetto.dev all read. Two shapes, one per executor kind:

- the pipeline executor records its own spans: one track (tid) per stage, and per micro-batch the
  receive of its input, its compute and the issuing of its sends as separate events (cat ``comm`` /
  ``compute``), on ``time.perf_counter`` (one clock for every rank of a host);
- any other executor (local, simulated): the engine records one event per step, from scheduling to the
  executor's result, on the engine's clock (virtual under the simulator). With several plans in flight
  (a simulated pipeline) each goes to its own lane, so the events of one track never overlap.

Every event's ``args`` carry ``step``, ``prompt_tokens``, ``decode_tokens`` and ``seqs``.

Memory is bounded by keeping only the newest ``max_spans`` spans in a ring buffer; the number of older
ones dropped is written into ``otherData``. Why a ring buffer and not streaming to the file: a
long-running server would grow a streamed file without bound, and a streamed JSON array is left
unterminated (not loadable by ``json.load``) whenever the process dies before closing it. Here the
file is always written whole, atomically (temporary file, then rename), when the engine shuts down
(``LLM.close()``, the LLM or engine being garbage collected, server shutdown, interpreter exit) or on
``LLMEngine.write_trace()``; each write rewrites the file with everything still held. The cost: a
process killed with SIGKILL writes nothing, and events older than the newest ``max_spans`` are lost.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sarathi.executor.pipeline import StageTiming
    from sarathi.scheduler.plan import StepPlan

# ~250 bytes per held span: 100k spans (100k local steps, ~20k micro-batches of a PP=2 pipeline) ~ 25 MB.
MAX_SPANS = 100_000
MAX_INSTANTS = 1_000

# A span: (tid, kind, start_s, end_s, step, prompt_tokens, decode_tokens, seqs); kind is "compute",
# "recv" or "send". Tuples, not dicts: a third of the memory, and rendered only when written.
Span = tuple[int, str, float, float, int, int, int, int]


def step_kind(num_prompt_tokens: int, num_decode_tokens: int) -> str:
    """``prefill`` (prompt tokens only), ``decode`` (decode tokens only) or ``mixed`` (piggybacked)."""
    return "prefill" if num_decode_tokens == 0 else "decode" if num_prompt_tokens == 0 else "mixed"


def span_event(span: Span, base: float, pid: int = 0) -> dict[str, Any]:
    """One "X" event (microseconds from ``base``) for ``span``."""
    tid, kind, start, end, step, prompt, decode, seqs = span
    name = f"{step_kind(prompt, decode)} {step}" if kind == "compute" else f"{kind} {step}"
    return {"ph": "X", "pid": pid, "tid": tid, "cat": "compute" if kind == "compute" else "comm",
            "name": name, "ts": round((start - base) * 1e6, 3), "dur": round((end - start) * 1e6, 3),
            "args": {"step": step, "prompt_tokens": prompt, "decode_tokens": decode, "seqs": seqs}}


def stage_spans(t: StageTiming) -> Iterator[Span]:
    """A pipeline stage's micro-batch as spans: receive, compute, send (empty intervals left out)."""
    for kind, iv in (("recv", t.recv), ("compute", t.compute), ("send", t.send)):
        if iv is not None and (iv[1] > iv[0] or kind == "compute"):
            yield (t.stage, kind, iv[0], iv[1], t.step_id, t.num_prompt_tokens, t.num_decode_tokens,
                   t.num_seqs)


def metadata_events(process: str, tracks: dict[int, str], pid: int = 0) -> list[dict[str, Any]]:
    """Perfetto's process and track names ("M" events), tracks in tid order."""
    events: list[dict[str, Any]] = [{"ph": "M", "name": "process_name", "pid": pid, "tid": 0,
                                     "args": {"name": process}}]
    for tid, name in sorted(tracks.items()):
        events.append({"ph": "M", "name": "thread_name", "pid": pid, "tid": tid, "args": {"name": name}})
        events.append({"ph": "M", "name": "thread_sort_index", "pid": pid, "tid": tid,
                       "args": {"sort_index": tid}})
    return events


def chrome_trace(timings: list[StageTiming], t0: float | None = None,
                 name: str = "pipeline") -> list[dict[str, Any]]:
    """Chrome / Perfetto trace events ("X" complete events, microseconds) of pipeline stage timings: one
    track (tid) per stage, compute and communication as separate slices, token counts as args."""
    if not timings:
        return []
    base = min((t.recv or t.compute)[0] for t in timings) if t0 is None else t0
    tracks = {s: f"stage {s}" for s in sorted({t.stage for t in timings})}
    return metadata_events(name, tracks) + [span_event(s, base) for t in timings for s in stage_spans(t)]


class Tracer:
    """Spans of engine steps or pipeline stages, written as one Chrome / Perfetto JSON file.

    Invariants: at most ``max_spans`` spans are held (the newest; ``dropped`` counts the others); every
    ``write()`` rewrites the whole file atomically, so the file on disk is always complete JSON; spans
    are added by the engine thread while ``write()`` may run on another (a lock guards the buffers).
    ``clock`` is the time source of the spans' timestamps, and ``base`` (its value when the tracer was
    made) is time zero in the file.
    """

    def __init__(self, path: str | os.PathLike[str], clock: Callable[[], float] = time.perf_counter,
                 process: str = "sarathi", max_spans: int = MAX_SPANS) -> None:
        self.path = Path(path)
        self.clock = clock
        self.base = clock()
        self.process = process
        self.tracks: dict[int, str] = {}
        self.max_spans = max_spans
        self.dropped = 0
        self._spans: deque[Span] = deque(maxlen=max_spans)
        self._instants: deque[tuple[str, float, dict[str, Any]]] = deque(maxlen=MAX_INSTANTS)
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._spans)

    def add(self, spans: Iterable[Span]) -> None:
        with self._lock:
            for s in spans:
                if len(self._spans) == self.max_spans:
                    self.dropped += 1
                self._spans.append(s)

    def add_step(self, plan: StepPlan, start: float, end: float, tid: int = 0) -> None:
        """One engine step (scheduled at ``start``, result at ``end``, both on ``clock``)."""
        self.add([(tid, "compute", start, end, plan.step_id, plan.num_prompt_tokens, plan.num_decode_tokens,
                   len(plan.seqs))])

    def add_stage_timings(self, timings: Iterable[StageTiming]) -> None:
        self.add(s for t in timings for s in stage_spans(t))

    def instant(self, name: str, args: dict[str, Any] | None = None) -> None:
        """A marker across the whole process (e.g. a reconfiguration), at ``clock()`` now."""
        with self._lock:
            self._instants.append((name, self.clock(), dict(args or {})))

    def _events(self) -> Iterator[dict[str, Any]]:
        with self._lock:
            spans, instants, dropped = list(self._spans), list(self._instants), self.dropped
        yield from metadata_events(self.process, self.tracks)
        if dropped:
            first = spans[0][2] if spans else self.base
            yield {"ph": "i", "s": "g", "pid": 0, "tid": 0, "name": f"{dropped} older spans dropped",
                   "ts": (first - self.base) * 1e6, "args": {"dropped_spans": dropped}}
        for name, at, args in instants:
            yield {"ph": "i", "s": "p", "pid": 0, "tid": 0, "name": name, "ts": (at - self.base) * 1e6,
                   "args": args}
        for s in spans:
            yield span_event(s, self.base)

    def write(self) -> Path:
        """Write everything held now to ``path`` (atomically; any number of times)."""
        other = {"generator": "sarathi", "max_spans": self.max_spans, "dropped_spans": self.dropped,
                 "note": f"only the newest {self.max_spans} spans are kept; {self.dropped} older ones "
                         "were dropped" if self.dropped else "complete: no span was dropped"}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        with open(tmp, "w") as f:  # one event per line: no second copy of the whole trace in memory
            f.write('{"displayTimeUnit": "ms", "otherData": ' + json.dumps(other) + ', "traceEvents": [\n')
            for i, e in enumerate(self._events()):
                f.write(("" if i == 0 else ",\n") + json.dumps(e, separators=(",", ":")))
            f.write("\n]}\n")
        os.replace(tmp, self.path)
        return self.path
