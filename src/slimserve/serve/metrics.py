"""Prometheus metrics on the app's own registry, named as vLLM names them so its dashboards work.

Engine gauges and totals are read from EngineStats when Prometheus scrapes; latencies are
observed per request by the server as its tokens arrive.
"""
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from slimserve.engine.llm_engine import EngineStats

# vLLM's buckets, extended down to 1 ms where a GPU decodes a token in a few.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5,
               5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
REQUEST_BUCKETS = (0.01, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
                   60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
HTTP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class EngineCollector(Collector):
    """The engine's gauges and running totals, read once per scrape."""

    def __init__(self, model_name: str, stats: Callable[[], EngineStats]):
        self.model_name = model_name
        self.stats = stats

    def collect(self) -> Iterator[Metric]:
        stats = self.stats()
        gauges = [
            ("slimserve:num_requests_running", "Sequences in the running batch.", stats.num_running),
            ("slimserve:num_requests_waiting", "Sequences waiting to be scheduled.", stats.num_waiting),
            ("slimserve:kv_cache_usage_perc", "Fraction of KV cache blocks in use (1 = all).", stats.kv_cache_usage),
        ]
        counters = [
            ("slimserve:prompt_tokens", "Prompt tokens processed.", stats.num_prompt_tokens),
            ("slimserve:generation_tokens", "Tokens generated.", stats.num_generation_tokens),
            ("slimserve:num_preemptions", "Sequences preempted for lack of KV blocks.", stats.num_preemptions),
            ("slimserve:prefix_cache_queries", "Tokens looked up in the prefix cache.", stats.prefix_cache_queries),
            ("slimserve:prefix_cache_hits", "Tokens found in the prefix cache.", stats.prefix_cache_hits),
            # The engine has no speculative decoding yet: no draft token was proposed or accepted.
            ("slimserve:spec_decode_num_draft_tokens", "Draft tokens proposed.", 0),
            ("slimserve:spec_decode_num_accepted_tokens", "Draft tokens accepted.", 0),
        ]
        for name, documentation, value in gauges:
            family = GaugeMetricFamily(name, documentation, labels=["model_name"])
            family.add_metric([self.model_name], value)
            yield family
        for name, documentation, value in counters:
            family = CounterMetricFamily(name, documentation, labels=["model_name"])
            family.add_metric([self.model_name], value)
            yield family


class ServeMetrics:
    def __init__(self, model_name: str, stats: Callable[[], EngineStats],
                 gpu_utilization: Callable[[], float] | None = None):
        """gpu_utilization: percent busy of the engine's GPU, None where the engine runs on the CPU."""
        self.model_name = model_name
        self.registry = CollectorRegistry()
        self.registry.register(EngineCollector(model_name, stats))
        registry, labels = self.registry, ["model_name"]
        self.request_success = Counter("slimserve:request_success", "Finished completions by finish reason.",
                                       labels + ["finished_reason"], registry=registry)
        self.time_to_first_token = Histogram("slimserve:time_to_first_token_seconds",
                                             "Time from arrival in the engine to the first token.", labels,
                                             buckets=TTFT_BUCKETS, registry=registry)
        self.inter_token_latency = Histogram("slimserve:inter_token_latency_seconds",
                                             "Time between successive outputs of one request.", labels,
                                             buckets=ITL_BUCKETS, registry=registry)
        self.e2e_request_latency = Histogram("slimserve:e2e_request_latency_seconds",
                                             "Time from arrival in the engine to the last token.", labels,
                                             buckets=REQUEST_BUCKETS, registry=registry)
        self.request_queue_time = Histogram("slimserve:request_queue_time_seconds",
                                            "Time from arrival in the engine to first being scheduled.", labels,
                                            buckets=REQUEST_BUCKETS, registry=registry)
        self.http_requests = Counter("http_requests", "HTTP requests answered.", ["method", "handler", "status"],
                                     registry=registry)
        self.http_request_duration = Histogram("http_request_duration_seconds",
                                               "Time from a request's arrival to its last response byte.",
                                               ["method", "handler"], buckets=HTTP_BUCKETS, registry=registry)
        self.active_requests = Gauge("active_requests", "HTTP requests being handled.", registry=registry)
        if gpu_utilization is not None:
            gauge = Gauge("gpu_utilization", "Percent of time the GPU was busy over the last sample period.",
                          registry=registry)
            gauge.set_function(gpu_utilization)

    def observe_first_token(self, ttft: float, queue_time: float) -> None:
        self.time_to_first_token.labels(self.model_name).observe(ttft)
        self.request_queue_time.labels(self.model_name).observe(queue_time)

    def observe_inter_token(self, latency: float) -> None:
        self.inter_token_latency.labels(self.model_name).observe(latency)

    def observe_finished(self, finish_reason: str, e2e_latency: float) -> None:
        self.request_success.labels(self.model_name, finish_reason).inc()
        self.e2e_request_latency.labels(self.model_name).observe(e2e_latency)

    def observe_http(self, method: str, handler: str, status: int, duration: float) -> None:
        self.http_requests.labels(method, handler, str(status)).inc()
        self.http_request_duration.labels(method, handler).observe(duration)

    def render(self) -> bytes:
        return generate_latest(self.registry)
