"""POST /v1/chat/completions: messages rendered by the model's chat template (sandboxed Jinja), then
generated like a completion and answered as assistant messages, whole or as an SSE stream."""
from collections.abc import AsyncIterator

from fastapi import Request
from starlette.responses import Response

from slimserve.engine.llm_engine import CompletionOutput
from slimserve.serve.context import ServingContext
from slimserve.serve.errors import APIError
from slimserve.serve.generation import Generation
from slimserve.serve.protocol import (ChatChoice, ChatChunkChoice, ChatCompletionChunk, ChatCompletionRequest,
                                      ChatCompletionResponse, ChatDelta, ChatLogprobs, ChatResponseMessage,
                                      TokenLogprob, TopLogprob, check_limits, max_tokens_for,
                                      to_sampling_params)
from slimserve.serve.streaming import EventStream, json_when_complete, sse_event


async def create_chat_completion(body: ChatCompletionRequest, request: Request, ctx: ServingContext) -> Response:
    ctx.check_model(body.model)
    try:
        text = ctx.tokenizer.apply_chat_template([m.as_template_input() for m in body.messages])
    except ValueError as error:  # no template, or the template's raise_exception() refused the messages
        raise APIError(400, str(error), "messages") from error
    # The template writes any BOS itself, so encoding must not add another.
    prompt_ids = await ctx.encode(text, add_special_tokens=False)
    if not prompt_ids:
        raise APIError(400, "the chat template rendered these messages as an empty prompt", "messages")
    check_limits(body, 1, ctx.config)
    requested = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    max_tokens = max_tokens_for(requested, [len(prompt_ids)], ctx.max_model_len, ctx.config, "messages")
    params = to_sampling_params(body, max_tokens, ctx.vocab_size)
    log = request.state.log
    log.prompt_tokens = len(prompt_ids)
    generation = await ctx.client.generate([prompt_ids], params, log)
    if body.stream:
        return EventStream(_events(generation, ctx, body), generation)
    return await json_when_complete(
        request, generation, _collect(generation, ctx, body),
        lambda choices, usage: ChatCompletionResponse(id=f"chatcmpl-{generation.request_id}",
                                                      created=generation.created, model=ctx.model_name,
                                                      choices=choices, usage=usage))


def _logprobs(ctx: ServingContext, completion: CompletionOutput, num_top: int) -> ChatLogprobs | None:
    """Each token with its num_top most likely alternatives (the engine adds the sampled token to them)."""
    if completion.logprobs is None:
        return None
    content = []
    for token_id, entry in zip(completion.token_ids, completion.logprobs):
        top = sorted(entry.items(), key=lambda item: -item[1])[:num_top]
        content.append(TokenLogprob(**_top(ctx, token_id, entry[token_id]).model_dump(),
                                    top_logprobs=[_top(ctx, t, lp) for t, lp in top]))
    return ChatLogprobs(content=content)


def _top(ctx: ServingContext, token_id: int, logprob: float) -> TopLogprob:
    token = ctx.token_text(token_id)
    return TopLogprob(token=token, logprob=logprob, bytes=list(token.encode()))


async def _collect(generation: Generation, ctx: ServingContext, body: ChatCompletionRequest) -> list[ChatChoice]:
    choices = [ChatChoice(index=i, message=ChatResponseMessage(content=""),
                          logprobs=ChatLogprobs(content=[]) if body.logprobs else None) for i in range(body.n)]
    async for _, output in generation:
        for completion in output.outputs:
            choice = choices[completion.index]
            choice.message.content += completion.text
            choice.finish_reason = completion.finish_reason
            logprobs = _logprobs(ctx, completion, body.top_logprobs or 0)
            if logprobs is not None:
                choice.logprobs.content += logprobs.content
    return choices


async def _events(generation: Generation, ctx: ServingContext, body: ChatCompletionRequest) -> AsyncIterator[bytes]:
    chunk_id, created, model = f"chatcmpl-{generation.request_id}", generation.created, ctx.model_name

    def chunk(choice: ChatChunkChoice) -> bytes:
        return sse_event(ChatCompletionChunk(id=chunk_id, created=created, model=model, choices=[choice]))

    # OpenAI opens each choice with the role and empty content.
    for index in range(body.n):
        yield chunk(ChatChunkChoice(index=index, delta=ChatDelta(role="assistant", content="")))
    async for _, output in generation:
        for completion in output.outputs:
            logprobs = _logprobs(ctx, completion, body.top_logprobs or 0)
            if completion.text or completion.finish_reason is not None or (logprobs and logprobs.content):
                yield chunk(ChatChunkChoice(index=completion.index, delta=ChatDelta(content=completion.text),
                                            logprobs=logprobs, finish_reason=completion.finish_reason))
    if body.include_usage:
        yield sse_event(ChatCompletionChunk(id=chunk_id, created=created, model=model, choices=[],
                                            usage=generation.usage()))
