"""The offline API, shaped like vLLM's: ``LLM(...).generate(prompts, sampling_params)``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tqdm.auto import tqdm

from sarathi.config import EngineArgs
from sarathi.engine import LLMEngine, PromptType
from sarathi.outputs import RequestOutput
from sarathi.sampling_params import SamplingParams


class LLM:
    """Loads a model once and runs batches of prompts to completion with the chosen scheduler."""

    def __init__(self, model: str | None = None, **kwargs: Any) -> None:
        """``kwargs`` are ``EngineArgs`` fields (``dtype``, ``scheduler``, ``chunk_size``, ...); an unknown
        one raises InvalidArgument naming it."""
        self.engine = LLMEngine(EngineArgs.from_kwargs(model=model, **kwargs))
        self._counter = 0

    @classmethod
    def from_engine(cls, engine: LLMEngine) -> LLM:
        """Wrap an already built engine (e.g. one made from parsed CLI flags)."""
        llm = cls.__new__(cls)
        llm.engine, llm._counter = engine, 0
        return llm

    def get_tokenizer(self) -> Any:
        return self.engine.tokenizer

    def close(self) -> None:
        """Shut the engine down (stops pipeline ranks; writes the ``trace`` file, if any). Idempotent."""
        self.engine.shutdown()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        # Only the trace is written here, the engine is not shut down: ``LLM(...).engine`` keeps using
        # an engine whose wrapper is already gone. (The engine writes it again when it is collected.)
        engine = getattr(self, "engine", None)
        if engine is not None and getattr(engine, "tracer", None) is not None:
            try:
                engine.write_trace()
            except Exception:  # at interpreter exit, or an unwritable path: nothing to report to
                pass

    def generate(
        self,
        prompts: PromptType | Sequence[PromptType],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Generate for every prompt; outputs come back in input order.

        All prompts are validated before any is queued, so a bad one raises ValueError and runs nothing.
        """
        if isinstance(prompts, (str, dict)) or (
            isinstance(prompts, list) and prompts and isinstance(prompts[0], int)
        ):
            prompts = [prompts]
        prompts = list(prompts)
        if isinstance(sampling_params, Sequence):
            if len(sampling_params) != len(prompts):
                raise ValueError("sampling_params: a list must have one entry per prompt")
            params = list(sampling_params)
        else:
            params = [sampling_params or SamplingParams()] * len(prompts)
        groups = []
        for prompt, p in zip(prompts, params):
            groups.append(self.engine.make_request(str(self._counter), prompt, p))
            self._counter += 1
        order = {g.request_id: i for i, g in enumerate(groups)}
        for g in groups:
            self.engine.add_group(g)
        results: list[RequestOutput | None] = [None] * len(groups)
        bar = tqdm(total=len(groups), desc="Generating", disable=not use_tqdm)
        try:
            while any(r is None for r in results):
                for out in self.engine.step():
                    if out.finished and out.request_id in order:
                        results[order[out.request_id]] = out
                        bar.update(1)
        except BaseException:
            self.engine.abort_request(list(order))
            raise
        finally:
            bar.close()
        return [r for r in results if r is not None]

    def chat(
        self,
        messages: list[dict[str, Any]] | list[list[dict[str, Any]]],
        sampling_params: SamplingParams | None = None,
        add_generation_prompt: bool = True,
        chat_template: str | None = None,
        use_tqdm: bool = True,
        *,
        continue_final_message: bool = False,
        tools: list[dict[str, Any]] | None = None,
        documents: list[dict[str, Any]] | None = None,
        chat_template_kwargs: dict[str, Any] | None = None,
    ) -> list[RequestOutput]:
        """Apply the chat template (``chat_template``, else the model's) to one conversation (or a list of
        them) and generate. As vLLM's ``LLM.chat``: ``tools`` (OpenAI's function definitions) and
        ``documents`` reach the template, which must read them (else ``InvalidArgument`` naming the
        field); ``chat_template_kwargs`` are extra template variables (e.g. ``enable_thinking``);
        ``continue_final_message`` leaves the last message open (with ``add_generation_prompt=False``).
        The text comes back as generated: tool calls in it are not parsed (the server does that)."""
        from sarathi.server.chat import render_chat
        from sarathi.server.protocol import ChatTemplateFields

        convs = messages if messages and isinstance(messages[0], list) else [messages]
        tok = self.engine.tokenizer
        fields = ChatTemplateFields(add_generation_prompt=add_generation_prompt,
                                    continue_final_message=continue_final_message, tools=tools,
                                    documents=documents, chat_template_kwargs=chat_template_kwargs)
        texts = [render_chat(tok, c, fields, chat_template) for c in convs]  # type: ignore[arg-type]
        # The template already holds any BOS token: encode it without adding special tokens again.
        ids = [{"prompt": t, "prompt_token_ids": tok.encode(t, False)} for t in texts]
        return self.generate(ids, sampling_params, use_tqdm)
