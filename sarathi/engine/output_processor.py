"""Output processing: detokenize, check stop strings, keep logprobs, build ``RequestOutput``s.

The scheduler has already appended each sampled token and applied the stops that need no text; what
needs text (stop strings) is found here and handed back to the engine, which finishes the sequence.
"""

from __future__ import annotations

from dataclasses import dataclass

from sarathi.engine.group import RequestGroup
from sarathi.outputs import CompletionOutput, Logprob, RequestOutput
from sarathi.request import Request, RequestStatus
from sarathi.scheduler import SeqUpdate
from sarathi.tokenizer import IncrementalDetokenizer, Tokenizer


@dataclass
class SeqText:
    """The text side of one sequence."""

    detok: IncrementalDetokenizer | None  # None with ``detokenize=False``: token ids only
    text: str = ""
    logprobs: list[dict[int, Logprob]] | None = None
    cumulative_logprob: float = 0.0
    stop_string: str | None = None


def _no_text(ids: list[int], skip_special_tokens: bool) -> None:
    return None


class OutputProcessor:
    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.groups: dict[str, RequestGroup] = {}
        self.seqs: dict[str, SeqText] = {}

    def add(self, group: RequestGroup) -> None:
        self.groups[group.request_id] = group
        for s in group.seqs:
            p = s.params
            detok = (IncrementalDetokenizer(self.tokenizer, s.prompt_token_ids, p.skip_special_tokens)
                     if p.detokenize else None)
            self.seqs[s.request_id] = SeqText(detok, logprobs=[] if p.logprobs is not None else None)

    def remove(self, group: RequestGroup) -> None:
        self.groups.pop(group.request_id, None)
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
            elif u.token_id is not None:
                if self._append(u):
                    stopped.append(u.request)
                touched[g.request_id] = g
                if g.metrics.first_token_time is None:
                    g.metrics.first_token_time = now
                g.metrics.last_token_time = now
        return list(touched.values()), stopped

    def _append(self, u: SeqUpdate) -> bool:
        req, tok, st = u.request, u.token_id, self.seqs[u.request.request_id]
        assert tok is not None
        if u.logprobs is not None and st.logprobs is not None:
            lp, rank, top_ids, top_vals = u.logprobs
            text = self.tokenizer.decode if st.detok is not None else _no_text
            entry = {tok: Logprob(lp, rank, text([tok], False))}
            for r, (i, v) in enumerate(zip(top_ids, top_vals), start=1):
                entry.setdefault(i, Logprob(v, r, text([i], False)))
            st.logprobs.append(entry)
            st.cumulative_logprob += lp
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
        comps = []
        for i, s in enumerate(g.seqs):
            st = self.seqs[s.request_id]
            comps.append(CompletionOutput(
                index=i, text=st.text, token_ids=s.output_token_ids,
                finish_reason=s.status.value if s.finished else None,
                stop_reason=st.stop_string if st.stop_string is not None else s.stop_reason,
                logprobs=list(st.logprobs) if st.logprobs is not None else None,
                cumulative_logprob=st.cumulative_logprob if st.logprobs is not None else None,
            ))
        return RequestOutput(g.request_id, g.prompt, g.prompt_token_ids, comps, g.finished, g.metrics,
                             error=g.error)
