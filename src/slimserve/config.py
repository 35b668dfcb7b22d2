"""Configuration dataclasses; every default is written once, here."""

import fnmatch
from dataclasses import dataclass, field, fields, replace

QUANT_METHODS = ("rtn", "gptq", "awq", "smoothquant", "qat")
ENGINE_DTYPES = ("fp32", "bf16", "fp16")
# "auto": bf16 where matrix products run natively in it, else fp32 (quant/gptq.py). fp16 would
# overflow on large activations and on the drift sums.
CALIB_DTYPES = ("auto", "fp32", "bf16")
# One value for the whole model: the method, its calibration set, GPTQ's token weights (one
# Hessian is shared by the linears that read one input) and calibration dtype, and SmoothQuant's
# alpha (its scales fold into the norms those linears share), so `modules` may not override them.
MODEL_WIDE = ("method", "num_calib_samples", "calib_seq_len", "sink_weight", "calib_dtype", "smooth_alpha")
# SmoothQuant's migration strength for method "smoothquant" (quant/smoothquant.py). SmolLM2 W8A8, fp32,
# 4 windows: +1.36 % perplexity at the paper's 0.5, +0.91 % at 0.65, +1.68 % at 0.8.
SMOOTH_ALPHA = 0.65
# Methods that take SmoothQuant's scales first: AWQ searches scales of its own, QAT trains the weights.
SMOOTHED_METHODS = ("rtn", "gptq", "smoothquant")


@dataclass
class QuantConfig:
    """How to quantize a model's linear layers.

    group_size: -1 = one scale per output channel, 0 = one scale per tensor, g > 0 = one scale
    per g consecutive input columns of each output channel (checked against in_features when
    applied to a layer). Symmetric quantization uses the fixed zero point 2^(bits-1), as GPTQ does.

    `modules` maps a module name or pattern to field overrides, e.g. {"lm_head": {"bits": 8}} or
    {"mlp.down_proj": {"skip": True}}; `skip` lists names or patterns left in full precision.
    A key matches a module name exactly, as its last dotted components ("q_proj" matches
    "layers.0.self_attn.q_proj"), or as an fnmatch glob ("layers.1?.*"). Overrides apply in
    dict order, so later keys win. The MODEL_WIDE fields cannot be overridden.
    """

    method: str = "rtn"
    bits: int = 4
    group_size: int = 128
    sym: bool = True
    act_bits: int | None = None  # 8: int8 activations quantized at run time (W8A8 per token, W4A8 per group)
    act_order: bool = False  # GPTQ desc_act: columns in order of decreasing Hessian diagonal
    static_groups: bool = False  # GPTQ: group scales fixed before act-order, g_idx stays trivial
    damp_percent: float = 0.01
    awq_clip: bool = True  # AWQ: search each group's clipping range after scaling (AutoAWQ's apply_clip)
    mse: bool = False  # RTN, GPTQ, SmoothQuant: search each scale's range (rtn.py), not min-max
    block_size: int = 128  # GPTQ lazy-update block width (columns)
    sink_weight: float = 16.0  # GPTQ: each calibration sequence's first token counts this often (quant/gptq.py)
    fp_target: float = 0.5  # GPTQ: how far each linear's target moves toward the float model's output (quant/gptq.py)
    calib_dtype: str = "auto"  # GPTQ: dtype of the calibration forward passes (Hessians and targets stay fp32)
    # SmoothQuant's α: its scales are folded in before RTN or GPTQ quantizes (SmoothQuant + GPTQ is
    # llm-compressor's W8A8 recipe); None: no smoothing, but method "smoothquant" (RTN) takes SMOOTH_ALPHA.
    smooth_alpha: float | None = None
    num_calib_samples: int = 128
    calib_seq_len: int = 2048
    modules: dict[str, dict] = field(default_factory=dict)
    skip: list[str] = field(default_factory=lambda: ["embed_tokens"])

    def __post_init__(self) -> None:
        if self.method not in QUANT_METHODS:
            raise ValueError(f"method must be one of {QUANT_METHODS}, got {self.method!r}")
        if not 2 <= self.bits <= 8:
            raise ValueError(f"bits must be between 2 and 8, got {self.bits}")
        if self.group_size < -1:
            raise ValueError(
                f"group_size must be -1 (per channel), 0 (per tensor) or positive, got {self.group_size}"
            )
        check_act_bits(self.act_bits, self.bits, self.sym, self.group_size)
        if self.mse and self.method in ("awq", "qat"):
            raise ValueError(f"mse searches RTN's and GPTQ's ranges; {self.method} has its own (awq_clip for AWQ)")
        if not 0 < self.damp_percent <= 1:
            raise ValueError(f"damp_percent must be in (0, 1], got {self.damp_percent}")
        if not self.sink_weight > 0:
            raise ValueError(f"sink_weight must be positive, got {self.sink_weight}")
        if not 0 <= self.fp_target <= 1:
            raise ValueError(f"fp_target must be in [0, 1], got {self.fp_target}")
        if self.method == "smoothquant" and self.smooth_alpha is None:
            self.smooth_alpha = SMOOTH_ALPHA
        if self.smooth_alpha is not None and self.method not in SMOOTHED_METHODS:
            raise ValueError(f"smooth_alpha applies before {', '.join(SMOOTHED_METHODS)}; {self.method} cannot take it")
        if self.smooth_alpha is not None and not 0 <= self.smooth_alpha <= 1:
            raise ValueError(f"smooth_alpha must be in [0, 1], got {self.smooth_alpha}")
        if self.calib_dtype not in CALIB_DTYPES:
            raise ValueError(f"calib_dtype must be one of {CALIB_DTYPES}, got {self.calib_dtype!r}")
        for name in ("block_size", "num_calib_samples", "calib_seq_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        overridable = {f.name for f in fields(self)} - {"modules", "skip"} - set(MODEL_WIDE)
        for key, override in self.modules.items():
            wide = set(override) & set(MODEL_WIDE)
            if wide:
                raise ValueError(f"modules[{key!r}] overrides {sorted(wide)}, which apply to the whole model")
            bad = set(override) - overridable - {"skip"}
            if bad:
                raise ValueError(f"modules[{key!r}] has unknown fields {sorted(bad)}")
            # Builds the overridden config now so a bad value fails here, not mid-quantization.
            replace(self, **_fields_only(override), modules={}, skip=[])

    def for_module(self, name: str) -> "QuantConfig | None":
        """The config for the module called `name`, or None if it stays in full precision."""
        if any(_matches(name, pattern) for pattern in self.skip):
            return None
        merged: dict = {}
        for pattern, override in self.modules.items():
            if _matches(name, pattern):
                merged.update(override)
        if merged.get("skip", False):
            return None
        return replace(self, **_fields_only(merged), modules={}, skip=[])


def check_act_bits(act_bits: int | None, bits: int, sym: bool, group_size: int) -> None:
    """Quantized activations: none, or int8 with 4-bit weights (W4A8: activations quantized per
    weight group) or with symmetric per-channel or per-tensor 8-bit weights (W8A8: per token)."""
    if act_bits is None:
        return
    if act_bits != 8:
        raise ValueError(f"act_bits must be None or 8, got {act_bits}")
    if bits != 4 and (bits != 8 or not sym or group_size > 0):
        raise ValueError(
            "act_bits=8 needs 4-bit weights (W4A8) or symmetric per-channel or per-tensor 8-bit weights "
            f"(W8A8), got bits={bits}, sym={sym}, group_size={group_size}"
        )


def _fields_only(override: dict) -> dict:
    return {k: v for k, v in override.items() if k != "skip"}


def _matches(name: str, pattern: str) -> bool:
    return name == pattern or name.endswith("." + pattern) or fnmatch.fnmatchcase(name, pattern)


CPU_KV_CACHE_MEMORY = 2 * 2**30  # bytes, when kv_cache_memory is not set on the CPU


@dataclass
class EngineConfig:
    """How the engine runs one model: where, in what precision, with how much KV cache, how many at once.

    The KV cache is kv_cache_memory bytes when set; otherwise CPU_KV_CACHE_MEMORY on the CPU, and
    on CUDA what is free after loading the model while total use stays within gpu_memory_utilization.
    """

    model: str
    dtype: str = "fp32"
    device: str = "cpu"
    block_size: int = 16
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048  # token budget of one step (chunked prefill splits longer prompts)
    max_model_len: int | None = None  # None: the model's own context length
    kv_cache_memory: int | None = None
    gpu_memory_utilization: float = 0.9
    seed: int = 0  # seeds the sampling of requests that bring no seed of their own
    enable_prefix_caching: bool = True  # reuse the KV of full blocks equal to an earlier prompt's
    compile: bool = False  # run steps as torch.compile graphs (model_runner.py; compiled at warm-up)

    def __post_init__(self) -> None:
        checks = [
            ("dtype", self.dtype in ENGINE_DTYPES, f"must be one of {ENGINE_DTYPES}"),
            ("device", self.device.split(":")[0] in ("cpu", "cuda"), "must be 'cpu', 'cuda' or 'cuda:N'"),
            ("block_size", self.block_size >= 1, "must be >= 1"),
            ("max_num_seqs", self.max_num_seqs >= 1, "must be >= 1"),
            ("max_num_batched_tokens", self.max_num_batched_tokens >= self.max_num_seqs,
             f"must be >= max_num_seqs ({self.max_num_seqs}), so every running sequence can decode each step"),
            ("max_model_len", self.max_model_len is None or self.max_model_len >= 2, "must be >= 2 or None"),
            ("kv_cache_memory", self.kv_cache_memory is None or self.kv_cache_memory > 0,
             "must be > 0 bytes or None"),
            ("gpu_memory_utilization", 0.0 < self.gpu_memory_utilization <= 1.0, "must be in (0, 1]"),
        ]
        for name, ok, expected in checks:
            if not ok:
                raise ValueError(f"{name} {expected}, got {getattr(self, name)!r}")

    @classmethod
    def from_options(cls, model: str, **options) -> "EngineConfig":
        """The config of `LLM(model, **options)` and `serve(model, ..., **options)`: unknown options are named."""
        known = {f.name for f in fields(cls)} - {"model"}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(f"unknown engine options {unknown}; known: {sorted(known)}")
        return cls(model=str(model), **options)


@dataclass
class ServeConfig:
    """How the HTTP server listens, whom it lets in, and how much one request may ask for."""

    host: str = "127.0.0.1"  # loopback unless asked: exposing the server is a deliberate choice
    port: int = 8000
    api_keys: list[str] = field(default_factory=list)  # any one of them opens the API; empty: no keys
    metrics_public: bool = False  # True: /metrics needs no key, for a Prometheus scraper inside the network
    served_model_name: str | None = None  # None: the file or folder name of the model
    max_body_bytes: int = 2 * 2**20
    max_prompt_tokens: int | None = None  # None: only the model's context length bounds a prompt
    max_tokens_limit: int = 4096  # most tokens one completion may ask for
    max_n: int = 64  # most choices one request may ask for: n times the number of prompts
    max_logprobs: int = 20
    max_waiting: int = 256  # requests accepted but without a first token yet; more are answered 429
    drain_timeout: float = 30.0  # seconds in-flight requests get to finish after SIGTERM

    def __post_init__(self) -> None:
        self.api_keys = list(self.api_keys)
        checks = [
            ("port", 1 <= self.port <= 65535, "must be in [1, 65535]"),
            ("api_keys", all(isinstance(k, str) and k and k == k.strip() for k in self.api_keys),
             "must hold non-empty strings without surrounding whitespace"),
            ("served_model_name", self.served_model_name is None or self.served_model_name.strip() != "",
             "must be None or a non-empty name"),
            ("max_body_bytes", self.max_body_bytes >= 1024, "must be >= 1024"),
            ("max_prompt_tokens", self.max_prompt_tokens is None or self.max_prompt_tokens >= 1, "must be >= 1 or None"),
            ("max_tokens_limit", self.max_tokens_limit >= 1, "must be >= 1"),
            ("max_n", self.max_n >= 1, "must be >= 1"),
            ("max_logprobs", self.max_logprobs >= 0, "must be >= 0"),
            ("max_waiting", self.max_waiting >= 1, "must be >= 1"),
            ("drain_timeout", self.drain_timeout >= 0, "must be >= 0 seconds"),
        ]
        for name, ok, expected in checks:
            if not ok:
                raise ValueError(f"{name} {expected}, got {getattr(self, name)!r}")
