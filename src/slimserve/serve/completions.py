"""POST /v1/completions: prompts (text or token ids) in, choices out, whole or as an SSE stream.

With echo, each choice starts with its prompt, and with logprobs also the prompt's token logprobs
(None for the first token), which is what lm-eval-harness' loglikelihood tasks read.
"""
from collections.abc import AsyncIterator
from dataclasses import dataclass

from fastapi import Request
from starlette.responses import Response

from slimserve.engine.llm_engine import CompletionOutput, RequestOutput
from slimserve.serve.context import ServingContext
from slimserve.serve.errors import APIError
from slimserve.serve.generation import Generation
from slimserve.serve.protocol import (CompletionChoice, CompletionLogprobs, CompletionRequest, CompletionResponse,
                                      check_limits, max_tokens_for, to_sampling_params)
from slimserve.serve.streaming import EventStream, json_when_complete, sse_event


async def create_completion(body: CompletionRequest, request: Request, ctx: ServingContext) -> Response:
    ctx.check_model(body.model)
    raw_prompts = _prompt_list(body.prompt)
    check_limits(body, len(raw_prompts), ctx.config)  # before tokenizing what may be thousands of prompts
    prompts = [await ctx.encode(p) if isinstance(p, str) else p for p in raw_prompts]
    if not all(prompts):
        raise APIError(400, "prompt must not be empty (it has no tokens)", "prompt")
    prompt_texts = [p if isinstance(p, str) else None for p in raw_prompts]
    max_tokens = max_tokens_for(body.max_tokens, [len(p) for p in prompts], ctx.max_model_len, ctx.config, "prompt")
    params = to_sampling_params(body, max_tokens, ctx.vocab_size)
    log = request.state.log
    log.prompt_tokens = sum(len(p) for p in prompts)
    generation = await ctx.client.generate(prompts, params, log)
    formatter = CompletionFormatter(ctx, body, prompt_texts)
    if body.stream:
        return EventStream(_events(generation, formatter, body), generation)
    return await json_when_complete(
        request, generation, _collect(generation, formatter),
        lambda choices, usage: CompletionResponse(id=f"cmpl-{generation.request_id}", created=generation.created,
                                                  model=ctx.model_name, choices=choices, usage=usage))


def _prompt_list(prompt: str | list[str] | list[int] | list[list[int]]) -> list[str | list[int]]:
    """OpenAI's four prompt forms as a list of prompts, each a string or a list of token ids."""
    if isinstance(prompt, str):
        prompt = [prompt]
    if prompt and isinstance(prompt[0], int):
        prompt = [prompt]
    if not prompt:
        raise APIError(400, "prompt must not be empty", "prompt")
    return prompt


@dataclass
class _ChoiceState:
    started: bool = False  # its first chunk (with the echoed prompt) went out
    offset: int = 0  # characters of text sent so far, for logprobs' text_offset


class CompletionFormatter:
    """Turns engine deltas into CompletionChoice deltas; a whole choice is the concatenation of its deltas."""

    def __init__(self, ctx: ServingContext, body: CompletionRequest, prompt_texts: list[str | None]):
        self.ctx = ctx
        self.body = body
        self.prompt_texts = prompt_texts
        self.states: dict[int, _ChoiceState] = {}

    def choice_delta(self, prompt_index: int, output: RequestOutput, completion: CompletionOutput) -> CompletionChoice:
        index = prompt_index * self.body.n + completion.index
        state = self.states.setdefault(index, _ChoiceState())
        text, logprobs = "", None if self.body.logprobs is None else CompletionLogprobs()
        if self.body.echo and not state.started:
            prompt_text = self.prompt_texts[prompt_index]
            text = prompt_text if prompt_text is not None else self.ctx.tokenizer.decode(output.prompt_token_ids)
            if logprobs is not None:
                self._add_logprobs(logprobs, output.prompt_token_ids, output.prompt_logprobs, state.offset)
        state.started = True
        if logprobs is not None:
            self._add_logprobs(logprobs, completion.token_ids, completion.logprobs, state.offset + len(text))
        text += completion.text
        state.offset += len(text)
        return CompletionChoice(index=index, text=text, logprobs=logprobs, finish_reason=completion.finish_reason)

    def _add_logprobs(self, logprobs: CompletionLogprobs, token_ids: list[int],
                      entries: list[dict[int, float] | None], offset: int) -> None:
        assert len(entries) == len(token_ids), (len(entries), len(token_ids))
        for token_id, entry in zip(token_ids, entries):
            token = self.ctx.token_text(token_id)
            logprobs.tokens.append(token)
            logprobs.token_logprobs.append(None if entry is None else entry[token_id])
            logprobs.top_logprobs.append(None if entry is None else
                                         {self.ctx.token_text(t): lp for t, lp in entry.items()})
            logprobs.text_offset.append(offset)
            offset += len(token)


def _has_news(choice: CompletionChoice) -> bool:
    return bool(choice.text) or choice.finish_reason is not None or bool(choice.logprobs and choice.logprobs.tokens)


async def _collect(generation: Generation, formatter: CompletionFormatter) -> list[CompletionChoice]:
    choices: dict[int, CompletionChoice] = {}
    async for prompt_index, output in generation:
        for completion in output.outputs:
            delta = formatter.choice_delta(prompt_index, output, completion)
            if delta.index not in choices:
                choices[delta.index] = CompletionChoice(
                    index=delta.index, text="", logprobs=None if delta.logprobs is None else CompletionLogprobs())
            whole = choices[delta.index]
            whole.text += delta.text
            whole.finish_reason = delta.finish_reason
            if delta.logprobs is not None:
                for name in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
                    getattr(whole.logprobs, name).extend(getattr(delta.logprobs, name))
    return [choices[i] for i in sorted(choices)]


async def _events(generation: Generation, formatter: CompletionFormatter,
                  body: CompletionRequest) -> AsyncIterator[bytes]:
    chunk_id, model = f"cmpl-{generation.request_id}", formatter.ctx.model_name
    async for prompt_index, output in generation:
        for completion in output.outputs:
            choice = formatter.choice_delta(prompt_index, output, completion)
            if _has_news(choice):
                yield sse_event(CompletionResponse(id=chunk_id, created=generation.created, model=model,
                                                   choices=[choice]))
    if body.include_usage:
        yield sse_event(CompletionResponse(id=chunk_id, created=generation.created, model=model, choices=[],
                                           usage=generation.usage()))
