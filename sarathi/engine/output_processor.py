"""Output processing: detokenize, check stop strings, keep logprobs, build ``RequestOutput``s.

The scheduler has already appended each sampled token and applied the stops that need no text; what
needs text (stop strings) is found here and handed back to the engine, which finishes the sequence.

Prompt logprobs arrive chunk by chunk (rows of consecutive prompt positions, each row exactly once:
the scheduler never asks for a row twice, even when a preempted prompt is recomputed) and are kept per
request group, since the ``n`` / ``best_of`` sequences share one prompt (sequence 0 scores it).
With ``best_of > n`` the output holds the ``n`` sequences with the highest cumulative logprob.
"""

from __future__ import annotations

from dataclasses import dataclass

from sarathi.engine.group import RequestGroup
from sarathi.outputs import CompletionOutput, Logprob, PromptLogprobs, RequestOutput
from sarathi.request import Request, RequestStatus
from sarathi.scheduler import SeqUpdate
from sarathi.tokenizer import IncrementalDetokenizer, Tokenizer


@dataclass
class SeqText:
    """The text side of one sequence."""

    detok: IncrementalDetokenizer | None  # None with ``detokenize=False``: token ids only
    text: str = ""
    logprobs: list[dict[int, Logprob]] | None = None  # None unless the request asked for logprobs
    cumulative_logprob: float = 0.0  # of the sampled tokens, when their logprobs came with them
    stop_string: str | None = None


def _no_text(ids: list[int], skip_special_tokens: bool) -> None:
    return None


class OutputProcessor:
    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.groups: dict[str, RequestGroup] = {}
        self.seqs: dict[str, SeqText] = {}
        self.prompt_logprobs: dict[str, PromptLogprobs] = {}  # by group id, while being filled
        self._pieces: dict[int, str] = {}  # token id -> its text alone (prompt logprobs' decoded_token)

    def add(self, group: RequestGroup) -> None:
        self.groups[group.request_id] = group
        if group.params.prompt_logprobs is not None:
            self.prompt_logprobs[group.request_id] = [None]  # nothing precedes the first prompt token
        for s in group.seqs:
            p = s.params
            detok = (IncrementalDetokenizer(self.tokenizer, s.prompt_token_ids, p.skip_special_tokens)
                     if p.detokenize else None)
            self.seqs[s.request_id] = SeqText(detok, logprobs=[] if p.logprobs is not None else None)

    def remove(self, group: RequestGroup) -> None:
        self.groups.pop(group.request_id, None)
        self.prompt_logprobs.pop(group.request_id, None)
        for s in group.seqs:
            self.seqs.pop(s.request_id, None)

    def process(self, updates: list[SeqUpdate], now: float) -> tuple[list[RequestGroup], list[Request]]:
        """Apply ``updates``; return the groups that changed and the sequences a stop string ended."""
        touched: dict[str, RequestGroup] = {}
        stopped: list[Request] = []
        for u in updates:
            g = self.groups.get(u.request.group_id)
            if g is None:
                continue
            if u.error is not None:
                g.error = g.error or u.error
                touched[g.request_id] = g
                continue
            if u.prompt_logprobs is not None and not self._add_prompt_logprobs(g, u):
                g.error = g.error or "prompt logprobs arrived out of order (an engine bug)"
                touched[g.request_id] = g
                continue
            if u.token_id is not None:
                if self._append(u):
                    stopped.append(u.request)
                touched[g.request_id] = g
                if g.metrics.first_token_time is None:
                    g.metrics.first_token_time = now
                g.metrics.last_token_time = now
        return list(touched.values()), stopped

    def _add_prompt_logprobs(self, g: RequestGroup, u: SeqUpdate) -> bool:
        """Append the rows of one chunk: the row at position p is prompt token p + 1's entry. Returns
        False (nothing appended) if the rows do not continue the entries filled so far, which the
        scheduler's bookkeeping (each row asked for once, in order) rules out."""
        rows, out = u.prompt_logprobs, self.prompt_logprobs.get(g.request_id)
        assert rows is not None
        if out is None or rows.first + 1 != len(out):
            return False
        prompt, piece = g.prompt_token_ids, self._piece if u.request.params.detokenize else None
        for j, (lp, rank, ids, vals) in enumerate(zip(rows.logprobs, rows.ranks, rows.top_ids,
                                                        rows.top_logprobs)):
            tok = prompt[rows.first + j + 1]
            entry = {tok: Logprob(lp, rank, piece(tok) if piece else None)}
            for r, (i, v) in enumerate(zip(ids, vals), start=1):
                entry.setdefault(i, Logprob(v, r, piece(i) if piece else None))
            out.append(entry)
        return True

    def _piece(self, token_id: int) -> str:
        text = self._pieces.get(token_id)
        if text is None:
            text = self._pieces[token_id] = self.tokenizer.decode([token_id], False)
        return text

    def _append(self, u: SeqUpdate) -> bool:
        req, tok, st = u.request, u.token_id, self.seqs[u.request.request_id]
        assert tok is not None
        if u.logprobs is not None:
            lp, rank, top_ids, top_vals = u.logprobs
            st.cumulative_logprob += lp
            if st.logprobs is not None:
                text = self.tokenizer.decode if st.detok is not None else _no_text
                entry = {tok: Logprob(lp, rank, text([tok], False))}
                for r, (i, v) in enumerate(zip(top_ids, top_vals), start=1):
                    entry.setdefault(i, Logprob(v, r, text([i], False)))
                st.logprobs.append(entry)
        if st.detok is None:
            return False  # token ids only (no stop strings: SamplingParams refuses them without text)
        old_len = len(st.text)
        st.text += st.detok.add(tok)
        p = req.params
        # A stop string in the last token wins over the length limit (as in vLLM), not over EOS.
        done = req.finished and req.status is not RequestStatus.FINISHED_LENGTH
        if done or not p.stop_strings or req.num_output_tokens < p.min_tokens:
            return False
        for stop in p.stop_strings:
            idx = st.text.find(stop, max(0, old_len - len(stop) + 1))
            if idx != -1:
                st.text = st.text[: idx + len(stop) if p.include_stop_str_in_output else idx]
                st.stop_string = stop
                return True
        return False

    def output(self, g: RequestGroup) -> RequestOutput:
        params = g.params
        seqs = g.seqs
        if params.keeps_best:  # best_of > n: the n best by cumulative logprob (stable on ties)
            seqs = sorted(seqs, key=lambda s: -self.seqs[s.request_id].cumulative_logprob)[:params.n]
        comps = []
        for i, s in enumerate(seqs):
            st = self.seqs[s.request_id]
            comps.append(CompletionOutput(
                index=i, text=st.text, token_ids=s.output_token_ids,
                finish_reason=s.status.value if s.finished else None,
                stop_reason=st.stop_string if st.stop_string is not None else s.stop_reason,
                logprobs=list(st.logprobs) if st.logprobs is not None else None,
                cumulative_logprob=(st.cumulative_logprob if st.logprobs is not None or params.keeps_best
                                    else None),
            ))
        plp = self.prompt_logprobs.get(g.request_id)
        return RequestOutput(g.request_id, g.prompt, g.prompt_token_ids, comps, g.finished, g.metrics,
                             error=g.error, prompt_logprobs=list(plp) if plp is not None else None,
                             num_generated_tokens=sum(s.num_output_tokens for s in g.seqs),
                             num_cached_tokens=max(s.num_cached_tokens for s in g.seqs))
