"""The OpenAI-compatible server on loopback with the real SmolLM2, driven by the official openai client."""
import httpx
import pytest
from live_server import metric, server_in_thread, sse_data

from slimserve import assets
from slimserve.config import EngineConfig, ServeConfig

openai = pytest.importorskip("openai")

pytestmark = pytest.mark.real_model

PROMPT = "The capital of France is"
MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]
DESIGN_METRICS = [
    "slimserve:num_requests_running", "slimserve:num_requests_waiting", "slimserve:kv_cache_usage_perc",
    "slimserve:prompt_tokens_total", "slimserve:generation_tokens_total", "slimserve:request_success_total",
    "slimserve:time_to_first_token_seconds", "slimserve:inter_token_latency_seconds",
    "slimserve:e2e_request_latency_seconds", "slimserve:request_queue_time_seconds",
    "slimserve:prefix_cache_queries_total", "slimserve:prefix_cache_hits_total",
    "slimserve:spec_decode_num_draft_tokens_total", "slimserve:spec_decode_num_accepted_tokens_total",
    "http_requests_total", "http_request_duration_seconds", "active_requests",
]


@pytest.fixture(scope="module")
def server():
    engine_config = EngineConfig(model=str(assets.fetch("smollm2-135m")), max_model_len=1024,
                                 kv_cache_memory=128 * 2**20)
    with server_in_thread(engine_config, ServeConfig(max_tokens_limit=64)) as (url, engine):
        yield url, engine.tokenizer


@pytest.fixture(scope="module")
def client(server):
    url, _ = server
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def model_name(client):
    return client.models.list().data[0].id


@pytest.fixture(scope="module")
def greedy(client, model_name):
    return client.completions.create(model=model_name, prompt=PROMPT, max_tokens=8, temperature=0, logprobs=2)


def test_models_lists_the_served_model(client, model_name):
    assert [m.id for m in client.models.list().data] == [model_name] == ["SmolLM2-135M-Instruct.Q4_1.gguf"]


def test_completion_greedy_with_logprobs_and_usage(greedy, server):
    _, tokenizer = server
    choice = greedy.choices[0]
    assert "Paris" in choice.text
    assert choice.finish_reason == "length"
    assert greedy.usage.prompt_tokens == len(tokenizer.encode(PROMPT))
    assert greedy.usage.completion_tokens == 8 == len(choice.logprobs.tokens)
    assert greedy.usage.total_tokens == greedy.usage.prompt_tokens + 8
    assert "".join(choice.logprobs.tokens) == choice.text
    for token, logprob, top in zip(choice.logprobs.tokens, choice.logprobs.token_logprobs, choice.logprobs.top_logprobs):
        assert logprob <= 0 and token in top and len(top) <= 3
        assert logprob == pytest.approx(max(top.values()))  # greedy picks the most likely token


def test_completion_stream_equals_whole(client, model_name, greedy):
    chunks = list(client.completions.create(model=model_name, prompt=PROMPT, max_tokens=8, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == greedy.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8
    assert chunks[-1].usage.prompt_tokens == greedy.usage.prompt_tokens


def test_echo_returns_prompt_logprobs(client, model_name, server):
    """What lm-eval-harness' loglikelihood requests ask: echo + logprobs, one new token."""
    _, tokenizer = server
    result = client.completions.create(model=model_name, prompt=PROMPT, max_tokens=1, temperature=0, echo=True,
                                       logprobs=1)
    choice, num_prompt_tokens = result.choices[0], len(tokenizer.encode(PROMPT))
    assert choice.text.startswith(PROMPT)
    assert len(choice.logprobs.tokens) == num_prompt_tokens + 1
    assert "".join(choice.logprobs.tokens[:num_prompt_tokens]) == PROMPT
    assert choice.logprobs.token_logprobs[0] is None and choice.logprobs.top_logprobs[0] is None
    assert all(lp < 0 for lp in choice.logprobs.token_logprobs[1:])
    assert choice.logprobs.text_offset[:num_prompt_tokens] == [
        len("".join(choice.logprobs.tokens[:i])) for i in range(num_prompt_tokens)]


def test_chat_whole_and_streamed_agree(client, model_name, server):
    _, tokenizer = server
    whole = client.chat.completions.create(model=model_name, messages=MESSAGES, max_tokens=8, temperature=0)
    stream = list(client.chat.completions.create(model=model_name, messages=MESSAGES, max_tokens=8, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert whole.choices[0].message.role == "assistant" and whole.choices[0].message.content
    assert stream[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == whole.choices[0].message.content
    prompt_ids = tokenizer.encode(tokenizer.apply_chat_template(MESSAGES), add_special_tokens=False)
    assert whole.usage.prompt_tokens == stream[-1].usage.prompt_tokens == len(prompt_ids)
    assert whole.usage.completion_tokens == stream[-1].usage.completion_tokens <= 8


def test_chat_logprobs(client, model_name):
    result = client.chat.completions.create(model=model_name, messages=MESSAGES, max_tokens=4, temperature=0,
                                            logprobs=True, top_logprobs=3)
    content = result.choices[0].logprobs.content
    assert len(content) == result.usage.completion_tokens
    for entry in content:
        assert len(entry.top_logprobs) == 3
        values = [top.logprob for top in entry.top_logprobs]
        assert values == sorted(values, reverse=True) and entry.logprob == pytest.approx(values[0])


def test_n_choices_and_multiple_prompts(client, model_name):
    result = client.completions.create(model=model_name, prompt=[PROMPT, "Once upon a time"], n=3, max_tokens=4,
                                       temperature=1.0, seed=7, logprobs=0)
    assert [c.index for c in result.choices] == list(range(6))
    assert result.usage.completion_tokens == sum(len(c.logprobs.tokens) for c in result.choices)


def test_stop_string_cuts_the_text(client, model_name, greedy):
    text = greedy.choices[0].text
    stop = text[2:4]
    result = client.completions.create(model=model_name, prompt=PROMPT, max_tokens=8, temperature=0, stop=[stop])
    assert result.choices[0].text == text[:text.index(stop)]
    assert result.choices[0].finish_reason == "stop"


def test_seed_reproduces_sampling(client, model_name):
    def sample(seed: int) -> list[str]:
        result = client.completions.create(model=model_name, prompt=PROMPT, n=2, max_tokens=6, temperature=1.0,
                                           seed=seed)
        return [c.text for c in result.choices]

    assert sample(1234) == sample(1234)


def test_penalties_change_greedy_output(client, model_name):
    def greedy(**penalties) -> str:
        return client.completions.create(model=model_name, prompt="1 2 1 2 1 2 1 2 1 2", max_tokens=8, temperature=0,
                                         **penalties).choices[0].text

    assert greedy(frequency_penalty=2.0, presence_penalty=2.0) != greedy()
    assert greedy(extra_body={"repetition_penalty": 2.0}) != greedy()


def test_request_id_echoed_and_metrics_exposed(server, client, model_name):
    url, _ = server
    response = httpx.post(f"{url}/v1/completions", headers={"X-Request-Id": "trace-42"},
                          json={"model": model_name, "prompt": PROMPT, "max_tokens": 2, "stream": True})
    assert response.headers["x-request-id"] == "trace-42"
    assert sse_data(response.text.splitlines())[-1] == "[DONE]"
    assert len(httpx.get(f"{url}/health").headers["x-request-id"]) == 32  # one made up when none came
    text = httpx.get(f"{url}/metrics").text
    for name in DESIGN_METRICS:
        assert f"\n{name}" in text, name
    assert metric(text, "slimserve:generation_tokens_total") > 0
    assert metric(text, "http_requests_total", handler="/v1/completions", status="200") > 0


def test_echo_logprobs_of_a_repeated_prompt(client, model_name):
    """Broke once: the second echo + logprobs request of a prompt hit the prefix cache and failed the step
    (prompt logprobs need every position computed). lm-eval-harness repeats contexts all the time."""
    prompt = "The history of the city begins with a small settlement on the river. " * 4  # several full KV blocks
    first, second = (client.completions.create(model=model_name, prompt=prompt, max_tokens=1, temperature=0,
                                               echo=True, logprobs=1) for _ in range(2))
    assert first.choices[0].logprobs.token_logprobs == pytest.approx(second.choices[0].logprobs.token_logprobs)
