import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from slimserve.config import QuantConfig
from slimserve.models.attention import AttentionMetadata
from slimserve.models.llama import LlamaArgs, LlamaForCausalLM
from slimserve.models.loader import torch_dtype
from slimserve.quant import gptq as gptq_module
from slimserve.quant.gptq import (
    GATE_UP,
    GPTQ,
    QKV,
    calibration_dtype,
    embed_calibration,
    gptq_quantize,
    gptq_quantize_weight,
    gptq_columns as columns,
    layer_stages,
)
from slimserve.quant.qlinear import QuantLinear
from slimserve.quant.rtn import dequantize_weight, quantize_weight


def correlated_inputs(num_tokens: int, in_features: int, seed: int) -> torch.Tensor:
    """Random inputs with correlated channels and a few large ones, like LLM activations."""
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(in_features, in_features, generator=torch.Generator().manual_seed(0))
    x = torch.randn(num_tokens, in_features, generator=generator) @ mixing / in_features**0.5
    x[:, :4] *= 8
    return x


def reconstruction_error(weight: torch.Tensor, approx: torch.Tensor, x: torch.Tensor) -> float:
    """||W X - Q X||² over the rows of x."""
    return float(((x @ (weight - approx).t()) ** 2).sum())


def gptq_and_rtn_errors(layer: nn.Linear, calib, held_out, bits: int, group_size: int, sym: bool = False,
                        **options):
    """||W X - Q X||² on held-out inputs for GPTQ (calibrated on calib) and for RTN."""
    gptq = GPTQ(layer)
    gptq.add_batch(calib)
    q, scales, zeros, g_idx = gptq.quantize(bits, group_size, sym=sym, **options)
    W = layer.weight.detach()
    rtn = dequantize_weight(*quantize_weight(W, bits, group_size, sym=sym))
    gptq_weight = dequantize_weight(q, scales, zeros, g_idx)
    return reconstruction_error(W, gptq_weight, held_out), reconstruction_error(W, rtn, held_out)


@pytest.mark.parametrize("bits, group_size", [(4, 128), (3, 128), (4, -1)])
def test_gptq_beats_rtn_on_correlated_inputs(bits, group_size):
    layer = nn.Linear(256, 128, bias=False)
    torch.manual_seed(0)
    nn.init.normal_(layer.weight, std=0.05)
    gptq_error, rtn_error = gptq_and_rtn_errors(
        layer, correlated_inputs(2048, 256, seed=1), correlated_inputs(1024, 256, seed=2), bits, group_size
    )
    assert gptq_error < 0.8 * rtn_error


@pytest.fixture(scope="module")
def smollm2_ffn_down() -> tuple[nn.Linear, torch.Tensor]:
    """blk.0.ffn_down (1536 -> 576; 1536 = 12 x 128) of the SmolLM2 GGUF and 3072 real-ish inputs.

    Inputs: token embeddings of random token ids through ffn_norm (the MLP input without
    attention's residual), then the real gate/up projections: silu(x Wg^T) * (x Wu^T).
    """
    gguf = pytest.importorskip("gguf")
    from slimserve import assets

    reader = gguf.GGUFReader(assets.fetch("smollm2-135m"))
    tensors = {t.name: t for t in reader.tensors}

    def dense(name: str, rows: torch.Tensor | None = None) -> torch.Tensor:
        t = tensors[name]
        data = t.data if rows is None else t.data[rows.numpy()]  # quantized blocks are per row
        return torch.tensor(gguf.quants.dequantize(data, t.tensor_type))

    vocab_size = tensors["token_embd.weight"].data.shape[0]
    token_ids = torch.randperm(vocab_size, generator=torch.Generator().manual_seed(0))[:3072]
    h = F.rms_norm(dense("token_embd.weight", token_ids), (576,), dense("blk.0.ffn_norm.weight"), 1e-5)
    x = F.silu(h @ dense("blk.0.ffn_gate.weight").t()) * (h @ dense("blk.0.ffn_up.weight").t())
    layer = nn.Linear(1536, 576, bias=False)
    layer.weight.data.copy_(dense("blk.0.ffn_down.weight"))
    return layer, x


@pytest.mark.real_model
@pytest.mark.parametrize(
    "bits, group_size, sym, act_order",
    # the last: W8A16 in the packed int8 kernel's layout, where RTN misses the 0.3 % perplexity target
    [(4, 128, False, False), (3, 128, False, True), (8, -1, True, False)],
)
def test_gptq_beats_rtn_on_smollm2_ffn_down(smollm2_ffn_down, bits, group_size, sym, act_order):
    layer, x = smollm2_ffn_down
    # calibration and held-out tokens are disjoint
    gptq_error, rtn_error = gptq_and_rtn_errors(layer, x[:2048], x[2048:], bits, group_size, sym, act_order=act_order)
    assert gptq_error < 0.9 * rtn_error


@pytest.mark.real_model
def test_mse_ranges_lower_gptq_error_at_3_bits(smollm2_ffn_down):
    """Searched ranges (rtn.py's mse) beat min-max ones inside GPTQ on a real layer at 3 bits, where
    they cut SmolLM2's perplexity loss from +77.6 % to +44.4 %."""
    layer, x = smollm2_ffn_down
    min_max, _ = gptq_and_rtn_errors(layer, x[:2048], x[2048:], 3, 128, act_order=True)
    searched, _ = gptq_and_rtn_errors(layer, x[:2048], x[2048:], 3, 128, act_order=True, mse=True)
    assert searched < 0.9 * min_max


@pytest.mark.parametrize("static_groups", [False, True])
def test_act_order_g_idx_dequantizes_consistently(static_groups):
    layer = nn.Linear(256, 64, bias=True)
    gptq = GPTQ(layer)
    gptq.add_batch(correlated_inputs(1024, 256, seed=3))
    q, scales, zeros, g_idx = gptq.quantize(4, 32, sym=True, act_order=True, static_groups=static_groups)
    assert g_idx.dtype == torch.int32 and g_idx.shape == (256,)
    assert torch.bincount(g_idx.long()).tolist() == [32] * 8  # every group has group_size columns
    trivial = torch.equal(g_idx.long(), torch.arange(256) // 32)
    assert trivial == static_groups  # static groups keep contiguous groups despite act-order
    weight = dequantize_weight(q, scales, zeros, g_idx)
    module = QuantLinear.from_linear(layer, QuantConfig(bits=4, group_size=32), q, scales, zeros, g_idx)
    torch.testing.assert_close(module.dequantize(), weight, rtol=0, atol=0)
    x = correlated_inputs(7, 256, seed=4)
    torch.testing.assert_close(module(x), F.linear(x, weight, layer.bias), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("in_features", [32, 37])  # 37: the last of the Hessian's block rows is narrower
def test_hessian_is_running_mean_over_batches(in_features):
    layer = nn.Linear(in_features, 8)
    x = correlated_inputs(100, in_features, seed=5)
    whole, parts = GPTQ(layer), GPTQ(layer)
    whole.add_batch(x)
    for chunk in (x[:13], x[13:14], x[14:]):
        parts.add_batch(chunk.reshape(1, -1, in_features))  # leading dims are flattened into tokens
    torch.testing.assert_close(parts.hessian, whole.hessian)
    torch.testing.assert_close(whole.hessian, 2 / 100 * x.t() @ x)
    torch.testing.assert_close(whole.hessian, whole.hessian.t(), rtol=0, atol=0)
    assert parts.num_samples == 100


def test_weighted_rows_count_as_repeated_rows():
    layer = nn.Linear(37, 8)
    x = correlated_inputs(20, 37, seed=8)
    weights = torch.ones(20)
    weights[[0, 7]] = torch.tensor([3.0, 16.0])
    weighted, repeated = GPTQ(layer), GPTQ(layer)
    weighted.add_batch(x[:10], weights[:10])
    weighted.add_batch(x[10:], weights[10:])
    repeated.add_batch(x.repeat_interleave(weights.long(), dim=0))
    torch.testing.assert_close(weighted.hessian, repeated.hessian)
    assert weighted.num_samples == repeated.num_samples == 18 + 3 + 16


@pytest.mark.parametrize("fp_target, dtype", [(1.0, torch.float32), (0.25, torch.float32), (0.5, torch.bfloat16)])
@pytest.mark.parametrize("drift_times_weight", [False, True])
def test_target_weight_fits_float_outputs_from_quantized_inputs(fp_target, dtype, drift_times_weight):
    """The least-squares fit of the float outputs W x_fp from the drifted inputs x, solved here by
    lstsq on the weighted, damped system, taken fp_target of the way from W; bf16 inputs (their
    drift summed in bf16 products) to bf16's precision; the drift summed alone or times W."""
    torch.manual_seed(0)
    layer = nn.Linear(37, 8, bias=False)
    x_fp = correlated_inputs(200, 37, seed=9)
    x = x_fp + 0.1 * torch.randn_like(x_fp)  # the inputs quantized layers before it produce
    x_fp, x = x_fp.to(dtype), x.to(dtype)
    weights = torch.ones(200)
    weights[[0, 50]] = 16.0
    gptq = GPTQ(layer, drift=True, drift_weight=layer.weight if drift_times_weight else None)
    gptq.add_batch(x[:120], weights[:120], x_fp[:120])
    gptq.add_batch(x[120:], weights[120:], x_fp[120:])
    x_fp, x = x_fp.float(), x.float()
    W = layer.weight.detach()
    rows = (2 * weights / weights.sum()).sqrt()[:, None]
    damp = 0.01 * torch.mean(torch.diag(gptq.hessian))
    A = torch.cat([rows * x, damp.sqrt() * torch.eye(37)]).double()
    B = torch.cat([rows * (x_fp @ W.t()), damp.sqrt() * W.t()]).double()
    fit = torch.linalg.lstsq(A, B).solution.t().float()
    tolerance = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=0, atol=2e-3 * W.abs().max())
    torch.testing.assert_close(gptq.target_weight(W, fp_target, 0.01), W + fp_target * (fit - W), **tolerance)
    assert (fit - W).norm() > 0.05 * W.norm()  # the drift moves the target
    if drift_times_weight:
        with pytest.raises(ValueError, match=r"summed for a weight of shape \(8, 37\), got \(4, 37\)"):
            gptq.target_weight(W[:4], fp_target, 0.01)


def test_target_weight_is_the_weight_without_drift():
    layer = nn.Linear(37, 8)
    x = correlated_inputs(50, 37, seed=10)
    gptq = GPTQ(layer, drift=True)
    gptq.add_batch(x, fp_inp=x)
    assert torch.equal(gptq.target_weight(layer.weight, 1.0, 0.01), layer.weight.float())
    assert gptq.target_weight(layer.weight, 0.0, 0.01) is layer.weight
    with pytest.raises(ValueError, match="GPTQ with drift needs fp_inp"):
        GPTQ(layer, drift=True).add_batch(x)
    with pytest.raises(ValueError, match="fp_target 0.5 needs the inputs' drift"):
        GPTQ(layer).target_weight(layer.weight, 0.5, 0.01)


def test_dead_inputs_get_zero_weight():
    layer = nn.Linear(64, 16, bias=False)
    x = correlated_inputs(256, 64, seed=6)
    x[:, 10] = 0  # an input channel that never fires
    gptq = GPTQ(layer)
    gptq.add_batch(x)
    q, scales, zeros, g_idx = gptq.quantize(4, 32, sym=False)
    weight = dequantize_weight(q, scales, zeros, g_idx)
    assert torch.isfinite(weight).all()
    assert (weight[:, 10].abs() <= scales[:, 0] / 2).all()  # quantized from 0


def test_no_calibration_samples_rejected():
    gptq = GPTQ(nn.Linear(64, 16))
    gptq.add_batch(torch.zeros(0, 64))
    with pytest.raises(ValueError, match="GPTQ has no calibration samples"):
        gptq.quantize(4, 32, sym=True)


def test_nan_in_hessian_rejected():
    gptq = GPTQ(nn.Linear(64, 16))
    x = torch.randn(32, 64)
    x[3, 5] = float("nan")
    gptq.add_batch(x)
    with pytest.raises(ValueError, match=r"Hessian \(from the calibration activations\) contains \d+ NaN"):
        gptq.quantize(4, 32, sym=True)


def test_nan_in_weight_rejected():
    layer = nn.Linear(64, 16)
    layer.weight.data[0, 0] = float("nan")
    gptq = GPTQ(layer)
    gptq.add_batch(torch.randn(32, 64))
    with pytest.raises(ValueError, match="weight contains 1 NaN or Inf"):
        gptq.quantize(4, 32, sym=True)


@pytest.mark.parametrize(
    "bits, group_size, message",
    [(1, 32, "bits must be between 2 and 8, got 1"), (9, 32, "bits must be between 2 and 8, got 9"),
     (4, 48, "group_size 48 does not divide in_features 64")],
)
def test_bad_scheme_rejected(bits, group_size, message):
    gptq = GPTQ(nn.Linear(64, 16))
    gptq.add_batch(torch.randn(32, 64))
    with pytest.raises(ValueError, match=message):
        gptq.quantize(bits, group_size, sym=True)


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    args = LlamaArgs(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, vocab_size=128, tie_word_embeddings=True)
    return LlamaForCausalLM(args).eval()


def logits(model: LlamaForCausalLM, ids: torch.Tensor) -> torch.Tensor:
    meta = AttentionMetadata.without_cache([len(ids)])
    with torch.no_grad():
        return model.compute_logits(model(ids, torch.arange(len(ids)), meta))


def test_gptq_quantize_replaces_every_kept_linear_of_a_llama():
    model = tiny_llama()
    calib = [torch.randint(0, 128, (48,), generator=torch.Generator().manual_seed(i)) for i in range(4)]
    reference = logits(model, calib[0])
    skip_one = {"layers.1.mlp.down_proj": {"skip": True}}
    config = QuantConfig(method="gptq", bits=8, group_size=32, modules=skip_one)
    gptq_quantize(model, calib, config)
    names = {name for name, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert len(names) == 2 * 7 + 1 - 1 and "lm_head" in names
    assert isinstance(model.model.layers[1].mlp.down_proj, nn.Linear)
    relative_error = (logits(model, calib[0]) - reference).norm() / reference.norm()
    assert relative_error < 0.01  # 8 bits: close to the float model


@pytest.mark.parametrize("tied", [True, False])
def test_tied_lm_head_is_rounded_to_nearest(tied):
    """A GPTQ head tied to the embedding fed GPTQ's column corrections into every embedding lookup
    (SmolLM2 W8 per channel, bf16: +0.42 % perplexity; with the embedding left exact, fp32: +0.16 %)."""
    model = tiny_llama()
    if not tied:
        model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone())
    calib = [torch.randint(0, 128, (48,), generator=torch.Generator().manual_seed(i)) for i in range(4)]
    config = QuantConfig(method="gptq", bits=4, group_size=-1)
    rtn = quantize_weight(model.lm_head.weight.detach(), 4, -1, sym=True)[0]
    gptq_quantize(model, calib, config)
    assert torch.equal(model.lm_head.quantized()[0], rtn) == tied


def test_gptq_quantize_needs_calibration_text():
    with pytest.raises(ValueError, match="GPTQ needs non-empty 1-D calibration sequences, got 0 sequences"):
        gptq_quantize(tiny_llama(), [], QuantConfig(method="gptq"))


def test_stacked_linears_quantize_as_each_alone():
    """gptq_quantize stacks q/k/v (and gate/up) sharing one Hessian: rows are independent in GPTQ."""
    torch.manual_seed(0)
    x = correlated_inputs(1024, 128, seed=7)
    weights = [torch.randn(out, 128) * 0.05 for out in (128, 32, 32)]
    hessian = 2 / len(x) * x.t() @ x
    stacked = gptq_quantize_weight(torch.cat(weights), hessian, 4, 32, sym=False, act_order=True)
    alone = [gptq_quantize_weight(w, hessian, 4, 32, sym=False, act_order=True) for w in weights]
    q_alone = torch.cat([q for q, *_ in alone])
    assert (stacked[0] != q_alone).float().mean() < 1e-3  # only float summation order may differ
    torch.testing.assert_close(stacked[1], torch.cat([s for _, s, _, _ in alone]))
    assert all(torch.equal(stacked[3], g_idx) for *_, g_idx in alone)


@pytest.mark.parametrize("group_size, act_order, static_groups", [
    (32, True, False), (32, True, True), (-1, False, False), (0, True, False), (96, False, False),
])
def test_row_blocks_quantize_as_the_whole_weight(monkeypatch, group_size, act_order, static_groups):
    """A large weight goes through GPTQ (and its fp target) a block of rows at a time: GPTQ's result is
    the whole weight's bit for bit, the target to float rounding (its products' summation order may
    change with their width); per tensor, whose one scale spans every row, stays whole."""
    x = correlated_inputs(512, 192, seed=11)
    layer = nn.Linear(192, 50, bias=False)
    gptq = GPTQ(layer, drift=True)
    gptq.add_batch(x, fp_inp=x + 0.1 * correlated_inputs(512, 192, seed=12))
    args = (4, group_size, False, act_order, static_groups)
    whole_target = gptq.target_weight(layer.weight, 0.5, 0.01)
    whole = gptq_quantize_weight(whole_target, gptq.hessian, *args)
    monkeypatch.setattr(gptq_module, "ROW_BLOCK_ELEMENTS", 192 * 7)  # 8 blocks, the last of 1 row
    block_rows = []

    def counted_columns(WT, *rest):
        block_rows.append(WT.shape[1])
        columns(WT, *rest)

    monkeypatch.setattr(gptq_module, "gptq_columns", counted_columns)
    torch.testing.assert_close(gptq.target_weight(layer.weight, 0.5, 0.01), whole_target, rtol=1e-5, atol=1e-6)
    blocks = gptq_quantize_weight(whole_target, gptq.hessian, *args)
    assert set(block_rows) == ({50} if group_size == 0 else {7, 1})
    for got, expected in zip(blocks, whole, strict=True):
        assert torch.equal(got, expected)


def test_layer_stages_reproduce_the_decoder_layer():
    model = tiny_llama()
    calib = [torch.randint(0, 128, (n,), generator=torch.Generator().manual_seed(n)) for n in (20, 7, 30, 5)]
    chunks = embed_calibration(model, calib, "GPTQ", chunk_tokens=32)
    assert [c.meta.context_lens for c in chunks] == [[20, 7], [30], [5]]
    layer = model.model.layers[0]
    with torch.no_grad():
        expected = [layer(c.hidden, c.rope, c.meta) for c in chunks]
        stages = [names for names, _ in layer_stages(layer, chunks)]
    assert stages == [QKV, ["self_attn.o_proj"], GATE_UP, ["mlp.down_proj"]]
    for chunk, out in zip(chunks, expected):
        torch.testing.assert_close(chunk.hidden, out)


def test_token_weights_mark_each_sequences_first_token():
    model = tiny_llama()
    calib = [torch.randint(0, 128, (n,), generator=torch.Generator().manual_seed(n)) for n in (20, 7, 30, 5)]
    chunks = embed_calibration(model, calib, "GPTQ", chunk_tokens=32)
    weights = [chunk.token_weights(16.0) for chunk in chunks]
    assert [w.shape[0] for w in weights] == [27, 30, 5]
    assert [torch.nonzero(w == 16).flatten().tolist() for w in weights] == [[0, 20], [0], [0]]
    assert sum(int((w == 1).sum()) for w in weights) == 62 - 4


@pytest.mark.parametrize("calib_dtype", ["fp32", "bf16"])
def test_first_layer_hessian_counts_each_sequence_start_sink_weight_times(calib_dtype):
    """The Hessian sums the inputs as the calibration dtype computes them; GPTQ quantizes the fp32 weights."""
    model = tiny_llama()
    calib = [torch.randint(0, 128, (n,), generator=torch.Generator().manual_seed(n)) for n in (20, 7, 30)]
    layer = model.model.layers[0]
    dtype = torch_dtype(calib_dtype)
    with torch.no_grad():
        norm = copy.deepcopy(layer.input_layernorm).to(dtype)
        x = torch.cat([norm(model.model.embed_tokens(ids).to(dtype)).float() for ids in calib])
        qkv = torch.cat([layer.get_submodule(name).weight for name in QKV])

        def expected(sink_weight: float) -> torch.Tensor:
            weights = torch.ones(len(x))
            weights[[0, 20, 27]] = sink_weight
            hessian = 2 * (x * weights[:, None]).t() @ x / weights.sum()
            return gptq_quantize_weight(qkv, hessian, 4, 32, sym=False)[0]

        weighted, unweighted = expected(16.0), expected(1.0)
    assert (weighted != unweighted).float().mean() > 0.01  # the weight matters at this size
    config = QuantConfig(method="gptq", bits=4, group_size=32, sym=False, sink_weight=16.0, calib_dtype=calib_dtype)
    gptq_quantize(model, calib, config)
    q = torch.cat([layer.get_submodule(name).quantized()[0] for name in QKV])
    assert (q != weighted).float().mean() < 1e-3  # only float summation order may differ


@pytest.mark.parametrize("calib_dtype", ["fp32", "bf16"])
def test_fp_target_gives_each_linear_the_float_models_inputs(monkeypatch, calib_dtype):
    """Layer 1's q/k/v read the quantized layer 0's output, and their float inputs are the float
    model's, run in the calibration dtype."""
    model = tiny_llama()
    dtype = torch_dtype(calib_dtype)
    float_model = copy.deepcopy(model)
    calib = [torch.randint(0, 128, (n,), generator=torch.Generator().manual_seed(n)) for n in (20, 7)]
    q_proj = model.model.layers[1].self_attn.q_proj
    seen = []
    add_batch = GPTQ.add_batch

    def spy(self, inp, weights=None, fp_inp=None):
        if self.layer is q_proj:
            seen.append((inp.clone(), fp_inp.clone()))
        add_batch(self, inp, weights, fp_inp)

    monkeypatch.setattr(GPTQ, "add_batch", spy)
    config = QuantConfig(method="gptq", bits=3, group_size=32, sym=False, fp_target=0.5, calib_dtype=calib_dtype)
    gptq_quantize(model, calib, config)
    (inp, fp_inp), = seen  # both sequences fit one chunk
    assert inp.dtype == fp_inp.dtype == dtype
    with torch.no_grad():
        (chunk,) = embed_calibration(float_model, calib, "GPTQ", dtype=dtype)
        layer0, layer1 = (copy.deepcopy(layer).to(dtype) for layer in float_model.model.layers)
        expected = layer1.input_layernorm(layer0(chunk.hidden, chunk.rope, chunk.meta))
    torch.testing.assert_close(fp_inp, expected)
    assert (inp - expected).norm() > 0.01 * expected.norm()  # 3-bit layer 0 moved the quantized stream


def test_fp_target_override_moves_only_its_module():
    """A module's own fp_target applies to it alone, and turns the float model on when the model's is 0."""
    calib = [torch.randint(0, 128, (n,), generator=torch.Generator().manual_seed(n)) for n in (20, 7)]
    base = QuantConfig(method="gptq", bits=3, group_size=32, sym=False, fp_target=0.0)
    override = QuantConfig(method="gptq", bits=3, group_size=32, sym=False, fp_target=0.0,
                           modules={"model.layers.1.mlp.down_proj": {"fp_target": 1.0}})
    plain, moved = (gptq_quantize(tiny_llama(), calib, config) for config in (base, override))
    changed = []
    for name, module in plain.named_modules():
        if isinstance(module, QuantLinear):
            if not torch.equal(module.quantized()[0], moved.get_submodule(name).quantized()[0]):
                changed.append(name)
    assert changed == ["model.layers.1.mlp.down_proj"]


def test_auto_calibration_dtype_is_bf16_only_where_products_run_natively_in_it(monkeypatch):
    cpu = torch.device("cpu")
    for avx512_bf16, amx, expected in [(False, False, torch.float32), (True, False, torch.bfloat16),
                                       (False, True, torch.bfloat16)]:
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
        assert calibration_dtype("auto", cpu) is expected
        assert calibration_dtype("fp32", cpu) is torch.float32 and calibration_dtype("bf16", cpu) is torch.bfloat16
    assert calibration_dtype("auto", torch.device("cuda")) is torch.bfloat16  # a device object needs no GPU
