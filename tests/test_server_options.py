"""vLLM's serving options: ``sarathi serve MODEL``, ``--served-model-name`` (several), ``--chat-template``
(with the request fields chat_template_kwargs / add_generation_prompt / continue_final_message) and
``--generation-config``; through the real openai client where a client call is involved."""

from __future__ import annotations

import json
import logging
from typing import Any

import openai
import pytest

from sarathi.cli import main
from sarathi.errors import InvalidArgument
from sarathi.server.generation_config import load_generation_defaults
from sarathi.tokenizer import load_chat_template
from tests.test_server import running_server

# A template unlike the model's: the tests can tell which one rendered a prompt.
TEMPLATE = ("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}{% if not loop.last %}|{% endif %}"
            "{% endfor %}{% if add_generation_prompt %} [assistant]{% endif %}"
            "{% if enable_thinking is defined and not enable_thinking %} /no_think{% endif %}")
CHAT = [{"role": "user", "content": "Name a colour."}]


def _render(messages: list[dict[str, str]], add_generation_prompt: bool = True, **kw: Any) -> str:
    """What TEMPLATE renders (written out by hand, so a test fails if another template was used)."""
    text = "|".join(f"[{m['role']}] {m['content']}" for m in messages)
    text += " [assistant]" if add_generation_prompt else ""
    return text + (" /no_think" if kw.get("enable_thinking") is False else "")


# ---- the command line (no model is loaded) --------------------------------------------------------
@pytest.fixture
def fake_run_server(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Replace run_server, recording what ``sarathi serve`` would start."""
    import sarathi.server

    seen: dict[str, Any] = {}

    def fake(args: Any, **kw: Any) -> int:
        seen.update(kw, args=args)
        return 0

    monkeypatch.setattr(sarathi.server, "run_server", fake)
    return seen


def test_serve_positional_model_is_model(fake_run_server, capsys):
    assert main(["serve", "/models/some.gguf", "--port", "9"]) == 0
    assert fake_run_server["args"].model == "/models/some.gguf"
    assert fake_run_server["generation_config"] == "auto" and fake_run_server["chat_template"] is None
    fake_run_server.clear()
    assert main(["serve", "--port", "9", "/models/some.gguf", "--model", "/models/./some.gguf"]) == 0
    assert fake_run_server["args"].model == "/models/some.gguf"
    fake_run_server.clear()
    assert main(["serve", "/models/a.gguf", "--model", "/models/b.gguf"]) == 2
    assert not fake_run_server  # refused before anything started
    err = capsys.readouterr().err
    assert "/models/a.gguf" in err and "/models/b.gguf" in err and "differ" in err
    assert main(["serve", "--model", "/models/b.gguf"]) == 0
    assert fake_run_server["args"].model == "/models/b.gguf"


def test_serve_flags_reach_run_server(fake_run_server):
    assert main(["serve", "m.gguf", "--served-model-name", "alpha", "beta", "--chat-template", TEMPLATE,
                 "--generation-config", "vllm"]) == 0
    assert fake_run_server["served_model_name"] == ["alpha", "beta"]
    assert fake_run_server["chat_template"] == TEMPLATE and fake_run_server["generation_config"] == "vllm"


def test_bad_options_fail_before_the_model_loads(monkeypatch, tmp_path, capsys):
    import sarathi.engine
    import sarathi.llm  # noqa: F401  (imported first: it must not bind the stand-in below)

    def no_load(*a: Any, **k: Any) -> None:
        raise AssertionError("the model was loaded before the bad option was refused")

    monkeypatch.setattr(sarathi.engine, "LLMEngine", no_load)
    bad_file = tmp_path / "bad.jinja"
    bad_file.write_text("{% for m in messages %}\n{{ m.content }\n{% endfor %}")
    for argv, needle in [
        (["--chat-template", "{% if %}"], "chat_template: the template does not parse"),
        (["--chat-template", str(bad_file)], f"{bad_file}, line 2"),
        (["--chat-template", str(tmp_path / "missing.jinja")], "looks like a file path"),
        (["--generation-config", str(tmp_path / "nowhere")], "generation_config: must be 'auto', 'vllm'"),
        (["--generation-config", str(tmp_path)], "has no generation_config.json"),
        (["--served-model-name", ""], "served_model_name"),
    ]:
        assert main(["serve", *argv]) == 2, argv
        assert needle in capsys.readouterr().err, argv
    assert main(["generate", "Hi", "--chat-template", TEMPLATE]) == 2  # without --chat it would do nothing
    assert "only used with --chat" in capsys.readouterr().err


def test_generate_chat_uses_chat_template(engine, llm, monkeypatch, capsys):
    import sarathi.engine

    monkeypatch.setattr(sarathi.engine, "LLMEngine", lambda args: engine)
    monkeypatch.setattr(engine, "shutdown", lambda: None)  # the session's engine outlives this command
    argv = ["generate", "Name a colour.", "--chat", "--chat-template", TEMPLATE, "--max-tokens", "2"]
    assert main(argv) == 0
    expected = len(engine.tokenizer.encode(_render(CHAT)))
    assert f"prompt {expected} tokens" in capsys.readouterr().err
    assert expected != len(engine.tokenizer.encode(engine.tokenizer.apply_chat_template(CHAT)))


def test_load_chat_template_file_and_text(tmp_path):
    path = tmp_path / "t.jinja"
    path.write_text(TEMPLATE)
    assert load_chat_template(str(path)) == TEMPLATE
    assert load_chat_template(r"{{ 'a' }}\n{{ 'é' }}") == "{{ 'a' }}\n{{ 'é' }}"  # escapes decoded, as vLLM
    assert load_chat_template(None) is None
    with pytest.raises(InvalidArgument, match="chat_template: .*line 1") as e:
        load_chat_template("{% for m in messages %}")
    assert e.value.field == "chat_template"


# ---- served names and the chat template on a running server --------------------------------------
@pytest.fixture
def options_server(llm):
    """Per test: two servers must never drive the session's engine at once (one would take the
    other's outputs)."""
    with running_server(llm.engine, served_model_name=["alpha", "beta"], chat_template=TEMPLATE) as srv:
        yield srv


def test_served_model_names(options_server, llm):
    client = options_server.openai()
    cards = client.models.list().data
    assert [m.id for m in cards] == ["alpha", "beta"]
    assert all(m.root == llm.engine.model_name for m in cards)
    for name in ("alpha", "beta"):  # every served name is accepted; the first is the one reported
        out = client.completions.create(model=name, prompt="Hi", max_tokens=2, temperature=0)
        assert out.model == "alpha" and out.usage.completion_tokens >= 1
    for other in ("gamma", llm.engine.model_name):  # with served names, the path is not one (as vLLM)
        with pytest.raises(openai.NotFoundError) as e:
            client.completions.create(model=other, prompt="Hi", max_tokens=2)
        assert e.value.body["param"] == "model" and other in e.value.body["message"]


def test_chat_template_override_and_kwargs(options_server, llm):
    tok = llm.engine.tokenizer
    model_template = tok.chat_template
    client = options_server.openai()
    out = client.chat.completions.create(model="beta", messages=CHAT, max_tokens=2, temperature=0)
    assert out.model == "alpha"
    assert out.usage.prompt_tokens == len(tok.encode(_render(CHAT), False))
    thinking_off = client.chat.completions.create(
        model="alpha", messages=CHAT, max_tokens=2, temperature=0,
        extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    assert thinking_off.usage.prompt_tokens == len(tok.encode(_render(CHAT, enable_thinking=False), False))
    assert thinking_off.usage.prompt_tokens > out.usage.prompt_tokens
    no_prompt = client.chat.completions.create(model="alpha", messages=CHAT, max_tokens=2, temperature=0,
                                               extra_body={"add_generation_prompt": False})
    assert no_prompt.usage.prompt_tokens == len(tok.encode(_render(CHAT, False), False))
    with options_server.client() as c:
        t = c.post("/tokenize", json={"messages": CHAT, "chat_template_kwargs": {"enable_thinking": False}})
        assert t.json()["tokens"] == tok.encode(_render(CHAT, enable_thinking=False), False)
    assert tok.chat_template == model_template  # the override is the server's, not the shared tokenizer's


def test_continue_final_message(options_server, llm):
    tok = llm.engine.tokenizer
    client = options_server.openai()
    msgs = [*CHAT, {"role": "assistant", "content": "My favourite colour is"}]
    open_text = _render(msgs, False)  # ends with the assistant's words, no generation prompt
    assert open_text.endswith("[assistant] My favourite colour is")
    out = client.chat.completions.create(model="alpha", messages=msgs, max_tokens=2, temperature=0,
                                         extra_body={"continue_final_message": True})
    assert out.usage.prompt_tokens == len(tok.encode(open_text, False))
    with options_server.client() as c:
        t = c.post("/tokenize", json={"messages": msgs, "continue_final_message": True,
                                      "add_generation_prompt": False})
        assert t.json()["tokens"] == tok.encode(open_text, False)


def test_continue_final_message_with_the_models_template(server_default_template, llm):
    """On the model's ChatML template the closing <|im_end|> is cut, as transformers does."""
    tok = llm.engine.tokenizer
    msgs = [*CHAT, {"role": "assistant", "content": "My favourite colour is"}]
    with server_default_template.client() as c:
        t = c.post("/tokenize", json={"messages": msgs, "continue_final_message": True}).json()
    text = tok.decode(t["tokens"], False)
    assert text.endswith("<|im_start|>assistant\nMy favourite colour is")


@pytest.fixture
def server_default_template(llm):
    with running_server(llm.engine) as srv:
        yield srv


@pytest.mark.parametrize("body,param", [
    ({"chat_template_kwargs": "enable_thinking"}, "chat_template_kwargs"),
    ({"chat_template_kwargs": ["x"]}, "chat_template_kwargs"),
    ({"chat_template_kwargs": {"messages": []}}, "chat_template_kwargs.messages"),
    ({"chat_template_kwargs": {"bos_token": "<s>"}}, "chat_template_kwargs.bos_token"),
    ({"add_generation_prompt": "yes"}, "add_generation_prompt"),
    ({"continue_final_message": 1}, "continue_final_message"),
    ({"continue_final_message": True, "add_generation_prompt": True}, "continue_final_message"),
    ({"chat_template": "{{ messages }}"}, "chat_template"),
])
def test_bad_chat_template_fields_are_400(options_server, body, param):
    with options_server.client() as c:
        r = c.post("/v1/chat/completions", json={"messages": CHAT, "max_tokens": 2, **body})
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == param, r.json()
        t = c.post("/tokenize", json={"messages": CHAT, **body})
        assert t.status_code == 400 and t.json()["error"]["param"] == param, t.json()


def test_tokenize_prompt_refuses_chat_only_fields(options_server):
    with options_server.client() as c:
        r = c.post("/tokenize", json={"prompt": "x", "chat_template_kwargs": {"enable_thinking": False}})
        assert r.status_code == 400 and r.json()["error"]["param"] == "chat_template_kwargs"


# ---- --generation-config --------------------------------------------------------------------------
def _write_generation_config(folder: Any, **values: Any) -> Any:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "do_sample": True,
                                                               **values}))
    return folder


def test_generation_config_values(tmp_path):
    folder = _write_generation_config(tmp_path / "g", temperature=0.6, top_p=0.9, top_k=50, min_p=0.05,
                                      repetition_penalty=1.1, max_new_tokens=7)
    d = load_generation_defaults(str(folder), None)
    # max_new_tokens is max_tokens; top_k 50 is transformers' own default, which vLLM does not apply
    assert d.params == {"temperature": 0.6, "top_p": 0.9, "min_p": 0.05, "repetition_penalty": 1.1,
                        "max_tokens": 7}
    assert d.source == str(folder / "generation_config.json")
    assert load_generation_defaults("vllm", str(folder)).params == {}
    assert load_generation_defaults("auto", None).params == {}  # the default model is a GGUF file
    _write_generation_config(tmp_path / "bad", temperature=-1)
    with pytest.raises(InvalidArgument, match="generation_config: .*temperature") as e:
        load_generation_defaults(str(tmp_path / "bad"), None)
    assert e.value.field == "generation_config"
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "generation_config.json").write_text("{not json")
    with pytest.raises(InvalidArgument, match="cannot read"):
        load_generation_defaults(str(tmp_path / "junk"), None)


def _params(app: Any, body: dict[str, Any], chat: bool = False) -> Any:
    """The SamplingParams the server would run ``body`` with (prepared, not submitted)."""
    job = app.state.serving._prepare(json.dumps(body).encode(), chat)
    return job.groups[0].params


def test_generation_config_defaults_and_request_wins(llm, tmp_path, caplog):
    from sarathi.server import build_app

    folder = _write_generation_config(tmp_path / "g", temperature=0.6, top_p=0.9, top_k=20,
                                      repetition_penalty=1.1, max_new_tokens=5)
    app = build_app(llm.engine, generation_config=str(folder))
    p = _params(app, {"prompt": "Hi"})
    assert (p.temperature, p.top_p, p.top_k, p.repetition_penalty, p.min_p, p.max_tokens) == (
        0.6, 0.9, 20, 1.1, 0.0, 5)
    chat = _params(app, {"messages": CHAT}, chat=True)
    assert (chat.temperature, chat.top_k, chat.max_tokens) == (0.6, 20, 5)
    own = _params(app, {"prompt": "Hi", "temperature": 0, "top_p": 1.0, "top_k": -1,
                        "repetition_penalty": 1.0, "max_tokens": 9})
    assert (own.temperature, own.top_p, own.top_k, own.repetition_penalty, own.max_tokens) == (
        0, 1.0, -1, 1.0, 9)
    assert _params(app, {"messages": CHAT, "max_completion_tokens": 3}, chat=True).max_tokens == 3
    nulls = _params(app, {"prompt": "Hi", "temperature": None, "max_tokens": None})  # null: the default
    assert (nulls.temperature, nulls.max_tokens) == (0.6, 5)
    plain = build_app(llm.engine, generation_config="vllm")
    base = _params(plain, {"prompt": "Hi"})
    assert (base.temperature, base.top_p, base.top_k, base.repetition_penalty, base.max_tokens) == (
        1.0, 1.0, -1, 1.0, 16)
    eng, tok = llm.engine, llm.engine.tokenizer
    room = min(eng.max_model_len, eng.kv.num_blocks * eng.kv.block_size) - len(
        tok.encode(tok.apply_chat_template(CHAT), False))
    assert _params(plain, {"messages": CHAT}, chat=True).max_tokens == room  # chat: all the room left
    with caplog.at_level(logging.INFO, logger="sarathi.server"), running_server(
            llm.engine, generation_config=str(folder)) as srv:
        out = srv.openai().completions.create(model=llm.engine.model_name, prompt="Hi",
                                              extra_body={"ignore_eos": True})
        assert out.usage.completion_tokens == 5  # max_new_tokens, not OpenAI's 16
    logged = " ".join(r.getMessage() for r in caplog.records)
    assert "default sampling params from" in logged and "temperature=0.6" in logged
    assert "max_tokens=5" in logged


def test_generation_config_auto_reads_the_hf_folder(llm, tmp_path, caplog):
    """``auto`` (the default) on an HF folder: its generation_config.json sets the defaults."""
    from sarathi import LLM
    from tests.test_models import make_tiny

    make_tiny("llama3", tmp_path, llm.get_tokenizer())
    _write_generation_config(tmp_path, temperature=0.3, max_new_tokens=3)
    tiny = LLM(model=str(tmp_path), dtype="float32", kv_cache_memory="8MiB")
    try:
        with caplog.at_level(logging.INFO, logger="sarathi.server"), running_server(tiny.engine) as srv:
            with srv.client() as c:
                r = c.post("/v1/completions", json={"prompt": "Hi", "ignore_eos": True}).json()
                assert r["usage"]["completion_tokens"] == 3
                body = {"prompt": "Hi", "ignore_eos": True, "max_tokens": 4}
                r = c.post("/v1/completions", json=body).json()
                assert r["usage"]["completion_tokens"] == 4
            assert _params(srv.app, {"prompt": "Hi"}).temperature == 0.3
        assert str(tmp_path / "generation_config.json") in " ".join(r.getMessage() for r in caplog.records)
        from sarathi.server import build_app

        assert _params(build_app(tiny.engine, generation_config="vllm"), {"prompt": "Hi"}).temperature == 1.0
    finally:
        tiny.close()
