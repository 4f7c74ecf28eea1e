"""The simulator: the real engine and schedulers on a cost model, in virtual time.

- :mod:`sarathi.sim.costmodel`: step time as a roofline (linear layers with the tile staircase,
  attention, other ops, TP/PP communication) on a :mod:`sarathi.sim.hardware` spec;
- :mod:`sarathi.sim.models`: paper-scale model presets (no weights or tokenizer needed);
- ``sarathi.executor.simulated``: the executor that runs plans on the cost model;
- :mod:`sarathi.sim.runner`: build such an engine, drive a workload, report metrics, write a trace;
- :mod:`sarathi.sim.calibrate` / :mod:`sarathi.sim.tune`: fit this machine, recommend a token budget;
- :mod:`sarathi.sim.autotune`: ``--chunk-size auto``, the tuner's budget for a loaded model on this machine.

Submodules are imported on use, so ``import sarathi.sim`` stays light.
"""
