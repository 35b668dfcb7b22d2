"""The `slimserve` command: parses arguments and calls the library, nothing more."""

import logging
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from slimserve.assets import DEFAULT_MODEL
from slimserve.config import QUANT_METHODS, SMOOTH_ALPHA, QuantConfig, ServeConfig

app = typer.Typer(help="Quantize, evaluate, accelerate and serve language models.", no_args_is_help=True,
                  pretty_exceptions_enable=False)

ModelArg = Annotated[str, typer.Argument(help="Built-in short name, HF model folder, .gguf file or hub id.")]


def _die(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


@app.command()
def generate(
    model: ModelArg = DEFAULT_MODEL,
    prompt: Annotated[str, typer.Option(help="Prompt text.")] = "The capital of France is",
    max_tokens: Annotated[int, typer.Option(help="Most tokens to generate.")] = 64,
    temperature: Annotated[float, typer.Option(help="0 = greedy.")] = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int | None = None,
    chat: Annotated[bool, typer.Option(help="Wrap the prompt in the model's chat template.")] = False,
    dtype: Annotated[str, typer.Option(help="fp32, bf16 or fp16.")] = "fp32",
    profile: Annotated[bool, typer.Option(help="Print tokenize/prefill/decode/detokenize times.")] = False,
):
    """Generate text for one prompt, streaming tokens to the terminal."""
    from slimserve.engine.sampling_params import SamplingParams
    from slimserve.generate import Generator
    from slimserve.models.inference_linear import prepare_for_inference
    from slimserve.models.loader import load_model, load_tokenizer, torch_dtype

    try:
        params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed)
        tokenizer = load_tokenizer(model)
        generator = Generator(prepare_for_inference(load_model(model, torch_dtype(dtype))), tokenizer)
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}]) if chat else prompt
        if not chat:
            sys.stdout.write(prompt)
        result = generator.generate(text, params, on_text=lambda piece: (sys.stdout.write(piece), sys.stdout.flush()))
    except (ValueError, FileNotFoundError) as e:
        _die(str(e))
    sys.stdout.write("\n")
    if profile:
        typer.echo(f"\nprompt tokens: {result.profile.num_prompt_tokens}, generated: "
                   f"{result.profile.num_generated_tokens}, finish: {result.finish_reason}")
        typer.echo(result.profile.table())


@app.command(name="eval")
def eval_(
    models: Annotated[list[str], typer.Argument(help="One or more models.")] = None,
    dataset: Annotated[str, typer.Option(help="sotu, sotu-calib, moby-dick, or a text file.")] = "sotu",
    dtypes: Annotated[str, typer.Option(help="Comma-separated: fp32,bf16,fp16.")] = "fp32",
    max_windows: Annotated[int | None, typer.Option(help="Evaluate only the first N windows.")] = None,
    out: Annotated[Path, typer.Option(help="Folder for report.md.")] = Path("report"),
):
    """Perplexity (DESIGN.md protocol), size and speed of each model at each dtype."""
    _report([(model, dtype.strip()) for model in models or [DEFAULT_MODEL] for dtype in dtypes.split(",")],
            dataset, max_windows, out)


def _report(runs: list[tuple[str, str]], dataset: str, max_windows: int | None, out: Path) -> None:
    """Evaluate each (model, dtype) and print the table, also written to out/report.md."""
    from slimserve.eval.evaluate import evaluate, markdown_table

    try:
        rows = [evaluate(model, dtype, dataset, max_windows) for model, dtype in runs]
    except (ValueError, FileNotFoundError) as e:
        _die(str(e))
    table = markdown_table(rows)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.md").write_text(table + "\n")
    typer.echo(table)
    typer.echo(f"\nwritten to {out / 'report.md'}")


_QUANT = QuantConfig()


@app.command()
def quantize(
    model: ModelArg = DEFAULT_MODEL,
    method: Annotated[str, typer.Option(help=", ".join(QUANT_METHODS) + ".")] = _QUANT.method,
    bits: int = _QUANT.bits,
    group_size: Annotated[int, typer.Option(help="-1 per channel, 0 per tensor, else columns per group.")]
    = _QUANT.group_size,
    sym: Annotated[bool, typer.Option("--sym/--asym")] = _QUANT.sym,
    act_order: bool = _QUANT.act_order,
    awq_clip: Annotated[bool, typer.Option(help="AWQ: search each group's clipping range.")] = _QUANT.awq_clip,
    mse: Annotated[bool, typer.Option(help="RTN, GPTQ, SmoothQuant: search each scale's range for the least "
                                           "error instead of min-max (slower; better at 3 bits).")] = _QUANT.mse,
    act_bits: Annotated[int | None, typer.Option(
        help="8: int8 activations at run time, per token with 8-bit weights (W8A8), per weight group with "
             "4-bit weights (W4A8); smoothquant's default, else none.")] = None,
    calib: Annotated[str, typer.Option(help="Calibration text: sotu-calib, moby-dick or a file.")] = "sotu-calib",
    num_calib_samples: int = _QUANT.num_calib_samples,
    calib_seq_len: int = _QUANT.calib_seq_len,
    sink_weight: Annotated[float, typer.Option(help="GPTQ: how many times each calibration sequence's first token "
                                                    "(its attention sink) counts in the Hessians.")]
    = _QUANT.sink_weight,
    fp_target: Annotated[float, typer.Option(help="GPTQ: how far (0 to 1) each layer's target moves from its own "
                                                  "output on quantized inputs toward the float model's output.")]
    = _QUANT.fp_target,
    calib_dtype: Annotated[str, typer.Option(help="GPTQ: dtype of the calibration forward passes: fp32, bf16, "
                                                  "or auto (bf16 on CUDA and CPUs with bf16 units, else fp32); "
                                                  "Hessians and the quantization stay in fp32.")]
    = _QUANT.calib_dtype,
    smooth_alpha: Annotated[float | None, typer.Option(
        help=f"SmoothQuant's alpha, its scales folded in before rtn or gptq quantizes (with gptq and --act-bits 8: "
             f"SmoothQuant + GPTQ W8A8); smoothquant's default {SMOOTH_ALPHA}, else none.")] = None,
    format: Annotated[str, typer.Option(help="slimserve, gptq or awq.")] = "slimserve",
    out: Annotated[Path, typer.Option(help="Folder to write.")] = Path("quantized"),
):
    """Quantize MODEL's linear layers and save a folder that `slimserve eval/serve/generate` load."""
    from slimserve.quant.pipeline import quantize as run_quantize

    if act_bits is None and method == "smoothquant":
        act_bits = 8  # smoothing moves outliers from activations into weights for int8 activations
    try:
        config = QuantConfig(method=method, bits=bits, group_size=group_size, sym=sym, act_order=act_order,
                             awq_clip=awq_clip, mse=mse, act_bits=act_bits, num_calib_samples=num_calib_samples,
                             calib_seq_len=calib_seq_len, sink_weight=sink_weight,
                             fp_target=fp_target, calib_dtype=calib_dtype, smooth_alpha=smooth_alpha)
        result = run_quantize(model, config, out, calib_dataset=calib, format=format)
    except (ValueError, FileNotFoundError) as e:
        _die(str(e))
    typer.echo(f"wrote {result.out_dir} ({result.disk_bytes / 2**20:.1f} MB) in {result.seconds:.1f} s, "
               f"peak RSS {result.peak_rss_bytes / 2**20:.0f} MB")


@app.command(name="quantize-test")
def quantize_test(
    model: ModelArg = DEFAULT_MODEL,
    precision: Annotated[str, typer.Option(help="Comma-separated: fp32,fp16,bf16,int8,int4,w4a8.")] = "fp32,fp16,int8,int4",
    eval_dataset: str = "sotu",
    max_windows: Annotated[int | None, typer.Option(help="Evaluate only the first N windows.")] = None,
    out: Annotated[Path, typer.Option(help="Folder for the variants, report.md and plots.")] = Path("quantize-test"),
):
    """The sweep: each precision saved, reloaded and measured (size, peak RAM, ppl, decode speed)."""
    from slimserve.quant.pipeline import quantize_test as run_quantize_test

    try:
        run_quantize_test(model, precision.split(","), eval_dataset, out, max_windows)
    except (ValueError, FileNotFoundError) as e:
        _die(str(e))
    typer.echo((out / "report.md").read_text())


bench_app = typer.Typer(help="Benchmarks of the engine and the server.", no_args_is_help=True)
app.add_typer(bench_app, name="bench")


def _ints(csv: str) -> list[int]:
    return [int(x) for x in csv.split(",")]


CompileOption = Annotated[bool, typer.Option(help="Run steps as torch.compile graphs (compiled before the "
                                                        "first request).")]


def _engine(model: str, dtype: str, device: str, compile: bool):
    from slimserve.config import EngineConfig
    from slimserve.engine.llm_engine import LLMEngine

    # Benchmarks repeat prompts across runs: prefix-cache hits would time a cache lookup, not a prefill.
    return LLMEngine(EngineConfig(model, dtype=dtype, device=device, enable_prefix_caching=False, compile=compile))


@bench_app.command()
def latency(
    model: ModelArg = DEFAULT_MODEL,
    batch_sizes: Annotated[str, typer.Option(help="Comma-separated batch sizes.")] = "1,8,32",
    seq_lengths: Annotated[str, typer.Option(help="Comma-separated prompt lengths in tokens.")] = "128,512,2048",
    output_len: int = 32,
    dtype: str = "fp32",
    device: str = "cpu",
    compile: CompileOption = False,
    out: Annotated[Path, typer.Option(help="Folder for latency.md and latency.png.")] = Path("report"),
):
    """Batches of equal prompts submitted together: TTFT and decode tok/s per batch size and length."""
    from slimserve.eval.bench import bench_latency, latency_table, plot_latency
    from slimserve.eval.machine import machine_info

    try:
        rows = bench_latency(_engine(model, dtype, device, compile), _ints(batch_sizes), _ints(seq_lengths),
                             output_len)
    except (ValueError, FileNotFoundError) as e:
        _die(str(e))
    out.mkdir(parents=True, exist_ok=True)
    table = latency_table(rows)
    (out / "latency.md").write_text(f"# Latency: {model} ({dtype}, {device})\n\n{machine_info().markdown()}\n\n"
                                    f"{table}\n\n![decode tok/s per batch size](latency.png)\n")
    plot_latency(rows, out / "latency.png")
    typer.echo(table)


@bench_app.command()
def throughput(
    model: ModelArg = DEFAULT_MODEL,
    num_prompts: int = 64,
    input_len: int = 128,
    output_len: int = 64,
    dtype: str = "fp32",
    device: str = "cpu",
    compile: CompileOption = False,
    out: Annotated[Path, typer.Option(help="Folder for throughput.md.")] = Path("report"),
):
    """num_prompts requests submitted at once: output tokens and requests per second."""
    from slimserve.eval.bench import bench_throughput
    from slimserve.eval.machine import machine_info

    try:
        result = bench_throughput(_engine(model, dtype, device, compile), num_prompts, input_len, output_len)
    except (ValueError, FileNotFoundError) as e:
        _die(str(e))
    line = (f"{result.num_prompts} requests ({input_len} in, {output_len} out) in {result.seconds:.2f} s: "
            f"{result.output_tokens_per_s:.1f} output tok/s, {result.requests_per_s:.2f} req/s")
    out.mkdir(parents=True, exist_ok=True)
    (out / "throughput.md").write_text(f"# Throughput: {model} ({dtype}, {device})\n\n"
                                       f"{machine_info().markdown()}\n\n{line}\n")
    typer.echo(line)


@bench_app.command(name="serve")
def bench_serve(
    base_url: Annotated[str, typer.Option(help="A running slimserve (or any OpenAI-compatible) server.")]
    = "http://127.0.0.1:8000",
    concurrency: Annotated[str, typer.Option(help="Comma-separated concurrency levels.")] = "1,8,32,100",
    num_prompts: Annotated[int, typer.Option(help="Requests per concurrency level.")] = 100,
    input_len: Annotated[int, typer.Option(help="Words of corpus text per prompt.")] = 128,
    output_len: int = 64,
    api_key: Annotated[str | None, typer.Option(envvar="SLIMSERVE_API_KEY")] = None,
    out: Annotated[Path, typer.Option(help="Folder for serve.md and serve.png.")] = Path("report"),
):
    """Load a server: TTFT, TPOT, ITL, E2E percentiles and throughput per concurrency (vLLM's definitions)."""
    from slimserve.eval.serve_bench import ServeBenchConfig, markdown_table, plot, run_serve_bench

    try:
        config = ServeBenchConfig(base_url=base_url, api_key=api_key, concurrencies=_ints(concurrency),
                                  num_prompts=num_prompts, input_len=input_len, output_len=output_len)
        results = run_serve_bench(config)
    except ValueError as e:
        _die(str(e))
    out.mkdir(parents=True, exist_ok=True)
    table = markdown_table(results)
    (out / "serve.md").write_text(table + "\n")
    plot(results, out / "serve.png")
    typer.echo(table)


_SERVE = ServeConfig()


@app.command()
def serve(
    model: ModelArg = DEFAULT_MODEL,
    host: Annotated[str, typer.Option(help="Loopback by default: exposing the server is a deliberate choice.")]
    = _SERVE.host,
    port: int = _SERVE.port,
    api_key: Annotated[list[str] | None, typer.Option(envvar="SLIMSERVE_API_KEY",
                                                      help="Repeat for several keys (env: space-separated).")] = None,
    metrics_public: Annotated[bool, typer.Option(help="/metrics without a key.")] = _SERVE.metrics_public,
    max_waiting: int = _SERVE.max_waiting,
    drain_timeout: float = _SERVE.drain_timeout,
    dtype: str = "fp32",
    device: str = "cpu",
    max_model_len: int | None = None,
    enable_prefix_caching: Annotated[bool, typer.Option(help="Reuse the KV cache of repeated prompt prefixes.")]
    = True,
    compile: CompileOption = False,
    served_model_name: Annotated[str | None, typer.Option(
        help="The model's id in the API (/v1/models, requests' `model`); default: its file or folder name.")] = None,
):
    """Serve MODEL behind the OpenAI-compatible API, with /metrics and the playground at /."""
    from slimserve.serve.server import serve as run_server

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = ServeConfig(host=host, port=port, api_keys=api_key or [], metrics_public=metrics_public,
                             max_waiting=max_waiting, drain_timeout=drain_timeout,
                             served_model_name=served_model_name)
        run_server(model, config, dtype=dtype, device=device, max_model_len=max_model_len,
                   enable_prefix_caching=enable_prefix_caching, compile=compile)
    except (ValueError, FileNotFoundError) as e:
        _die(str(e))


# What `slimserve run` makes of the default model: int8 weights and int8 activations after
# SmoothQuant, the precision whose compiled engine decodes fastest on the CPU
# (benchmarks/results/engine_cpu.md), for +0.94 to +1.08 % perplexity over fp32 with this
# calibration, by machine (quant_smollm2_w8a8.md, quant_smollm2.md); it takes 23-77 s, once.
# GPTQ on the smoothed weights (smooth_alpha with method "gptq") reads +0.78 % but takes minutes.
RUN_QUANT = QuantConfig(method="smoothquant", bits=8, group_size=-1, act_bits=8, num_calib_samples=32,
                        calib_seq_len=512)


@app.command()
def run(
    model: ModelArg = DEFAULT_MODEL,
    max_windows: Annotated[int, typer.Option(help="Perplexity windows to evaluate per row.")] = 4,
    port: int = _SERVE.port,
):
    """The main job: fetch the default model, optimize it (W8A8 SmoothQuant, once, into the cache),
    print the before/after report, generate a sample, serve the optimized model with the playground."""
    from slimserve.quant.pipeline import cached_quantize

    typer.echo(f"optimizing {model}: SmoothQuant, int8 weights and activations (written once, then cached)")
    try:
        optimized = str(cached_quantize(model, RUN_QUANT))
    except (ValueError, FileNotFoundError) as e:
        _die(str(e))
    _report([(model, "fp32"), (model, "bf16"), (optimized, "bf16")], "sotu", max_windows, Path("report"))
    generate(optimized, prompt="What is the capital of France?", chat=True, profile=True, dtype="bf16")
    serve_args = ["serve", optimized, "--port", str(port), "--dtype", "bf16",
                  "--served-model-name", f"{Path(model).name}-w8a8"]
    if _cpp_compiler_found():
        serve_args.append("--compile")
        typer.echo("\ncompiling the engine's graphs before serving: about 2 minutes on a first start, seconds later")
    else:
        typer.echo("\nno C++ compiler found (torch.compile needs one): serving without compile, slower")
    typer.echo(f"serving the optimized {model} with the playground at http://127.0.0.1:{port}/ "
               "(Ctrl-C drains and stops)")
    # The server gets a fresh process: torch work on this one's main thread (eval, generate) would
    # leave an OpenMP pool that slows the server's engine thread twofold (see engine/async_engine.py).
    os.execv(sys.executable, [sys.executable, "-m", "slimserve", *serve_args])


def _cpp_compiler_found() -> bool:
    """Whether torch.compile's CPU code generator finds the C++ compiler it needs."""
    from torch._inductor.cpp_builder import get_cpp_compiler
    from torch._inductor.exc import InvalidCxxCompiler

    try:
        get_cpp_compiler()
    except InvalidCxxCompiler:
        return False
    return True
