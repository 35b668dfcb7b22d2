"""QAT: fine-tune the weights through their quantized values, then export the quantized model.

Quantization-aware training with the straight-through estimator (Bengio, Léonard, Courville
2013; Jacob et al., CVPR 2018): the forward pass uses w_q = dequantize(RTN(w)), the backward
pass treats rounding as the identity, so dL/dw = dL/dw_q and AdamW nudges w across rounding
boundaries to where the quantized network works best. The loss is knowledge distillation from
the float model (LLM-QAT, Liu et al. 2023, arXiv:2305.17888): KL(p_float || p_quantized) over
every next-token distribution of the calibration text. Distilling, rather than training on the
text's own tokens, recovers the float model instead of adapting it to the calibration domain,
so held-out perplexity measures quantization loss only. Only the quantized linears' weights
train; the export is RTN of the trained weights, so it computes exactly what training saw.
"""

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from slimserve.config import QuantConfig
from slimserve.models.attention import AttentionMetadata
from slimserve.quant.gptq import check_llama, replace_module
from slimserve.quant.qlinear import QuantLinear
from slimserve.quant.rtn import dequantize_weight, quantize_weight

QAT_STEPS = 100
QAT_LR = 1e-4  # AdamW; on SmolLM2 3-bit g64, 20 steps: 1e-5 -> ppl 78, 5e-5 -> 61, 1e-4 -> 51, 3e-4 -> 51 (RTN 128)


class FakeQuantLinear(nn.Module):
    """y = x @ w_qᵀ + b with w_q = dequantize(RTN(w)); gradients reach w straight through."""

    def __init__(self, linear: nn.Linear, config: QuantConfig) -> None:
        super().__init__()
        self.linear, self.config = linear, config

    def quantized_weight(self) -> Tensor:
        w = self.linear.weight
        q, scales, zeros = quantize_weight(w.detach(), self.config.bits, self.config.group_size, self.config.sym)
        w_q = dequantize_weight(q, scales, zeros).to(w.dtype)
        return w + (w_q - w).detach()  # value w_q, gradient identity

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.quantized_weight(), self.linear.bias)


def qat_finetune(
    model: nn.Module,
    calib_batches: list[Tensor],
    config: QuantConfig,
    steps: int = QAT_STEPS,
    lr: float = QAT_LR,
    progress: bool = False,
) -> nn.Module:
    """Fine-tune a Llama-family model with fake-quantized linears, then swap in QuantLinears, in place.

    calib_batches: 1-D int64 token-id tensors; step i trains on sequence i mod len(calib_batches)
    (use a few short sequences: each step runs the float teacher and the student forward and the
    student backward). Every nn.Linear that config.for_module(name) keeps is fake-quantized with
    its own config; everything else stays frozen. Needs float weights (fp32 or bf16).
    """
    check_llama(model, "QAT")
    if steps < 0 or not lr > 0:
        raise ValueError(f"need steps >= 0 and lr > 0, got steps={steps}, lr={lr}")
    if not calib_batches or any(ids.dim() != 1 or ids.numel() < 2 for ids in calib_batches):
        raise ValueError(f"QAT needs 1-D calibration sequences of >= 2 tokens, got {len(calib_batches)} sequences")
    teacher = copy.deepcopy(model).eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    fake = _swap_in_fake_quant(model, config)
    trained = list({id(m.linear.weight): m.linear.weight for m in fake.values()}.values())  # tied weights once
    for weight in trained:
        weight.requires_grad_(True)
    optimizer = torch.optim.AdamW(trained, lr=lr, weight_decay=0.0)
    for step in tqdm(range(steps), desc="QAT", unit="step", disable=not progress):
        ids = calib_batches[step % len(calib_batches)]
        loss = distillation_loss(teacher, model, ids)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    del teacher, optimizer
    for weight in trained:
        weight.requires_grad_(False)
    with torch.no_grad():
        for name, module in fake.items():
            replace_module(model, name, QuantLinear.from_linear(module.linear, module.config))
    return model


def distillation_loss(teacher: nn.Module, student: nn.Module, ids: Tensor) -> Tensor:
    """Mean over the tokens of ids (T,) of KL(teacher's next-token distribution || student's)."""
    positions = torch.arange(len(ids), device=ids.device)
    meta = AttentionMetadata.without_cache([len(ids)])
    with torch.no_grad():
        target = F.log_softmax(teacher.compute_logits(teacher(ids, positions, meta)), dim=-1)
    logits = student.compute_logits(student(ids, positions, meta))
    return F.kl_div(F.log_softmax(logits, dim=-1), target, log_target=True, reduction="batchmean")


def _swap_in_fake_quant(model: nn.Module, config: QuantConfig) -> dict[str, FakeQuantLinear]:
    fake: dict[str, FakeQuantLinear] = {}
    for name, module in list(model.named_modules()):
        module_config = config.for_module(name) if isinstance(module, nn.Linear) else None
        if module_config is not None:
            fake[name] = FakeQuantLinear(module, module_config)
            replace_module(model, name, fake[name])
    return fake
