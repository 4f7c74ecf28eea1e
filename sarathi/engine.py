"""LLMEngine: one loop of schedule -> execute -> update. The server and ``LLM`` both build on it."""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Any

from sarathi.config import DEFAULT_CHUNK_SIZE, EngineArgs
from sarathi.executor.local import LocalExecutor, SampledToken
from sarathi.kv_cache import BlockManager
from sarathi.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from sarathi.request import Request, RequestStatus
from sarathi.sampling_params import SEED_MAX, SamplingParams
from sarathi.scheduler import SchedulerConfig, SchedulerOutput, make_scheduler
from sarathi.tokenizer import IncrementalDetokenizer, Tokenizer

logger = logging.getLogger("sarathi")

PromptType = str | list[int] | dict[str, Any]


@dataclass
class StepRecord:
    """What one engine step ran (for benchmarks and metrics)."""

    step: int
    start: float
    duration: float
    num_prompt_tokens: int
    num_decode_tokens: int
    num_requests: int
    num_preempted: int
    num_recomputed_tokens: int = 0  # KV tokens discarded by this step's preemptions (computed again later)
    num_failed: int = 0  # requests that failed inside this step (their batch-mates were not affected)


@dataclass
class RequestGroup:
    """A user request: ``n`` sequences sharing one prompt and one id."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    seqs: list[Request]
    metrics: RequestMetrics
    aborted: bool = False
    error: str | None = None  # why the group failed inside a step, if it did

    @property
    def finished(self) -> bool:
        return all(s.finished for s in self.seqs)


class EngineStepError(RuntimeError):
    """Requests failed inside a step. ``LLMEngine.step`` no longer raises it (a failing request comes
    back as a finished ``RequestOutput`` with ``error`` set); kept for code that catches it."""

    def __init__(self, request_ids: list[str], cause: BaseException) -> None:
        super().__init__(f"engine step failed for requests {request_ids}: {cause!r}")
        self.request_ids = request_ids


@dataclass
class EngineStats:
    steps: deque[StepRecord] = field(default_factory=lambda: deque(maxlen=1_000_000))
    num_steps: int = 0


class LLMEngine:
    """Continuous-batching engine. Not thread-safe: drive it from one thread."""

    def __init__(self, args: EngineArgs) -> None:
        from sarathi.model.loader import load_model, load_model_config, resolve_model

        args.check()
        self.args = args
        src = resolve_model(args.model)
        self.model_config = cfg = load_model_config(src)
        self.model_name = args.model or "SmolLM2-135M-Instruct"
        self.max_model_len = min(cfg.max_model_len, args.max_model_len or cfg.max_model_len)
        self.tokenizer = Tokenizer.load(src)
        self.eos_token_ids = tuple(dict.fromkeys(
            [*cfg.eos_token_ids, *([self.tokenizer.eos_token_id]
                                   if self.tokenizer.eos_token_id is not None else [])]))
        device, dtype = args.torch_device(), args.torch_dtype(cfg.torch_dtype)
        self.dtype = dtype
        model = load_model(src, cfg, dtype, device, self.max_model_len)
        self._model = model
        self.groups: dict[str, RequestGroup] = {}
        self.stats = EngineStats()
        self._build_runtime()
        logger.info("engine ready: %s, %s on %s, %d KV blocks x %d tokens, scheduler %s",
                    self.model_name, dtype, device, self.kv.num_blocks, args.block_size, args.scheduler)

    def _build_runtime(self) -> None:
        """(Re)build the KV cache, scheduler and executor around the loaded model."""
        args, cfg = self.args, self.model_config
        per_block = LocalExecutor.kv_bytes_per_block(cfg, args.block_size, self.dtype)
        num_blocks = args.num_kv_blocks or max(1, args.kv_cache_bytes() // per_block)
        self.kv = BlockManager(num_blocks, args.block_size)
        if args.scheduler == "sarathi":
            budget = args.chunk_size or args.max_num_batched_tokens or DEFAULT_CHUNK_SIZE
        else:
            budget = args.max_num_batched_tokens or max(self.max_model_len, 16384)
        self.scheduler = make_scheduler(
            SchedulerConfig(args.scheduler, args.max_num_seqs, budget, args.tile_size), self.kv)
        self.executor = None  # drop the old KV tensors before allocating new ones
        self.executor = LocalExecutor(self._model, cfg, num_blocks, args.block_size, self.dtype,
                                      args.torch_device(), self.eos_token_ids, args.seed)

    RUNTIME_FIELDS = ("scheduler", "chunk_size", "max_num_seqs", "max_num_batched_tokens", "tile_size",
                      "block_size", "num_kv_blocks", "kv_cache_memory", "seed")

    def reconfigure(self, **changes: Any) -> None:
        """Switch scheduler policy / budget / KV size without reloading the model (sarathi extension,
        used to compare policies on one loaded model). Only allowed while no request is in flight."""
        bad = set(changes) - set(self.RUNTIME_FIELDS)
        if bad:
            raise ValueError(f"reconfigure: cannot change {sorted(bad)}; allowed: {self.RUNTIME_FIELDS}")
        if self.has_unfinished_requests():
            raise RuntimeError("reconfigure: requests are still running")
        args = replace(self.args, **changes)
        args.check()
        self.args = args
        self._build_runtime()

    @classmethod
    def from_engine_args(cls, args: EngineArgs) -> LLMEngine:
        return cls(args)

    # ---- requests ---------------------------------------------------------------------------
    def make_request(self, request_id: str, prompt: PromptType, params: SamplingParams | None = None,
                     arrival_time: float | None = None) -> RequestGroup:
        """Validate and tokenize a request without queueing it (raises ValueError naming the field)."""
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise ValueError("sampling_params must be a SamplingParams")
        text, ids = self._tokenize(prompt)
        if not ids:
            raise ValueError("prompt: must not be empty")
        vocab = self.model_config.vocab_size
        if any(not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab for t in ids):
            raise ValueError(f"prompt: token ids must be integers in [0, {vocab})")
        if any(t >= vocab for t in params.stop_token_ids):
            raise ValueError(f"stop_token_ids: token ids must be in [0, {vocab})")
        if len(ids) >= self.max_model_len:
            raise ValueError(f"prompt: {len(ids)} tokens, but the model's context (max_model_len) is "
                             f"{self.max_model_len} and at least one token must be generated")
        room = self.max_model_len - len(ids)
        max_tokens = room if params.max_tokens is None else params.max_tokens
        if max_tokens > room:
            raise ValueError(f"max_tokens: {max_tokens} + {len(ids)} prompt tokens exceed the model's "
                             f"context of {self.max_model_len} tokens")
        kv_slots = self.kv.num_blocks * self.kv.block_size
        if len(ids) + max_tokens > kv_slots:
            raise ValueError(f"max_tokens: prompt + max_tokens = {len(ids) + max_tokens} tokens do not "
                             f"fit in the KV cache ({kv_slots} tokens)")
        now = time.time() if arrival_time is None else arrival_time
        seqs = []
        for i in range(params.n):
            p = params
            if params.n > 1 and params.seed is not None:  # distinct but reproducible samples
                seed = params.seed + i
                seed -= 2**64 if seed > SEED_MAX else 0  # wrap around, staying a valid 64-bit seed
                p = SamplingParams(**{**_fields(params), "seed": seed})
            seq_id = request_id if params.n == 1 else f"{request_id}#{i}"
            r = Request(seq_id, ids, p, arrival_time=now, max_tokens=max_tokens, group_id=request_id)
            r.detok = IncrementalDetokenizer(self.tokenizer, ids, p.skip_special_tokens)
            r.logprobs = [] if p.logprobs is not None else None
            seqs.append(r)
        return RequestGroup(request_id, text, ids, seqs, RequestMetrics(arrival_time=now))

    def add_group(self, group: RequestGroup) -> None:
        if group.request_id in self.groups:
            raise ValueError(f"request_id: {group.request_id!r} is already in use")
        self.groups[group.request_id] = group
        for s in group.seqs:
            self.scheduler.add_request(s)

    def add_request(self, request_id: str, prompt: PromptType, params: SamplingParams | None = None,
                    arrival_time: float | None = None) -> None:
        self.add_group(self.make_request(request_id, prompt, params, arrival_time))

    def abort_request(self, request_id: str | list[str]) -> None:
        for rid in [request_id] if isinstance(request_id, str) else request_id:
            group = self.groups.pop(rid, None)
            if group is None:
                continue
            group.aborted = True
            for s in group.seqs:
                self.scheduler.finish_request(s, RequestStatus.FINISHED_ABORTED)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    def get_num_unfinished_requests(self) -> int:
        return len(self.groups)

    # ---- the loop ---------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one iteration; return the (cumulative) output of every request that advanced.

        A request that fails inside the step (model or sampler) is finished with ``error`` set in its
        output; the requests batched with it get their tokens as if it had not been there.
        """
        start = time.time()
        t0 = time.perf_counter()
        batch = self.scheduler.schedule()
        if batch.is_empty:
            return []
        sampled, failures = self._execute_isolated(batch)
        now = time.time()
        touched: dict[str, RequestGroup] = {}
        failed_groups: dict[str, str] = {}
        for req, err in failures.items():
            failed_groups.setdefault(req.group_id, f"{type(err).__name__}: {err}")
        for gid, msg in failed_groups.items():
            g = self.groups[gid]
            logger.error("request %s failed inside a step and was stopped: %s", gid, msg)
            g.error = msg
            for s in g.seqs:
                self.scheduler.finish_request(s, RequestStatus.FINISHED_ERROR)
            touched[gid] = g
        for e in batch.scheduled:
            req = e.request
            if req.group_id in failed_groups:
                continue
            req.num_computed_tokens += e.num_new_tokens
            g = self.groups[req.group_id]
            if g.metrics.first_scheduled_time is None:
                g.metrics.first_scheduled_time = start
        for s in sampled:
            if s.request.group_id in failed_groups:
                continue  # a sibling sequence (n > 1) failed: the whole group has finished
            g = self.groups[s.request.group_id]
            self._append_token(s, g)
            touched[g.request_id] = g
            if g.metrics.first_token_time is None:
                g.metrics.first_token_time = now
            g.metrics.last_token_time = now
        self.stats.num_steps += 1
        self.stats.steps.append(StepRecord(
            self.stats.num_steps, start, time.perf_counter() - t0, batch.num_prompt_tokens,
            batch.num_decode_tokens, len(batch.scheduled), len(batch.preempted),
            batch.num_recomputed_tokens, len(failed_groups)))
        outputs = []
        for g in touched.values():
            if g.finished:
                g.metrics.finished_time = now
                del self.groups[g.request_id]
            outputs.append(self._output(g))
        return outputs

    def _execute_isolated(self, batch: SchedulerOutput) -> tuple[list[SampledToken],
                                                                 dict[Request, BaseException]]:
        """Execute ``batch``; if it fails, bisect it to find the request(s) that make it fail.

        Retrying is safe: a sub-batch writes the same K/V slots with the same values, and seeded noise
        depends only on (seed, position). Costs nothing unless a step fails, then O(k log n) forwards
        for k failing requests among n. Greedy tokens do not depend on the batch composition, so the
        innocent requests get exactly the tokens they would have got.
        """
        try:
            return self.executor.execute(batch), {}
        except Exception as e:  # any failure is pinned to the request(s) that cause it, below
            if len(batch.scheduled) == 1:
                logger.error("step failed for request %s", batch.scheduled[0].request.request_id,
                             exc_info=e)
                return [], {batch.scheduled[0].request: e}
            logger.warning("step of %d requests failed (%r); retrying in halves to isolate the cause",
                           len(batch.scheduled), e)
        mid = len(batch.scheduled) // 2
        sampled: list[SampledToken] = []
        failures: dict[Request, BaseException] = {}
        for part in (batch.scheduled[:mid], batch.scheduled[mid:]):
            got, bad = self._execute_isolated(SchedulerOutput(scheduled=part))
            sampled += got
            failures.update(bad)
        return sampled, failures

    def _append_token(self, s: SampledToken, g: RequestGroup) -> None:
        req, tok, p = s.request, s.token_id, s.request.params
        req.token_ids.append(tok)
        if s.logprobs is not None and req.logprobs is not None:
            lp, rank, top_ids, top_vals = s.logprobs
            entry = {tok: Logprob(lp, rank, self.tokenizer.decode([tok], False))}
            for r, (i, v) in enumerate(zip(top_ids, top_vals), start=1):
                entry.setdefault(i, Logprob(v, r, self.tokenizer.decode([i], False)))
            req.logprobs.append(entry)
            req.cumulative_logprob += lp
        old_len = len(req.text)
        req.text += req.detok.add(tok)
        n_out = req.num_output_tokens
        status = None
        if n_out >= p.min_tokens:
            if not p.ignore_eos and tok in self.eos_token_ids:
                status = RequestStatus.FINISHED_STOPPED
            elif tok in p.stop_token_ids:
                status, req.stop_reason = RequestStatus.FINISHED_STOPPED, tok
            elif p.stop_strings and self._check_stop_strings(req, old_len):
                status = RequestStatus.FINISHED_STOPPED
        if status is None and (n_out >= req.max_tokens or req.num_tokens >= self.max_model_len):
            status = RequestStatus.FINISHED_LENGTH
        if status is not None:
            self.scheduler.finish_request(req, status)

    @staticmethod
    def _check_stop_strings(req: Request, old_len: int) -> bool:
        for stop in req.params.stop_strings:
            idx = req.text.find(stop, max(0, old_len - len(stop) + 1))
            if idx != -1:
                cut = idx + len(stop) if req.params.include_stop_str_in_output else idx
                req.text = req.text[:cut]
                req.stop_reason = stop
                return True
        return False

    def _output(self, g: RequestGroup) -> RequestOutput:
        comps = [
            CompletionOutput(
                index=i, text=s.text, token_ids=s.output_token_ids,
                finish_reason=s.status.value if s.finished else None, stop_reason=s.stop_reason,
                logprobs=list(s.logprobs) if s.logprobs is not None else None,
                cumulative_logprob=s.cumulative_logprob if s.logprobs is not None else None,
            )
            for i, s in enumerate(g.seqs)
        ]
        return RequestOutput(g.request_id, g.prompt, g.prompt_token_ids, comps, g.finished, g.metrics,
                             error=g.error)

    def _tokenize(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            return prompt, self.tokenizer.encode(prompt)
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), list(prompt["prompt_token_ids"])
            if isinstance(prompt.get("prompt"), str):
                return self._tokenize(prompt["prompt"])
            raise ValueError("prompt: a dict prompt needs 'prompt' (str) or 'prompt_token_ids'")
        if isinstance(prompt, list):
            return None, list(prompt)
        raise ValueError(f"prompt: must be a string, a list of token ids or a dict, got {type(prompt)}")

    # ---- introspection for metrics ----------------------------------------------------------
    @property
    def kv_usage(self) -> float:
        return self.kv.usage


def _fields(p: SamplingParams) -> dict[str, Any]:
    return {k: getattr(p, k) for k in p.__dataclass_fields__ if not k.startswith("_")}
