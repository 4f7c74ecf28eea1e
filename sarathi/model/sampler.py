"""Vectorised sampling over the rows of one step: greedy, temperature, top-k, top-p, seeds, logprobs."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sarathi.scheduler.plan import PromptLogprobRows, PromptLogprobSpec, SamplingSpec

PROMPT_LOGPROB_SLICE = 256  # rows log-softmaxed at once: bounds the temporaries to 256 x vocab floats


@dataclass
class SamplerOutput:
    token_ids: list[int]
    # Per row: (sampled token's logprob, its rank, top-n ids, top-n logprobs) when logprobs were asked.
    logprobs: list[tuple[float, int, list[int], list[float]] | None]


def sample(logits: torch.Tensor, specs: list[SamplingSpec], generator: torch.Generator) -> SamplerOutput:
    """Sample one token per row of ``logits`` ([N, V] float32), row i as ``specs[i]`` says.

    Random rows use the exponential-race trick (argmax of p / Exp(1) noise is a sample from p), so a
    request with a ``seed`` draws its noise from a generator of its own, seeded afresh from
    (seed, output position): it reproduces whatever else is in the batch, and a step that is retried
    (to isolate a failing batch-mate) draws the same noise again. Greedy rows take the plain argmax.

    Structured outputs: the rows whose spec has a ``token_bitmask`` are masked first, all in one batched
    call; a grammar wins over ``min_tokens`` (when its only allowed tokens are banned, the ban yields).
    """
    n, vocab = logits.shape
    dev = logits.device
    constrained = [i for i, sp in enumerate(specs) if sp.token_bitmask is not None]
    if constrained:
        from sarathi.structured import apply_bitmasks

        apply_bitmasks(logits, constrained, [specs[i].token_bitmask for i in constrained])  # type: ignore[misc]
    # min_tokens: forbid EOS and stop tokens until enough tokens were generated.
    for i, sp in enumerate(specs):
        banned = [t for t in sp.banned if t < vocab]
        if banned:
            ids = torch.tensor(banned, device=dev)
            kept = logits[i, ids].clone() if sp.token_bitmask is not None else None
            logits[i, ids] = float("-inf")
            if kept is not None and bool(torch.isneginf(logits[i].max())):
                logits[i, ids] = kept  # the grammar allows nothing else: it has ended
        _bias_and_penalize(logits, i, sp)
    greedy = torch.tensor([sp.greedy for sp in specs], device=dev)
    chosen = logits.argmax(dim=-1)
    if not bool(greedy.all()):
        temps = torch.tensor([1.0 if sp.greedy else sp.temperature for sp in specs], device=dev)
        scaled = _filter_top_k_top_p(logits / temps[:, None], specs)
        probs = torch.softmax(scaled, dim=-1)
        noise = torch.empty_like(probs).exponential_(generator=generator)
        for i, sp in enumerate(specs):
            if sp.seed is not None and not sp.greedy:
                g = torch.Generator(device=dev).manual_seed(_step_seed(sp.seed, sp.position))
                noise[i].exponential_(generator=g)
        sampled = (probs / noise).argmax(dim=-1)
        chosen = torch.where(greedy, chosen, sampled)
    token_ids = chosen.tolist()
    lps: list[tuple[float, int, list[int], list[float]] | None] = [None] * n
    want = [i for i, sp in enumerate(specs) if sp.logprobs is not None]
    if want:
        rows = torch.log_softmax(logits[want], dim=-1)
        k = max(specs[i].logprobs or 0 for i in want)
        top_v, top_i = rows.topk(min(max(k, 1), vocab), dim=-1)
        picked = rows[torch.arange(len(want), device=dev), chosen[want]]
        ranks = (rows > picked[:, None]).sum(-1) + 1
        for j, i in enumerate(want):
            kk = specs[i].logprobs or 0
            lps[i] = (float(picked[j]), int(ranks[j]), top_i[j, :kk].tolist(), top_v[j, :kk].tolist())
    return SamplerOutput(token_ids, lps)


def prompt_logprobs(logits: torch.Tensor, specs: list[PromptLogprobSpec]) -> list[PromptLogprobRows]:
    """Prompt logprobs from the raw logits (no temperature, penalties or bias, as vLLM): ``logits`` holds
    the rows of ``specs`` one after the other ([sum of len(spec.targets), V]); row i of a spec scores
    its ``targets[i]``. Rank 1 is the most likely token (ties share the better rank, as in ``sample``).
    """
    n = sum(len(sp.targets) for sp in specs)
    assert logits.shape[0] == n, (logits.shape, n)
    dev = logits.device
    targets = torch.tensor([t for sp in specs for t in sp.targets], device=dev, dtype=torch.long)
    k = max(sp.k for sp in specs)
    picked_l, ranks_l, top_v_l, top_i_l = [], [], [], []
    for lo in range(0, n, PROMPT_LOGPROB_SLICE):
        rows = torch.log_softmax(logits[lo:lo + PROMPT_LOGPROB_SLICE].float(), dim=-1)
        tgt = targets[lo:lo + PROMPT_LOGPROB_SLICE]
        picked = rows.gather(1, tgt[:, None])[:, 0]
        picked_l.append(picked)
        ranks_l.append((rows > picked[:, None]).sum(-1) + 1)
        if k:
            v, i = rows.topk(min(k, rows.shape[1]), dim=-1)
            top_v_l.append(v)
            top_i_l.append(i)
    picked_all = torch.cat(picked_l).tolist()
    ranks_all = torch.cat(ranks_l).tolist()
    top_v_all = torch.cat(top_v_l).tolist() if k else [[] for _ in range(n)]
    top_i_all = torch.cat(top_i_l).tolist() if k else [[] for _ in range(n)]
    out, at = [], 0
    for sp in specs:
        m, kk = len(sp.targets), sp.k
        out.append(PromptLogprobRows(sp.first, picked_all[at:at + m], ranks_all[at:at + m],
                                  [r[:kk] for r in top_i_all[at:at + m]],
                                  [r[:kk] for r in top_v_all[at:at + m]]))
        at += m
    return out


def _bias_and_penalize(logits: torch.Tensor, i: int, sp: SamplingSpec) -> None:
    """logit_bias, then repetition / frequency / presence penalties, on row ``i`` (in place). A per-row
    loop: rows without any of these (the usual case) cost one attribute check each."""
    if not (sp.logit_bias or sp.repetition_penalty != 1.0 or sp.frequency_penalty or sp.presence_penalty):
        return
    vocab, dev = logits.shape[1], logits.device
    row = logits[i]
    if sp.logit_bias:
        pairs = [(t, b) for t, b in sp.logit_bias if t < vocab]
        if pairs:
            ids = torch.tensor([t for t, _ in pairs], device=dev)
            row[ids] += torch.tensor([b for _, b in pairs], device=dev, dtype=row.dtype)
    if sp.repetition_penalty != 1.0:
        seen = [t for t in (*sp.prompt_token_ids, *sp.output_token_ids) if t < vocab]
        if seen:
            ids = torch.tensor(seen, device=dev)
            vals = row[ids]
            row[ids] = torch.where(vals > 0, vals / sp.repetition_penalty, vals * sp.repetition_penalty)
    if (sp.frequency_penalty or sp.presence_penalty) and sp.output_token_ids:
        out = torch.tensor([t for t in sp.output_token_ids if t < vocab], device=dev, dtype=torch.long)
        counts = torch.bincount(out, minlength=vocab)[:vocab].to(row.dtype)
        row -= sp.frequency_penalty * counts + sp.presence_penalty * (counts > 0).to(row.dtype)


def _filter_top_k_top_p(logits: torch.Tensor, specs: list[SamplingSpec]) -> torch.Tensor:
    """top-k, then top-p and min-p on the (temperature-scaled) logits of every row."""
    top_k = [sp.top_k if sp.top_k > 0 else 0 for sp in specs]
    top_p = [sp.top_p for sp in specs]
    min_p = [sp.min_p for sp in specs]
    if not any(top_k) and all(p >= 1.0 for p in top_p) and not any(min_p):
        return logits
    dev = logits.device
    vocab = logits.shape[-1]
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    ks = torch.tensor([min(k, vocab) if k > 0 else vocab for k in top_k], device=dev)
    ranks = torch.arange(vocab, device=dev)[None, :]
    remove = ranks >= ks[:, None]
    ps = torch.tensor(top_p, device=dev)
    probs = torch.softmax(sorted_logits.masked_fill(remove, float("-inf")), dim=-1)
    # Keep the smallest prefix whose mass reaches top_p (the top token always survives).
    remove |= (probs.cumsum(-1) - probs) >= ps[:, None]
    if any(min_p):  # drop tokens less likely than min_p x the top token's probability
        remove |= probs < torch.tensor(min_p, device=dev, dtype=probs.dtype)[:, None] * probs[:, :1]
    sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)


def _step_seed(seed: int, position: int) -> int:
    """A 64-bit seed for the noise of output token ``position`` of a request seeded with ``seed``
    (a multiplicative hash, so nearby seeds and positions do not give overlapping streams)."""
    return (seed * 0x9E3779B97F4A7C15 + position * 0xBF58476D1CE4E5B9 + 1) % 2**64
