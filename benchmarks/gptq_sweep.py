"""GPTQ's sink_weight, fp_target and calib_dtype swept: perplexity for each setting and calibration shape.

sink_weight: how many times each calibration sequence's first token, the attention sink every
later token reads, counts in the Hessians; fp_target: how far each linear's target moves toward
the float model's output (both quant/gptq.py); calib_dtype: the dtype of the calibration forward
passes (QuantConfig). For each calibration shape and setting, the model is quantized as
quant_report's W4/W3 GPTQ rows (g128 asym on Qwen, g64 on SmolLM2, act-order, lm_head 8-bit per
channel, ranges min-max unless --mse), cast to bf16 and evaluated under the SOTU protocol on the
first --max-windows windows and, with --all-windows, on all of them. A lent GPU makes a sweep
minutes long. Writes benchmarks/results/gptq_<swept>_<model>_w<bits>[_mse].md,
<swept> naming the parameters given more than one value.

    python benchmarks/gptq_sweep.py [--model smollm2-135m] [--bits 4] [--mse] [--sink-weights 1,4,16,64]
        [--fp-targets 0,0.5,1] [--calib-dtypes fp32,bf16] [--calib 32x512,128x2048] [--all-windows]
        [--device cuda]
"""

import argparse
import copy
import itertools
import time
from pathlib import Path

import torch

from slimserve.assets import resolve_model
from slimserve.config import QuantConfig
from slimserve.eval.datasets import load_text
from slimserve.eval.machine import machine_info
from slimserve.eval.perplexity import perplexity, window_size
from slimserve.models.loader import dtype_name, load_config, load_model, load_tokenizer
from slimserve.quant.calibrate import calibration_batches
from slimserve.quant.formats import tie_quantized_embeddings
from slimserve.quant.gptq import calibration_dtype, gptq_quantize
from slimserve.quant.pipeline import default_group_size

from quant_report import low_bit_scheme  # this folder's


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--mse", action="store_true", help="search each group's range (QuantConfig.mse)")
    parser.add_argument("--sink-weights", default=f"{QuantConfig.sink_weight:g}")
    parser.add_argument("--fp-targets", default=f"{QuantConfig.fp_target:g}")
    parser.add_argument("--calib-dtypes", default=QuantConfig.calib_dtype)
    parser.add_argument("--calib", default="32x512,128x2048", help="samples x tokens, comma-separated")
    parser.add_argument("--max-windows", type=int, default=4)
    parser.add_argument("--all-windows", action="store_true", help="also evaluate every window (GPU: seconds)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    machine = machine_info()
    torch.set_default_device(args.device)  # calibration, positions and perplexity windows where the model is

    path = resolve_model(args.model)
    tokenizer = load_tokenizer(path)
    eval_ids = tokenizer.encode(load_text("sotu"))
    base = load_model(path, torch.float32).to(args.device)
    window = window_size(base.max_model_len)
    group = default_group_size(load_config(path))

    def measure(model: torch.nn.Module) -> tuple[float, float]:
        every = perplexity(model, eval_ids, window, progress=False).ppl if args.all_windows else float("nan")
        return perplexity(model, eval_ids, window, args.max_windows, progress=False).ppl, every

    fp32 = measure(base)
    rows = [f"| fp32 | — | — | — | — | {fp32[0]:.4f} | +0.00 | {fp32[1]:.4f} | +0.00 | — |"]
    sink_weights, fp_targets = [list(map(float, a.split(","))) for a in (args.sink_weights, args.fp_targets)]
    calib_dtypes = args.calib_dtypes.split(",")
    for shape in args.calib.split(","):
        samples, seq_len = map(int, shape.split("x"))
        with torch.device("cpu"):  # its seeded generator
            calib = [ids.to(args.device) for ids in calibration_batches(tokenizer, num_samples=samples,
                                                                         seq_len=seq_len)]
        for weight, fp_target, calib_dtype in itertools.product(sink_weights, fp_targets, calib_dtypes):
            config = QuantConfig(method="gptq", bits=args.bits, act_order=True, mse=args.mse, sink_weight=weight,
                                 fp_target=fp_target, calib_dtype=calib_dtype, num_calib_samples=samples,
                                 calib_seq_len=seq_len, **low_bit_scheme(group))
            model = copy.deepcopy(base)
            start = time.perf_counter()
            gptq_quantize(model, calib, config)
            seconds = time.perf_counter() - start
            model.to(torch.bfloat16)
            tie_quantized_embeddings(model)
            few, every = measure(model)
            resolved = dtype_name(calibration_dtype(calib_dtype, torch.device(args.device)))
            rows.append(f"| {samples} x {seq_len} | {weight:g} | {weight / seq_len:.2%} | {fp_target:g} | "
                        f"{resolved} | {few:.4f} | {100 * (few / fp32[0] - 1):+.2f} | {every:.4f} | "
                        f"{100 * (every / fp32[1] - 1):+.2f} | {seconds:.0f} |")
            print(rows[-1], flush=True)
            del model

    num_windows = len(eval_ids) // window
    scheme = f"W{args.bits}" + (" mse" if args.mse else "")
    text = "\n".join([
        f"# GPTQ's sink weight, fp target and calibration dtype on {args.model}",
        "",
        machine.markdown(),
        "",
        f"{scheme} g{group} asym GPTQ, act-order, lm_head W8 per channel; quantized on {args.device} "
        "(calibration forwards in the calibration dtype, Hessians and GPTQ in fp32), "
        f"perplexity in bf16 on `sotu` windows of {window} tokens: the first {args.max_windows} (the quant "
        f"reports' protocol) and all {num_windows}. Calibration: `sotu-calib`, seed 0. Share: the sink "
        "weight over the sequence's length. fp target: how far each linear's target moves toward the float "
        "model's output (0: GPTQ's own objective). Seconds: GPTQ on this device.",
        "",
        f"| calibration | sink weight | share | fp target | calibration dtype | ppl ({args.max_windows} windows) "
        "| Δ % | ppl (all) | Δ % | s |",
        "|---|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
    ])
    args.out.mkdir(parents=True, exist_ok=True)
    swept = "_".join(name for name, values in (("sink_weight", sink_weights), ("fp_target", fp_targets),
                                               ("calib_dtype", calib_dtypes)) if len(values) > 1) or "sweep"
    (args.out / f"gptq_{swept}_{args.model}_w{args.bits}{'_mse' if args.mse else ''}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
