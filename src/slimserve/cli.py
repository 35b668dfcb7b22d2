"""The `slimserve` command: parses arguments and calls the library, nothing more."""

import sys
from pathlib import Path
from typing import Annotated

import typer

from slimserve.assets import DEFAULT_MODEL

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
    from slimserve.models.loader import load_model, load_tokenizer, torch_dtype

    try:
        params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed)
        tokenizer = load_tokenizer(model)
        generator = Generator(load_model(model, torch_dtype(dtype)), tokenizer)
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
    from slimserve.eval.evaluate import evaluate, markdown_table

    rows = []
    try:
        for model in models or [DEFAULT_MODEL]:
            for dtype in dtypes.split(","):
                rows.append(evaluate(model, dtype.strip(), dataset, max_windows))
    except (ValueError, FileNotFoundError) as e:
        _die(str(e))
    table = markdown_table(rows)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.md").write_text(table + "\n")
    typer.echo(table)
    typer.echo(f"\nwritten to {out / 'report.md'}")


bench_app = typer.Typer(help="Benchmarks of the engine and the server.", no_args_is_help=True)
app.add_typer(bench_app, name="bench")


def _ints(csv: str) -> list[int]:
    return [int(x) for x in csv.split(",")]


def _engine(model: str, dtype: str, device: str):
    from slimserve.config import EngineConfig
    from slimserve.engine.llm_engine import LLMEngine

    return LLMEngine(EngineConfig(model, dtype=dtype, device=device))


@bench_app.command()
def latency(
    model: ModelArg = DEFAULT_MODEL,
    batch_sizes: Annotated[str, typer.Option(help="Comma-separated batch sizes.")] = "1,8,32",
    seq_lengths: Annotated[str, typer.Option(help="Comma-separated prompt lengths in tokens.")] = "128,512,2048",
    output_len: int = 32,
    dtype: str = "fp32",
    device: str = "cpu",
    out: Annotated[Path, typer.Option(help="Folder for latency.md and latency.png.")] = Path("report"),
):
    """Batches of equal prompts submitted together: TTFT and decode tok/s per batch size and length."""
    from slimserve.eval.bench import bench_latency, latency_table, plot_latency

    try:
        rows = bench_latency(_engine(model, dtype, device), _ints(batch_sizes), _ints(seq_lengths), output_len)
    except (ValueError, FileNotFoundError) as e:
        _die(str(e))
    out.mkdir(parents=True, exist_ok=True)
    table = latency_table(rows)
    (out / "latency.md").write_text(table + "\n")
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
):
    """num_prompts requests submitted at once: output tokens and requests per second."""
    from slimserve.eval.bench import bench_throughput

    try:
        result = bench_throughput(_engine(model, dtype, device), num_prompts, input_len, output_len)
    except (ValueError, FileNotFoundError) as e:
        _die(str(e))
    typer.echo(f"{result.num_prompts} requests ({input_len} in, {output_len} out) in {result.seconds:.2f} s: "
               f"{result.output_tokens_per_s:.1f} output tok/s, {result.requests_per_s:.2f} req/s")


@app.command()
def run(
    model: ModelArg = DEFAULT_MODEL,
    max_windows: Annotated[int, typer.Option(help="Perplexity windows to evaluate per dtype.")] = 8,
):
    """The main job: fetch the default model, evaluate it at fp32 and bf16, generate a sample."""
    eval_([model], "sotu", "fp32,bf16", max_windows, Path("report"))
    generate(model, prompt="What is the capital of France?", chat=True, profile=True, dtype="bf16")
