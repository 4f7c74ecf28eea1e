"""Architectures and checkpoint formats: tiny random HF models (Llama with llama3 RoPE, Qwen2 with qkv
bias, Mistral), sharded safetensors, corrupt files, bf16, the GGUF tokenizer and detokenization."""

from __future__ import annotations

import json

import pytest
import torch

from sarathi import LLM, SamplingParams
from tests.conftest import hf_greedy

TINY = dict(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
            initializer_range=0.3)


def make_tiny(kind: str, folder, tokenizer) -> torch.nn.Module:
    import transformers as tf

    torch.manual_seed(0)
    if kind == "llama3":
        cfg = tf.LlamaConfig(**TINY, tie_word_embeddings=False, rope_theta=500000.0, rope_scaling={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64})
        model = tf.LlamaForCausalLM(cfg)
    elif kind == "qwen2":
        model = tf.Qwen2ForCausalLM(tf.Qwen2Config(**TINY, tie_word_embeddings=True))
        with torch.no_grad():  # make the qkv biases matter
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.5)
    else:
        model = tf.MistralForCausalLM(tf.MistralConfig(**TINY, sliding_window=None, head_dim=16))
    model.eval()
    model.save_pretrained(folder, safe_serialization=True, max_shard_size="2MB")
    tokenizer._tk.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"eos_token": "<|im_end|>", "chat_template": tokenizer.chat_template}))
    return model


@pytest.mark.parametrize("kind", ["llama3", "qwen2", "mistral"])
def test_tiny_architectures_match_transformers(kind, tmp_path, llm):
    hf = make_tiny(kind, tmp_path, llm.get_tokenizer())
    assert len(list(tmp_path.glob("*.safetensors"))) > 1, "expected a sharded checkpoint"
    ours = LLM(model=str(tmp_path), dtype="float32", kv_cache_memory="32MiB", scheduler="sarathi",
               chunk_size=5)
    prompts = [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [400, 500, 600], list(range(1000, 1040))]
    outs = ours.generate([{"prompt_token_ids": p} for p in prompts],
                         SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=5))
    for p, o in zip(prompts, outs):
        assert o.outputs[0].token_ids == hf_greedy(hf, p, 8)
        with torch.inference_mode():
            ref = torch.log_softmax(hf(torch.tensor([p])).logits[0, -1].float(), -1)
        for tok, lp in o.outputs[0].logprobs[0].items():
            assert abs(lp.logprob - float(ref[tok])) < 1e-4


def test_bfloat16_runs_close_to_float32(tmp_path, llm):
    make_tiny("llama3", tmp_path, llm.get_tokenizer())
    params = SamplingParams(temperature=0, max_tokens=1, logprobs=5)
    prompt = [{"prompt_token_ids": list(range(100, 130))}]
    fp32 = LLM(model=str(tmp_path), dtype="float32", kv_cache_memory="16MiB").generate(prompt, params)
    bf16_llm = LLM(model=str(tmp_path), dtype="bfloat16", kv_cache_memory="16MiB")
    assert bf16_llm.engine.executor.kv_caches[0][0].dtype == torch.bfloat16
    bf16 = bf16_llm.generate(prompt, params)
    a, b = fp32[0].outputs[0].logprobs[0], bf16[0].outputs[0].logprobs[0]
    shared = a.keys() & b.keys()
    assert len(shared) >= 3
    assert all(abs(a[k].logprob - b[k].logprob) < 0.15 for k in shared)


def test_corrupt_safetensors_is_a_value_error(tmp_path, llm):
    make_tiny("qwen2", tmp_path, llm.get_tokenizer())
    shard = sorted(tmp_path.glob("*.safetensors"))[0]
    shard.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(ValueError, match="model: cannot read checkpoint"):
        LLM(model=str(tmp_path), dtype="float32")


def test_missing_weight_is_a_value_error(tmp_path, llm):
    from safetensors.torch import load_file, save_file

    make_tiny("qwen2", tmp_path, llm.get_tokenizer())
    for shard in tmp_path.glob("*.safetensors"):
        sd = load_file(shard)
        sd.pop("model.norm.weight", None)
        save_file(sd, shard, metadata={"format": "pt"})
    with pytest.raises(ValueError, match="lacks weights"):
        LLM(model=str(tmp_path), dtype="float32")


TEXTS = ["The capital of France is", "  leading spaces and 12345 digits", "Émile a mangé 3 crêpes 🥞!",
         "def f(x):\n\treturn x**2  # 中文", "<|im_start|>user\nhi<|im_end|>", "a" * 50]


def test_gguf_tokenizer_matches_transformers(llm):
    from transformers import AutoTokenizer

    from sarathi.model.loader import default_model_path

    path = default_model_path()
    ref = AutoTokenizer.from_pretrained(path.rsplit("/", 1)[0], gguf_file=path.rsplit("/", 1)[1])
    tok = llm.get_tokenizer()
    for text in TEXTS:
        assert tok.encode(text) == ref(text).input_ids, text
        ids = tok.encode(text)
        assert tok.decode(ids) == ref.decode(ids, skip_special_tokens=True)
    msgs = [{"role": "user", "content": "hi"}]
    assert tok.apply_chat_template(msgs) == ref.apply_chat_template(msgs, tokenize=False,
                                                                    add_generation_prompt=True)


def test_incremental_detokenization_matches_full_decode(llm):
    from sarathi.tokenizer import IncrementalDetokenizer

    tok = llm.get_tokenizer()
    for text in TEXTS:
        ids = tok.encode(text)
        d = IncrementalDetokenizer(tok, [504], skip_special_tokens=True)
        assert "".join(d.add(t) for t in ids) == tok.decode(ids)


def test_fast_gguf_header_reader_matches_the_gguf_package(tmp_path):
    """Our header parser (sarathi.model.gguf_file) reads exactly what gguf.GGUFReader reads: every
    metadata value and every tensor's type, shape and bytes; a truncated file is a ValueError."""
    import gguf
    import numpy as np

    from sarathi.model.gguf_file import GGUFFile
    from sarathi.model.loader import default_model_path

    path = default_model_path()
    ours, ref = GGUFFile(path), gguf.GGUFReader(path)
    keys = [k for k in ref.fields if not k.startswith("GGUF.")]  # the reader's synthetic header fields
    assert sorted(keys) == sorted(ours.fields)
    for k in keys:
        v = ref.fields[k].contents()
        assert ours.fields[k] == (pytest.approx(v) if isinstance(v, float) else v), k
    assert [t.name for t in ours.tensors] == [t.name for t in ref.tensors]
    for a, b in zip(ours.tensors, ref.tensors):
        assert a.tensor_type == int(b.tensor_type) and a.data.shape == b.data.shape, a.name
        assert np.array_equal(a.data, b.data), a.name
    cut = tmp_path / "cut.gguf"
    with open(path, "rb") as f:
        cut.write_bytes(f.read(100_000))  # inside the tokenizer arrays
    with pytest.raises(ValueError, match="GGUF"):
        GGUFFile(str(cut))


def test_fast_dequantization_is_bit_identical_to_the_gguf_package():
    """Q4_1 (the default model's layers) and Q8_0 (its embedding) blocks dequantized with torch equal
    gguf.quants.dequantize bit for bit; other types fall back to gguf's."""
    import gguf
    import numpy as np
    from gguf import GGMLQuantizationType as Q

    from sarathi.model.gguf_file import GGUFFile
    from sarathi.model.loader import default_model_path, dequantize_fast

    seen = set()
    for t in GGUFFile(default_model_path()).tensors:
        qtype = Q(t.tensor_type)
        if qtype in seen:
            continue
        seen.add(qtype)
        ours = dequantize_fast(t.data, qtype)
        if qtype in (Q.Q4_1, Q.Q8_0):
            ref = torch.from_numpy(np.asarray(gguf.quants.dequantize(t.data, qtype), dtype=np.float32))
            assert ours is not None and ours.dtype == torch.float32 and torch.equal(ours, ref), t.name
        else:
            assert ours is None
    assert {Q.Q4_1, Q.Q8_0} <= seen
    q8 = np.zeros((2, 34), dtype=np.uint8)  # a hand-made Q8_0 row pair: scale 0.5, q = -3 and 127
    q8[:, 0:2] = np.frombuffer(np.float16(0.5).tobytes(), dtype=np.uint8)
    q8[0, 2:], q8[1, 2:] = np.uint8(253), 127
    assert torch.equal(dequantize_fast(q8, Q.Q8_0), torch.tensor([[-1.5] * 32, [63.5] * 32]))
