"""Fusing and prepacking linear layers: same outputs as the layers they replace."""

import pytest
import torch
from torch import nn

from slimserve.config import QuantConfig
from slimserve.kernels.gemv import gemv
from slimserve.models import inference_linear
from slimserve.models.attention import AttentionMetadata
from slimserve.models.inference_linear import PackedLinear, merge_linears, pack_linears, prepare_for_inference
from slimserve.models.llama import LlamaArgs, LlamaForCausalLM
from slimserve.quant.qlinear import QuantLinear, quantize_model


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("rows", [1, 7, 130])
def test_packed_linear_matches_linear(dtype, atol, bias, rows):
    torch.manual_seed(0)
    linear = nn.Linear(96, 80, bias=bias).to(dtype)
    x = torch.randn(rows, 96, dtype=dtype)
    with torch.no_grad():
        torch.testing.assert_close(PackedLinear(linear)(x), linear(x), atol=atol, rtol=1e-2)


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_compiled_one_row_of_a_packed_linear_runs_gemv_on_its_plain_weight(dtype, atol, monkeypatch):
    traced = []
    monkeypatch.setattr(inference_linear, "gemv", lambda *args, **kwargs: traced.append(args) or gemv(*args, **kwargs))
    torch.manual_seed(0)
    linear = nn.Linear(96, 80).to(dtype)
    packed = PackedLinear(linear, keep_weight=True)
    x = torch.randn(1, 96, dtype=dtype)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(packed, fullgraph=True, dynamic=False)(x), linear(x),
                                   atol=atol, rtol=1e-2)
        torch.testing.assert_close(packed(torch.randn(2, 96, dtype=dtype)).shape, torch.Size([2, 80]))
    assert len(traced) == 1


def test_merged_linear_is_the_concatenation():
    torch.manual_seed(0)
    layers = [nn.Linear(32, n) for n in (32, 8, 8)]
    x = torch.randn(5, 32)
    with torch.no_grad():
        torch.testing.assert_close(merge_linears(layers)(x), torch.cat([layer(x) for layer in layers], -1))


def test_layers_with_and_without_bias_are_not_merged():
    assert merge_linears([nn.Linear(16, 16), nn.Linear(16, 16, bias=False)]) is None


def test_pack_linears_leaves_other_modules():
    model = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8), nn.Linear(8, 8).half())
    pack_linears(model)
    assert [type(m) for m in model] == [PackedLinear, nn.LayerNorm, nn.Linear]  # fp16 has no packed path


@pytest.mark.parametrize("bits,group_size,act_bits", [(8, -1, None), (4, 32, None), (4, 32, 8)])
def test_quantized_llama_fuses_into_one_quant_linear_per_projection(bits, group_size, act_bits):
    """q/k/v and gate/up of a quantized model become one QuantLinear each; logits do not move."""
    torch.manual_seed(0)
    args = LlamaArgs(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, vocab_size=96)
    config = QuantConfig(bits=bits, group_size=group_size, act_bits=act_bits)
    model = quantize_model(LlamaForCausalLM(args).to(torch.bfloat16), config)
    ids = torch.randint(0, 96, (9,))
    meta = AttentionMetadata.without_cache([9])
    with torch.no_grad():
        before = model.compute_logits(model(ids, torch.arange(9), meta))
        prepare_for_inference(model)
        after = model.compute_logits(model(ids, torch.arange(9), meta))
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    assert isinstance(attn.qkv_proj, QuantLinear) and isinstance(mlp.gate_up_proj, QuantLinear)
    assert not hasattr(attn, "q_proj") and not hasattr(mlp, "up_proj")
    torch.testing.assert_close(after, before, atol=2e-2, rtol=0)
