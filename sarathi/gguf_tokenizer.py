"""Rebuild a GGUF file's tokenizer as an HF ``tokenizers.Tokenizer`` from its metadata alone.

A GGUF file carries no ``tokenizer.json``: only the vocabulary (``tokenizer.ggml.tokens``), the merges
or scores, token types, special-token ids, add-BOS/EOS flags and the name of the pre-tokenizer
(``tokenizer.ggml.pre``). This module turns those back into the tokenizer the model was trained with,
in well under a second and without ``transformers``, giving the ids of transformers' own GGUF conversion
(``AutoTokenizer.from_pretrained(dir, gguf_file=...)``, transformers 5.x) and of llama.cpp:

* ``tokenizer.ggml.model == "gpt2"``: byte-level BPE. The text is first cut by the regex(es) llama.cpp
  uses for the file's ``tokenizer.ggml.pre`` (``pre_tokenizers.Split``, "isolated", one per regex, in
  order), then mapped to the byte alphabet (``ByteLevel``). Where transformers' conversion knows the
  pre type we use its regex verbatim (Llama 3, Qwen2, tekken, ...); for the others (``smollm``,
  ``deepseek-llm``, ``default``, ...) transformers falls back to the plain GPT-2 pattern, which is not
  what the model was trained with, so we follow llama.cpp's ``llm_tokenizer_bpe`` instead.
* ``tokenizer.ggml.model == "llama"``: SentencePiece (Llama 2, Mistral v0.x, TinyLlama) as transformers'
  ``LlamaTokenizer`` builds it: BPE with byte fallback (``<0xNN>`` tokens), merges recovered from the
  token scores, ``\u2581`` for spaces with one prepended to the text, BOS added unless the file says not.

Deliberate differences from transformers' GGUF conversion, each where transformers disagrees with
llama.cpp and with the model's original ``tokenizer.json``:

* Llama 3 and tekken vocabularies set BPE ``ignore_merges`` (a pre-token that is itself in the vocabulary
  is one token), as their ``tokenizer.json`` and llama.cpp do; transformers does not.
* Pre types transformers does not know get llama.cpp's regexes (above), not the GPT-2 pattern.
* ``tokenizer.ggml.add_space_prefix = false`` on a SentencePiece vocabulary is honoured (llama.cpp does;
  transformers ignores the flag). No supported model sets it.
* transformers adds its tokenizer classes' default special tokens (``<|endoftext|>``, ``<s>``, ``</s>``,
  ``<unk>``) as *new* ids past the end of the vocabulary when the file lacks them; we never add a token
  the model has no embedding for.

An unknown ``tokenizer.ggml.pre`` or ``tokenizer.ggml.model`` is a ``ValueError`` naming ``model``:
silently falling back to another pattern would give wrong ids.
"""

from __future__ import annotations

import logging
from typing import Any, NamedTuple

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

logger = logging.getLogger(__name__)

# GGUF token types (llama.cpp's llama_token_type)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# ---- pre-tokenizer regexes -------------------------------------------------------------------------
# As in transformers' integrations/gguf (and the models' tokenizer.json); llama.cpp's llama-vocab.cpp
# spells the case-insensitive contractions as (?:'[sS]|'[tT]|...), which matches the same text.
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
           r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
          r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN35 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
           r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_TEKKEN = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
           r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
           r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_GPT4O = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
          r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
          r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
          r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
          r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")

# DeepSeek LLM (llama.cpp LLAMA_VOCAB_PRE_TYPE_DEEPSEEK_LLM, = deepseek-llm's tokenizer.json). The letter
# class lists the cased letters (Lu/Ll/Lt) by code point: written with escapes, because several of them
# (U+1F7D, U+1FBE, U+2126, U+212A, ...) are silently replaced by look-alikes under Unicode normalization.
_DEEPSEEK_LETTERS = (
    "A-Za-z\u00b5\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u01ba\u01bc-\u01bf\u01c4-\u0293\u0295-\u02af"
    "\u0370-\u0373\u0376\u0377\u037b-\u037d\u037f\u0386\u0388-\u038a\u038c\u038e-\u03a1\u03a3-\u03f5"
    "\u03f7-\u0481\u048a-\u052f\u0531-\u0556\u10a0-\u10c5\u13a0-\u13f5\u13f8-\u13fd\u1c90-\u1cba"
    "\u1cbd-\u1cbf\u1d00-\u1d2b\u1d6b-\u1d77\u1d79-\u1d9a\u1e00-\u1f15\u1f18-\u1f1d\u1f20-\u1f45"
    "\u1f48-\u1f4d\u1f50-\u1f57\u1f59\u1f5b\u1f5d\u1f5f-\u1f7d\u1f80-\u1fb4\u1fb6-\u1fbc\u1fbe"
    "\u1fc2-\u1fc4\u1fc6-\u1fcc\u1fd0-\u1fd3\u1fd6-\u1fdb\u1fe0-\u1fec\u1ff2-\u1ff4\u1ff6-\u1ffc"
    "\u2102\u2107\u210a-\u2113\u2115\u2119-\u211d\u2124\u2126\u2128\u212a-\u212d\u212f-\u2134\u2139"
    "\u213c-\u213f\u2145-\u2149\u214e\u2183\u2184\u2c00-\u2c7b\u2c7e-\u2ce4\u2ceb-\u2cee\u2cf2\u2cf3"
    "\ua640-\ua66d\ua680-\ua69b\ua722-\ua76f\ua771-\ua787\ua78b-\ua78e\uab70-\uabbf\ufb00-\ufb06"
    "\ufb13-\ufb17\uff21-\uff3a\uff41-\uff5a\U00010400-\U0001044f\U000104b0-\U000104d3"
    "\U000104d8-\U000104fb\U00010c80-\U00010cb2\U00010cc0-\U00010cf2\U000118a0-\U000118df"
    "\U0001e900-\U0001e943"
)
_CJK = "[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]+"
_DEEPSEEK_LLM = (
    "[\r\n]",
    r"\s?[" + _DEEPSEEK_LETTERS + "]+",
    "\\s?[!-/:-~\uff01-\uff0f\uff1a-\uff5e\u2018-\u201f\u3000-\u3002]+",
    r"\s+$",
    _CJK,
    r"\p{N}+",
)
_DEEPSEEK_CODER = ("[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", _CJK, r"\p{N}")
# llama.cpp's fallback for "default" and for a file without tokenizer.ggml.pre
_LLAMA_CPP_DEFAULT = (r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]")


class _Pre(NamedTuple):
    splits: tuple[str, ...]  # regexes applied in order, each a Split(..., "isolated")
    byte_level_regex: bool = False  # let ByteLevel apply the GPT-2 pattern after the splits
    ignore_merges: bool = False  # a pre-token found whole in the vocabulary is one token


_LLAMA3_PRE = _Pre((_LLAMA3,), ignore_merges=True)
_STARCODER_PRE = _Pre((r"\p{N}",), byte_level_regex=True)  # digits one by one, then GPT-2
_GPT2_PRE = _Pre((), byte_level_regex=True)
_QWEN2_PRE = _Pre((_QWEN2,))
_GPT4O_PRE = _Pre((_GPT4O,))

# tokenizer.ggml.pre -> pre-tokenizer, with llama.cpp's names and groups (src/llama-vocab.cpp)
PRE_TOKENIZERS: dict[str, _Pre] = {
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0",
                     "lfm2", "jina-v5-nano"), _LLAMA3_PRE),
    **dict.fromkeys(("dbrx", "smaug-bpe"), _Pre((_LLAMA3,))),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez", "stablelm2"), _QWEN2_PRE),
    "qwen35": _Pre((_QWEN35,)),
    "tekken": _Pre((_TEKKEN,), ignore_merges=True),
    **dict.fromkeys(("gpt-4o", "llama4", "minimax-m2"), _GPT4O_PRE),
    **dict.fromkeys(("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b"),
                    _STARCODER_PRE),
    **dict.fromkeys(("gpt-2", "phi-2", "mpt", "olmo", "jais", "exaone4"), _GPT2_PRE),
    "deepseek-llm": _Pre(_DEEPSEEK_LLM),
    "deepseek-coder": _Pre(_DEEPSEEK_CODER),
    "default": _Pre(_LLAMA_CPP_DEFAULT),
}

# SentencePiece vocabularies of these architectures need other rules (transformers has builders of
# their own for them); we do not serve them, so refuse rather than give wrong ids.
_SPM_OTHER_ARCHS = ("gemma", "gemma2", "gemma3", "gemma4", "phi3")


class GGUFTokenizer(NamedTuple):
    """What :func:`tokenizer_from_gguf` returns; the ids are None where the file names no such token."""

    tokenizer: Tokenizer
    bos_token: str | None
    eos_token: str | None
    eos_token_id: int | None
    bos_token_id: int | None


def tokenizer_from_gguf(fields: dict[str, Any]) -> GGUFTokenizer:
    """Build the tokenizer described by a GGUF file's metadata (``GGUFFile(path).fields``).

    ``encode(text)`` (``add_special_tokens=True``) adds BOS/EOS as the file's
    ``tokenizer.ggml.add_bos_token`` / ``add_eos_token`` say (SentencePiece: BOS unless told otherwise),
    control tokens (type 3) are special (matched whole in text, skipped by
    ``decode(..., skip_special_tokens=True)``) and user-defined ones (type 4) are matched whole too.
    Raises ``ValueError("model: ...")`` for a tokenizer kind or pre-tokenizer we cannot reproduce.
    """
    kind = fields.get("tokenizer.ggml.model")
    tokens = fields.get("tokenizer.ggml.tokens")
    if not tokens:
        raise ValueError("model: this GGUF file has no tokenizer (tokenizer.ggml.tokens is missing)")
    tokens = list(tokens)
    types = list(fields.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens))
    if kind == "gpt2":
        tk, add_bos = _byte_level_bpe(fields, tokens), False
    elif kind == "llama":
        arch = fields.get("general.architecture")
        if arch in _SPM_OTHER_ARCHS:
            raise ValueError(f"model: the SentencePiece tokenizer of a {arch!r} GGUF is not supported")
        tk, add_bos = _sentencepiece_bpe(fields, tokens), True  # transformers' and llama.cpp's default
    else:
        raise ValueError(f"model: GGUF tokenizer kind tokenizer.ggml.model={kind!r} is not supported "
                         "(supported: 'gpt2' byte-level BPE, 'llama' SentencePiece)")
    vocab = tk.get_vocab(with_added_tokens=False)
    _add_gguf_special_tokens(tk, fields, tokens, types, vocab)

    def token_at(key: str) -> tuple[str | None, int | None]:
        i = fields.get(f"tokenizer.ggml.{key}")
        return (tokens[i], i) if isinstance(i, int) and 0 <= i < len(tokens) else (None, None)

    (bos, bos_id), (eos, eos_id) = token_at("bos_token_id"), token_at("eos_token_id")
    add_bos = bool(fields.get("tokenizer.ggml.add_bos_token", add_bos)) and bos_id is not None
    add_eos = bool(fields.get("tokenizer.ggml.add_eos_token", False)) and eos_id is not None
    # As transformers' update_post_processor writes it (a pair repeats the template with type id 1).
    single = (f"{bos}:0 " if add_bos else "") + "$A:0" + (f" {eos}:0" if add_eos else "")
    pair = single + (f" {bos}:1" if add_bos else "") + " $B:1" + (f" {eos}:1" if add_eos else "")
    special = ([(bos, bos_id)] if add_bos else []) + ([(eos, eos_id)] if add_eos else [])
    tk.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=special)
    return GGUFTokenizer(tk, bos, eos, eos_id, bos_id)


def _split_merge(merge: str) -> tuple[str, str]:
    """``"a b"`` -> ``("a", "b")``, cutting at the first space after the first character, as llama.cpp
    does (so a merge whose left side is itself a space survives)."""
    cut = merge.find(" ", 1)
    if cut < 0:
        raise ValueError(f"model: malformed GGUF merge {merge!r}")
    return merge[:cut], merge[cut + 1:]


def _byte_level_bpe(fields: dict[str, Any], tokens: list[str]) -> Tokenizer:
    pre_name = fields.get("tokenizer.ggml.pre")
    if pre_name is None:
        logger.warning("GGUF file names no tokenizer.ggml.pre; using llama.cpp's 'default' "
                       "pre-tokenizer, as llama.cpp does (it warns that quality may suffer)")
        pre_name = "default"
    pre = PRE_TOKENIZERS.get(pre_name)
    if pre is None:
        raise ValueError(f"model: GGUF pre-tokenizer tokenizer.ggml.pre={pre_name!r} is not supported "
                         f"(supported: {', '.join(sorted(PRE_TOKENIZERS))}); its token ids would be wrong")
    merges = fields.get("tokenizer.ggml.merges")
    if not merges:
        raise ValueError("model: this GGUF's BPE tokenizer has no tokenizer.ggml.merges")
    # Tokens are stored in the byte alphabet (space = "Ġ"); an added token stored with raw characters
    # (a user-defined one with a space, say) is respelled into it, as transformers does. On a clash the
    # later id wins, as in a dict built in token order.
    byte_char = _byte_alphabet()
    alphabet = set(byte_char.values())
    vocab = {t if set(t) <= alphabet else "".join(byte_char[b] for b in t.encode("utf-8")): i
             for i, t in enumerate(tokens)}
    tk = Tokenizer(models.BPE(vocab, [_split_merge(m) for m in merges], dropout=None,
                              continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False,
                              ignore_merges=pre.ignore_merges))
    steps: list[Any] = [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in pre.splits]
    steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=pre.byte_level_regex))
    tk.pre_tokenizer = steps[0] if len(steps) == 1 else pre_tokenizers.Sequence(steps)
    tk.decoder = decoders.ByteLevel()
    return tk


def _sentencepiece_bpe(fields: dict[str, Any], tokens: list[str]) -> Tokenizer:
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = fields.get("tokenizer.ggml.merges")
    if merges:
        pairs = [_split_merge(m) for m in merges]
    else:
        scores = fields.get("tokenizer.ggml.scores")
        if scores is None or len(scores) != len(tokens):
            raise ValueError("model: this GGUF's SentencePiece tokenizer has neither merges nor one score "
                             "per token (tokenizer.ggml.scores)")
        pairs = merges_from_scores(vocab, dict(zip(tokens, scores)))
    tk = Tokenizer(models.BPE(vocab, pairs, dropout=None, fuse_unk=True, byte_fallback=True))
    prefix = bool(fields.get("tokenizer.ggml.add_space_prefix", True))
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", split=False,
                                                prepend_scheme="first" if prefix else "never")
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if prefix:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    tk.decoder = decoders.Sequence(steps)
    return tk


def merges_from_scores(vocab: dict[str, int], scores: dict[str, float]) -> list[tuple[str, str]]:
    """BPE merges implied by a scored SentencePiece vocabulary: every way of cutting a token into two
    tokens, the merged token's score deciding the priority. Same list, in the same order, as
    transformers' ``generate_merges`` (stable sort, best score first, then longer left and right parts
    first), so the ids match its GGUF conversion."""
    found: list[tuple[str, str, float]] = []
    for piece, score in scores.items():
        local = [(piece[:i], piece[i:], score) for i in range(1, len(piece))
                 if piece[:i] in vocab and piece[i:] in vocab]
        local.sort(key=lambda m: (vocab[m[0]], vocab[m[1]]))
        found.extend(local)
    found.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(left, right) for left, right, _ in found]


def _add_gguf_special_tokens(tk: Tokenizer, fields: dict[str, Any], tokens: list[str], types: list[int],
                             vocab: dict[str, int]) -> None:
    """Control tokens (and the BOS/EOS/UNK/PAD tokens) become special added tokens, user-defined ones
    plain added tokens, all matched whole in the text and never normalized, as transformers does.
    Only tokens of the vocabulary are added: an added token outside it would get an id the model lacks."""
    in_vocab = [(t, ty) for t, ty in zip(tokens, types) if t in vocab]
    ids = [fields.get(f"tokenizer.ggml.{k}") for k in ("bos_token_id", "eos_token_id", "unknown_token_id",
                                                        "padding_token_id")]
    named = {tokens[i] for i in ids if isinstance(i, int) and 0 <= i < len(tokens)}
    special = [t for t, ty in in_vocab if ty == CONTROL] + [t for t in named if t in vocab]
    tk.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in dict.fromkeys(special)])
    user = [t for t, ty in in_vocab if ty == USER_DEFINED and t not in named]
    tk.add_tokens([AddedToken(t, normalized=False, special=False) for t in user])


def _byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character map (``bytes_to_unicode``)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1),
                 *range(ord("\u00ae"), ord("\u00ff") + 1)]
    extra = [b for b in range(256) if b not in printable]
    return {b: chr(b) for b in printable} | {b: chr(256 + n) for n, b in enumerate(extra)}
