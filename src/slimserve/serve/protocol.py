"""OpenAI's request and response bodies as pydantic models, and request -> SamplingParams.

Requests forbid unknown fields (OpenAI answers "Unrecognized request argument") and non-finite
floats; everything else a field must satisfy is checked once, by SamplingParams or the limits here.
"""
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from slimserve.config import ServeConfig
from slimserve.engine.sampling_params import SamplingParams
from slimserve.serve.errors import APIError

TokenIds = Annotated[list[int], Field(min_length=1)]


class RequestModel(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class StreamOptions(RequestModel):
    include_usage: bool = False


class SamplingRequest(RequestModel):
    """The fields completions and chat completions share."""
    model: str | None = None  # None: the served model
    n: int = 1
    max_tokens: int | None = None
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_tokens: int = 0
    ignore_eos: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # accepted as OpenAI does; the access log has the request id instead

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(SamplingRequest):
    # A string, a list of strings, a list of token ids, or a list of token-id lists.
    prompt: str | list[str] | TokenIds | list[TokenIds]
    max_tokens: int | None = 16  # OpenAI's default for completions
    echo: bool = False
    logprobs: int | None = None  # top alternatives per token; with echo, for the prompt's tokens too

    @property
    def num_logprobs(self) -> int | None:
        return self.logprobs


class TextPart(RequestModel):
    type: Literal["text"]
    text: str


class ChatMessage(RequestModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def as_template_input(self) -> dict:
        content = self.content
        if isinstance(content, list):
            content = "".join(part.text for part in content)
        return {"role": self.role, "content": content or ""}


class ChatCompletionRequest(SamplingRequest):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: int | None = None  # the newer name of max_tokens; wins when both are set
    logprobs: bool = False
    top_logprobs: int | None = None

    @property
    def num_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


def check_limits(request: CompletionRequest | ChatCompletionRequest, num_prompts: int, config: ServeConfig) -> None:
    """The server's own bounds on one request's work (400s naming the field)."""
    if request.n * num_prompts > config.max_n:
        raise APIError(400, f"n ({request.n}) times the number of prompts ({num_prompts}) is more than this "
                            f"server's limit of {config.max_n} choices per request", "n")
    if isinstance(request, ChatCompletionRequest) and request.top_logprobs is not None and not request.logprobs:
        raise APIError(400, "top_logprobs needs logprobs: true", "top_logprobs")
    num_logprobs = request.num_logprobs
    if num_logprobs is not None and num_logprobs > config.max_logprobs:
        param = "top_logprobs" if isinstance(request, ChatCompletionRequest) else "logprobs"
        raise APIError(400, f"{param} must be at most {config.max_logprobs}, got {num_logprobs}", param)


def max_tokens_for(requested: int | None, prompt_lens: list[int], max_model_len: int, config: ServeConfig,
                   prompt_param: str) -> int:
    """The max_tokens to run with: the request's, checked against the limits and the context, or
    (when unset) as many as the context leaves, capped by the server's limit. prompt_param names
    the field that holds the prompt ("prompt" or "messages") in errors."""
    longest = max(prompt_lens)
    if config.max_prompt_tokens is not None and longest > config.max_prompt_tokens:
        raise APIError(400, f"the prompt has {longest} tokens, more than this server's limit of "
                            f"{config.max_prompt_tokens}", prompt_param, "prompt_too_long")
    if longest >= max_model_len:
        raise APIError(400, f"This model's maximum context length is {max_model_len} tokens, but the prompt has "
                            f"{longest} tokens, which leaves no room for a completion", prompt_param,
                       "context_length_exceeded")
    if requested is None:
        return min(config.max_tokens_limit, max_model_len - longest)
    if requested < 1:
        raise APIError(400, f"max_tokens must be at least 1, got {requested}", "max_tokens")
    if requested > config.max_tokens_limit:
        raise APIError(400, f"max_tokens must be at most {config.max_tokens_limit}, got {requested}", "max_tokens")
    if longest + requested > max_model_len:
        raise APIError(400, f"This model's maximum context length is {max_model_len} tokens. However, you requested "
                            f"{longest + requested} tokens ({longest} in the prompt, {requested} in the completion).",
                       "max_tokens", "context_length_exceeded")
    return requested


def to_sampling_params(request: CompletionRequest | ChatCompletionRequest, max_tokens: int,
                       vocab_size: int) -> SamplingParams:
    stop_token_ids = request.stop_token_ids or []
    bad = [t for t in stop_token_ids if not 0 <= t < vocab_size]
    if bad:
        raise APIError(400, f"stop_token_ids must be token ids in [0, {vocab_size}), got {bad[:5]}", "stop_token_ids")
    echo_logprobs = isinstance(request, CompletionRequest) and request.echo
    try:
        return SamplingParams(
            n=request.n, temperature=request.temperature, top_p=request.top_p, top_k=request.top_k,
            min_p=request.min_p, repetition_penalty=request.repetition_penalty,
            presence_penalty=request.presence_penalty, frequency_penalty=request.frequency_penalty,
            seed=request.seed, max_tokens=max_tokens, min_tokens=request.min_tokens, stop=request.stop or [],
            stop_token_ids=stop_token_ids, ignore_eos=request.ignore_eos, logprobs=request.num_logprobs,
            prompt_logprobs=request.num_logprobs if echo_logprobs else None)
    except ValueError as error:  # SamplingParams names the field first
        raise APIError(400, str(error), str(error).split()[0]) from error


# ---- responses -------------------------------------------------------------------------------------

class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    tokens: list[str] = []
    token_logprobs: list[float | None] = []  # None for the first prompt token, which nothing predicts
    top_logprobs: list[dict[str, float] | None] = []
    text_offset: list[int] = []


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class CompletionResponse(BaseModel):
    """A whole completion, and (with stream) each chunk of one: OpenAI uses one object for both."""
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob]


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "slimserve"
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    error: ErrorInfo
