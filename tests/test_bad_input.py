"""Bad input is a ValueError naming the field, raised before any work starts."""

from __future__ import annotations

import json
import os

import pytest

from sarathi import LLM, EngineArgs, SamplingParams
from sarathi.model.loader import resolve_model


@pytest.mark.parametrize("kwargs,field", [
    (dict(max_tokens=0), "max_tokens"),
    (dict(max_tokens=-3), "max_tokens"),
    (dict(temperature=-0.1), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_k=-2), "top_k"),
    (dict(n=0), "n"),
    (dict(min_tokens=5, max_tokens=2), "min_tokens"),
    (dict(stop=[""]), "stop"),
    (dict(logprobs=-1), "logprobs"),
])
def test_sampling_params_validation(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_bad_prompt_in_a_batch_runs_nothing(engine, llm):
    steps = engine.stats.num_steps
    too_long = {"prompt_token_ids": [1] * engine.max_model_len}
    for bad, field in [("", "prompt"), ({"prompt_token_ids": []}, "prompt"), (too_long, "prompt"),
                       ({"prompt_token_ids": [10**9]}, "prompt"), (42, "prompt")]:
        with pytest.raises(ValueError, match=field):
            llm.generate(["fine prompt", bad], SamplingParams(max_tokens=4))
    with pytest.raises(ValueError, match="max_tokens"):
        llm.generate(["fine"], SamplingParams(max_tokens=engine.max_model_len))
    assert engine.stats.num_steps == steps and not engine.has_unfinished_requests()
    # the engine still works afterwards
    assert llm.generate(["Hello"], SamplingParams(max_tokens=2))[0].outputs[0].token_ids


@pytest.mark.parametrize("kwargs,field", [
    (dict(scheduler="fifo"), "scheduler"),
    (dict(chunk_size=0), "chunk_size"),
    (dict(max_num_seqs=0), "max_num_seqs"),
    (dict(block_size=0), "block_size"),
    (dict(dtype="int8"), "dtype"),
    (dict(kv_cache_memory="lots"), "kv_cache_memory"),
    (dict(num_kv_blocks=-1), "num_kv_blocks"),
])
def test_engine_args_validated_before_loading(kwargs, field):
    with pytest.raises(ValueError, match=field):
        EngineArgs(model="/nonexistent/never/loaded", **kwargs).check()
    with pytest.raises(ValueError, match=field):
        LLM(model="/nonexistent/never/loaded", **kwargs)  # the bad flag wins over the missing model


def test_missing_and_corrupt_checkpoints(tmp_path):
    with pytest.raises(ValueError, match="model: .*not found"):
        LLM(model=str(tmp_path / "nope"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="model: .*config.json"):
        LLM(model=str(empty))
    bad_gguf = tmp_path / "bad.gguf"
    bad_gguf.write_bytes(b"GGUF" + os.urandom(64))
    with pytest.raises(ValueError, match="model: cannot read GGUF"):
        LLM(model=str(bad_gguf))
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="model: cannot read .*config.json"):
        LLM(model=str(folder))


def test_unsupported_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ValueError, match="model: unsupported architecture"):
        resolve_model(str(tmp_path)) and LLM(model=str(tmp_path))


@pytest.mark.parametrize("kwargs,field", [
    (dict(scheduler="fifo"), "scheduler"),
    (dict(executor="cluster"), "executor"),
    (dict(chunk_size=0), "chunk_size"),
    (dict(max_num_seqs="8"), "max_num_seqs"),
    (dict(threads=0), "threads"),
    (dict(kv_cache_memory="lots"), "kv_cache_memory"),
    (dict(chunk_sise=64), "chunk_sise"),  # a typo is an error, not a silently ignored argument
])
def test_engine_argument_errors_carry_the_field(kwargs, field):
    from sarathi.errors import InvalidArgument

    with pytest.raises(InvalidArgument) as e:
        LLM(model="/nonexistent/never/loaded", **kwargs)
    assert e.value.field == field


def test_sampling_errors_carry_the_field():
    from sarathi.errors import InvalidArgument

    for kwargs, field in [(dict(top_p=2), "top_p"), (dict(seed=2**64), "seed"), (dict(stop=3), "stop")]:
        with pytest.raises(InvalidArgument) as e:
            SamplingParams(**kwargs)
        assert e.value.field == field


def test_cli_flags_are_generated_from_engine_args():
    import dataclasses

    from sarathi.cli import build_parser

    parser, _ = build_parser()
    ns = parser.parse_args(["generate", "hi", "--chunk-size", "64", "--kv-cache-memory", "1GiB",
                            "--scheduler", "orca", "--threads", "1"])
    args = EngineArgs.from_cli(ns)
    assert (args.chunk_size, args.kv_cache_memory, args.scheduler, args.threads) == (64, "1GiB", "orca", 1)
    defaults = EngineArgs.from_cli(parser.parse_args(["serve"]))
    assert defaults == EngineArgs()  # every flag's default is the dataclass default
    help_text = parser._subparsers._group_actions[0].choices["serve"].format_help()
    for f in dataclasses.fields(EngineArgs):
        assert f"--{f.name.replace('_', '-')}" in help_text
    assert "(default: 256)" in help_text  # defaults are shown


def test_cli_version_and_help_do_not_import_torch():
    import subprocess
    import sys

    code = ("import sys; from sarathi.cli import build_parser; p, _ = build_parser(); "
            "p.format_help(); print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr
    from sarathi import __version__

    v = subprocess.run([sys.executable, "-m", "sarathi.cli", "--version"], capture_output=True, text=True,
                       timeout=120)
    assert v.stdout.strip() == f"sarathi {__version__}"


def test_hf_model_id_resolves_from_a_local_hub_cache(tmp_path, monkeypatch):
    """`--model org/name` (as vLLM) goes through huggingface_hub: here from a cache laid out on disk the
    way the hub writes it (no network in tests); an id that is not cached is a ValueError naming model."""
    from sarathi.model.loader import resolve_model

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--tiny-org--tiny-llama"
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    (snap / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    # (huggingface_hub reads the variable once, at import: another test may have imported it already)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)  # "tiny-org/tiny-llama" is not a local path here
    got = resolve_model("tiny-org/tiny-llama")
    assert got.kind == "hf" and os.path.samefile(got.path, snap)
    with pytest.raises(ValueError, match="model") as e:
        resolve_model("tiny-org/not-cached")
    assert e.value.args[0].startswith("model:")
