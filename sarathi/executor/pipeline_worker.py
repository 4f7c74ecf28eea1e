"""Entry point of a spawned pipeline rank: ``python -m sarathi.executor.pipeline_worker``.

Rank, world size and the rendezvous port come in the environment (``SARATHI_PP_*``), the engine
arguments, model shape and layer split as one pickle on stdin (written by the parent engine process,
so nothing untrusted is unpickled)."""

from __future__ import annotations

import os
import pickle
import sys


def main() -> None:
    import datetime

    import torch.distributed as dist

    from sarathi.executor.pipeline_stage import worker_main

    args, model_config, ranges = pickle.loads(sys.stdin.buffer.read())
    world = int(os.environ["SARATHI_PP_WORLD"])
    store = dist.TCPStore("127.0.0.1", int(os.environ["SARATHI_PP_PORT"]), world, False,
                          timeout=datetime.timedelta(seconds=60))
    worker_main(int(os.environ["SARATHI_PP_RANK"]), world, store, args, model_config, ranges)


if __name__ == "__main__":
    main()
