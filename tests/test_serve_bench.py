"""The serving load generator against a tiny local server, and its statistics against numpy."""
import numpy as np
import pytest
from live_server import server_in_thread
from tiny_gguf import random_state_dict, write_gguf

from slimserve.config import EngineConfig, ServeConfig
from slimserve.eval.serve_bench import (Percentiles, RequestTiming, ServeBenchConfig, markdown_table, plot,
                                        run_serve_bench, summarize)


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    model = write_gguf(tmp_path_factory.mktemp("model") / "tiny.gguf", "llama", random_state_dict("llama"))
    engine_config = EngineConfig(model=str(model), max_model_len=256, kv_cache_memory=16 * 2**20)
    with server_in_thread(engine_config, ServeConfig(api_keys=["bench-key"])) as (base_url, _):
        yield base_url


def test_percentiles_match_numpy():
    values = list(np.random.default_rng(0).exponential(size=37))
    p = Percentiles.of(values, scale=1000)
    expected = np.percentile(np.array(values) * 1000, [50, 90, 99])
    assert [p.p50, p.p90, p.p99] == pytest.approx(list(expected))
    assert p.mean == pytest.approx(np.mean(values) * 1000)


def test_summarize_follows_vllm_definitions():
    timings = [RequestTiming(ok=True, input_tokens=10, output_tokens=5, ttft=0.1, e2e=0.5, itls=[0.1] * 4),
               RequestTiming(ok=True, input_tokens=10, output_tokens=3, ttft=0.2, e2e=0.4, itls=[0.1, 0.1]),
               RequestTiming(ok=False, error="HTTP 429")]
    result = summarize(timings, concurrency=2, duration=2.0)
    assert (result.num_requests, result.num_errors, result.errors) == (3, 1, ["HTTP 429"])
    assert result.request_throughput == 1.0 and result.output_throughput == 4.0
    assert result.total_token_throughput == 14.0
    assert result.tpot_ms.mean == pytest.approx(100.0)  # (0.5 - 0.1) / 4 and (0.4 - 0.2) / 2
    assert result.ttft_ms.p50 == pytest.approx(150.0)


def test_bench_against_a_live_server(url, tmp_path):
    config = ServeBenchConfig(base_url=url, api_key="bench-key", concurrencies=[1, 4], num_prompts=4,
                              input_len=12, output_len=6)
    results = run_serve_bench(config)
    assert [r.concurrency for r in results] == [1, 4]
    for r in results:
        assert r.num_errors == 0 and r.num_requests == 4, r.errors
        assert r.mean_output_tokens == 6 and r.mean_input_tokens > 0
        assert 0 < r.ttft_ms.p50 <= r.ttft_ms.p90 <= r.ttft_ms.p99
        assert r.e2e_s.p50 * 1000 >= r.ttft_ms.p50
    assert markdown_table(results).count("\n| ") == 2
    plot(results, tmp_path / "serve.png")
    assert (tmp_path / "serve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_counts_refused_requests_as_errors(url):
    results = run_serve_bench(ServeBenchConfig(base_url=url, api_key="bench-key", model="not-served",
                                               concurrencies=[2], num_prompts=2, input_len=4, output_len=2))
    assert results[0].num_errors == 2 and "HTTP 404" in results[0].errors[0]
