"""Pipeline ranks' side: a stage's layers and KV (``_StageRunner``), the point-to-point message link,
process groups, and ``worker_main``, the loop of ranks 1..N-1. ``sarathi.executor.pipeline`` holds the
engine's side (``PipelineExecutor``) and explains the protocol."""

from __future__ import annotations

import datetime
import os
import pickle
import time
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from sarathi.executor.base import Executor, ExecutorError
from sarathi.executor.local import LocalExecutor, _long
from sarathi.model import kernels
from sarathi.model.attention import configure_sdpa
from sarathi.scheduler.plan import ModelOutput, StepPlan

if TYPE_CHECKING:
    from sarathi.config import EngineArgs
    from sarathi.model.config import ModelConfig

# Message kinds (first header field). Control messages run down the chain like plans, so they are
# ordered with respect to the plans around them without any acknowledgement.
PLAN, INIT_KV, RESEED, SHUTDOWN, OUTPUT = 1, 2, 3, 4, 5
_WORKER_WAIT = datetime.timedelta(days=7)  # a worker waits for the next plan as long as the engine idles


class PipelineError(ExecutorError):
    """A pipeline rank died, hung or could not start; the executor cannot run plans any more."""


def stage_ranges(num_layers: int, pp: int, split: str | None = None) -> list[tuple[int, int]]:
    """[start, end) decoder layers of each stage: ``split`` ("20,10": layers per stage) or even, with
    the first stages one layer longer when the division is not exact."""
    if split:
        try:
            counts = [int(x) for x in split.split(",")]
        except ValueError:
            raise ValueError(f"pipeline_stages: expected comma-separated integers, got {split!r}") from None
        if len(counts) != pp or sum(counts) != num_layers or min(counts) < 1:
            raise ValueError(f"pipeline_stages: {split!r} must be {pp} positive layer counts summing to "
                             f"the model's {num_layers} layers")
    else:
        if not 1 <= pp <= num_layers:
            raise ValueError(f"pipeline_parallel_size: {pp} stages for {num_layers} layers")
        counts = [num_layers // pp + (1 if i < num_layers % pp else 0) for i in range(pp)]
    out, start = [], 0
    for c in counts:
        out.append((start, start + c))
        start += c
    return out


@dataclass
class StageTiming:
    """What one stage did for one micro-batch: perf_counter intervals (one clock for all processes of
    one host: CLOCK_MONOTONIC), communication (receiving the input, issuing the sends) apart from
    compute."""

    stage: int
    step_id: int
    num_prompt_tokens: int
    num_decode_tokens: int
    recv: tuple[float, float] | None  # from the header's arrival to the last byte of the input
    compute: tuple[float, float]
    send: tuple[float, float] = (0.0, 0.0)
    num_seqs: int = 0


class _StageRunner(LocalExecutor):
    """One stage's layers and KV cache; reuses the local executor's plan flattening so every rank
    derives identical positions, slots and attention metadata from the same plan."""

    name = "stage"

    def __init__(self, args: EngineArgs, model_config: ModelConfig, layers: tuple[int, int],
                 device: torch.device) -> None:
        from sarathi.model.loader import load_model, resolve_model

        Executor.__init__(self, args, model_config)
        self.layers = layers
        self.device = device
        self.dtype = args.torch_dtype(model_config.torch_dtype)
        self.model = load_model(resolve_model(args.model), model_config, self.dtype, device,
                                args.resolved_max_model_len(model_config), layers)
        self.kv_caches = []
        self.block_size = args.block_size
        self.generator = torch.Generator(device=device).manual_seed(args.seed)
        if device.type == "cpu":
            kernels.start_build()  # each rank loads the cached build (or waits for one) in the background

    def kv_bytes_per_block(self, block_size: int) -> int:
        cfg = self.model_config
        elem = torch.tensor([], dtype=self.dtype).element_size()
        n = self.layers[1] - self.layers[0]
        return 2 * n * block_size * cfg.num_key_value_heads * cfg.head_dim * elem

    def init_kv_cache(self, num_blocks: int, block_size: int) -> None:
        cfg = self.model_config
        self.kv_caches = []
        self.block_size = block_size
        shape = (num_blocks, block_size, cfg.num_key_value_heads, cfg.head_dim)
        self.kv_caches = [
            (torch.zeros(shape, dtype=self.dtype, device=self.device),
             torch.zeros(shape, dtype=self.dtype, device=self.device))
            for _ in range(self.layers[1] - self.layers[0])
        ]

    @torch.inference_mode()
    def run(self, plan: StepPlan, hidden: torch.Tensor | None) -> torch.Tensor | ModelOutput:
        """This stage's part of ``plan``: hidden states for the next stage, or (last stage) the output."""
        seqs = sorted(plan.seqs, key=lambda s: s.num_tokens > 1)  # the local executor's order
        input_ids, positions, slots, sample_rows, samplers = self._flatten(seqs)
        prompt_rows, prompt_seqs = self._prompt_logprob_rows(seqs)
        meta = self._metadata(seqs, slots)
        dev = self.device
        if hidden is not None:
            hidden = hidden.to(dev)
        x = self.model(_long(input_ids, dev), _long(positions, dev), meta, self.kv_caches,
                       _long(sample_rows + prompt_rows, dev), hidden)
        if not self.model.is_last:
            return x
        return self._output(plan.step_id, x, samplers, prompt_seqs)

    def execute(self, plan: StepPlan) -> ModelOutput:  # pragma: no cover - stages use run()
        raise NotImplementedError


class _Link:
    """Point-to-point messages over one process group: header [kind, rows, bytes], activations
    ([rows, hidden]), pickled object.

    A send is issued at once and not waited for; its buffer is kept alive until ``window`` later
    messages have been sent. gloo only marks a send complete inside ``wait()``, so the old ones are
    waited for then: rank 0 holds at most N plans in flight and submits plan m + N only after plan m's
    output came back through every rank, so a message 2N + 2 sends old has long been received and the
    wait returns at once (it can never wait on a peer that waits on us)."""

    def __init__(self, pg: Any, hidden: int, dtype: torch.dtype, device: torch.device, window: int) -> None:
        self.pg, self.hidden, self.dtype, self.device = pg, hidden, dtype, device
        self.window = window
        self._sends: deque[list[tuple[Any, torch.Tensor]]] = deque()

    def send(self, dst: int, kind: int, act: torch.Tensor | None, obj: Any) -> None:
        while len(self._sends) >= self.window:
            for w, _ in self._sends.popleft():
                w.wait()
        blob = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8).to(self.device)
        rows = 0 if act is None else act.shape[0]
        header = torch.tensor([kind, rows, blob.numel()], dtype=torch.long, device=self.device)
        tensors = [header] + ([act.to(self.device, self.dtype).contiguous()] if rows else []) + [blob]
        self._sends.append([(self.pg.send([t], dst, 0), t) for t in tensors])

    def recv(self, src: int) -> tuple[int, torch.Tensor | None, Any, float]:
        """Blocks for the next message from ``src``; returns it with the time its header arrived."""
        header = torch.empty(3, dtype=torch.long, device=self.device)
        self.pg.recv([header], src, 0).wait()
        t_header = time.perf_counter()
        kind, rows, nbytes = (int(v) for v in header.tolist())
        act = None
        if rows:
            act = torch.empty(rows, self.hidden, dtype=self.dtype, device=self.device)
            self.pg.recv([act], src, 0).wait()
        blob = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        self.pg.recv([blob], src, 0).wait()
        return kind, act, pickle.loads(blob.cpu().numpy().tobytes()), t_header

    def flush(self) -> None:
        """Wait for every send in progress (raises if the peer is gone)."""
        while self._sends:
            for w, _ in self._sends.popleft():
                w.wait()


def make_group(backend: str, store: Any, rank: int, world: int, timeout: datetime.timedelta) -> Any:
    """A process group of its own (not torch.distributed's global default), so several engines can
    live in one process; gloo is bound to the loopback interface."""
    if backend == "gloo":
        opts = dist.ProcessGroupGloo._Options()
        # Loopback for spawned ranks and a loopback torchrun; across hosts, the interface that
        # resolves to this host's name (GLOO_SOCKET_IFNAME overrides, as usual for gloo).
        addr = os.environ.get("MASTER_ADDR", "127.0.0.1")
        local = addr in ("127.0.0.1", "localhost") or "TORCHELASTIC_RUN_ID" not in os.environ
        opts._devices = [dist.ProcessGroupGloo.create_device(hostname="127.0.0.1") if local
                         else dist.ProcessGroupGloo.create_default_device()]
        opts._timeout = timeout
        return dist.ProcessGroupGloo(store, rank, world, opts)
    opts = dist.ProcessGroupNCCL.Options()
    opts._timeout = timeout
    return dist.ProcessGroupNCCL(store, rank, world, opts)


def _stage_device(args: EngineArgs, rank: int) -> torch.device:
    dev = args.torch_device()
    if dev.type == "cuda" and dev.index is None:  # one GPU per stage when the host has several
        local = int(os.environ.get("LOCAL_RANK", rank))
        dev = torch.device("cuda", local % max(1, torch.cuda.device_count()))
    if dev.type == "cuda":
        torch.cuda.set_device(dev)  # NCCL binds a rank's communicator to the current device
    configure_sdpa(dev)
    return dev


def _torchrun_env() -> tuple[int, int] | None:
    """(rank, world size) when this process was started by torchrun, else None."""
    if "TORCHELASTIC_RUN_ID" not in os.environ or "RANK" not in os.environ:
        return None
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])


def _torchrun_store(rank: int, world: int) -> Any:
    """torchrun's rendezvous store (MASTER_ADDR:MASTER_PORT), under a prefix of our own. torchrun's
    agent hosts it (TORCHELASTIC_USE_AGENT_STORE); otherwise rank 0 does, as in env:// init."""
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                          rank == 0 and not agent, timeout=datetime.timedelta(seconds=300))
    return dist.PrefixStore("sarathi-pp", store)


def worker_main(rank: int, world: int, store: Any, args: EngineArgs, model_config: ModelConfig,
                ranges: list[tuple[int, int]]) -> None:
    """Ranks 1..N-1: receive from the previous rank, run this stage, pass on (the last rank samples
    and answers rank 0). Returns on SHUTDOWN; raises when rank 0's connection closes."""
    torch.set_num_threads(args.threads or 1)  # several ranks share the host's cores
    device = _stage_device(args, rank)
    backend = "nccl" if device.type == "cuda" else "gloo"
    pg = make_group(backend, store, rank, world, _WORKER_WAIT)
    try:
        stage = _StageRunner(args, model_config, ranges[rank], device)
    except Exception as e:
        store.set(f"ready/{rank}", f"{type(e).__name__}: {e}")
        raise
    store.set(f"ready/{rank}", "ok")
    link_dev = device if backend == "nccl" else torch.device("cpu")
    link = _Link(pg, model_config.hidden_size, stage.dtype, link_dev, 2 * world + 2)
    last = rank == world - 1
    while True:
        kind, act, obj, t_header = link.recv(rank - 1)
        t_in = time.perf_counter()
        if kind == INIT_KV:
            stage.init_kv_cache(*obj)
        elif kind == RESEED:
            stage.reseed(obj)
        if kind != PLAN:
            if not last:
                link.send(rank + 1, kind, None, obj)
            if kind == SHUTDOWN:
                link.flush()  # the next rank must get it before this process ends
                return
            continue
        plan, timings, err = obj
        res: torch.Tensor | ModelOutput | None = None
        if err is None:
            try:
                res = stage.run(plan, act)
            except Exception as e:  # the plan's requests fail, the pipeline goes on
                err = f"{type(e).__name__}: {e}"
        t_out = time.perf_counter()
        timing = StageTiming(rank, plan.step_id, plan.num_prompt_tokens, plan.num_decode_tokens,
                             (t_header, t_in), (t_in, t_out), (t_out, t_out), len(plan.seqs))
        timings.append(timing)
        # (Issuing a send takes microseconds; the transfer itself is counted by the receiving rank.)
        if last:
            link.send(0, OUTPUT, None, (res if err is None else None, timings, err))
        else:
            link.send(rank + 1, PLAN, res if err is None else None, (plan, timings, err))
