import pytest

from slimserve.config import SMOOTH_ALPHA, QuantConfig


def test_defaults_are_4bit_g128_symmetric_rtn():
    config = QuantConfig()
    assert (config.method, config.bits, config.group_size, config.sym) == ("rtn", 4, 128, True)
    assert (config.damp_percent, config.block_size) == (0.01, 128)
    assert (config.num_calib_samples, config.calib_seq_len) == (128, 2048)
    assert config.skip == ["embed_tokens"]


def test_only_method_smoothquant_smooths_by_default():
    assert QuantConfig(method="smoothquant").smooth_alpha == SMOOTH_ALPHA
    assert QuantConfig(method="smoothquant", smooth_alpha=0.5).smooth_alpha == 0.5
    assert QuantConfig(method="gptq").smooth_alpha is None and QuantConfig().smooth_alpha is None


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"bits": 1}, "bits must be between 2 and 8, got 1"),
        ({"bits": 9}, "bits must be between 2 and 8, got 9"),
        ({"method": "fp8"}, "method must be one of"),
        ({"group_size": -2}, "group_size must be -1"),
        ({"damp_percent": 0.0}, "damp_percent must be in"),
        ({"block_size": 0}, "block_size must be at least 1, got 0"),
        ({"sink_weight": 0.0}, "sink_weight must be positive, got 0.0"),
        ({"fp_target": -0.5}, r"fp_target must be in \[0, 1\], got -0.5"),
        ({"fp_target": 1.5}, r"fp_target must be in \[0, 1\], got 1.5"),
        ({"num_calib_samples": 0}, "num_calib_samples must be at least 1"),
        ({"calib_dtype": "fp16"}, r"calib_dtype must be one of \('auto', 'fp32', 'bf16'\), got 'fp16'"),
        ({"act_bits": 4}, "act_bits must be None or 8, got 4"),
        ({"act_bits": 8, "bits": 3}, "act_bits=8 .* bits=3"),
        ({"act_bits": 8, "bits": 8, "group_size": 64}, "act_bits=8 .* group_size=64"),
        ({"modules": {"lm_head": {"bitz": 8}}}, r"modules\['lm_head'\] has unknown fields \['bitz'\]"),
        ({"modules": {"lm_head": {"bits": 12}}}, "bits must be between 2 and 8, got 12"),
        ({"modules": {"q_proj": {"sink_weight": 4.0, "bits": 8}}},
         r"modules\['q_proj'\] overrides \['sink_weight'\], which apply to the whole model"),
        ({"modules": {"lm_head": {"method": "rtn"}}}, r"overrides \['method'\], which apply to the whole model"),
        ({"method": "awq", "mse": True}, "mse searches RTN's and GPTQ's ranges; awq has its own"),
        ({"method": "awq", "smooth_alpha": 0.5}, "smooth_alpha applies before rtn, gptq, smoothquant; awq cannot"),
        ({"method": "gptq", "smooth_alpha": 1.5}, r"smooth_alpha must be in \[0, 1\], got 1.5"),
        ({"modules": {"q_proj": {"smooth_alpha": 0.5}}}, r"overrides \['smooth_alpha'\], which apply to the whole"),
    ],
)
def test_bad_values_name_field_and_value(kwargs, message):
    with pytest.raises(ValueError, match=message):
        QuantConfig(**kwargs)


def test_for_module_applies_overrides_patterns_and_skips():
    config = QuantConfig(
        bits=4,
        modules={
            "lm_head": {"bits": 8, "group_size": -1},
            "mlp.down_proj": {"group_size": 64},
            "model.layers.1?.*": {"bits": 3},
            "model.layers.0.self_attn.q_proj": {"skip": True},
        },
    )
    assert config.for_module("model.embed_tokens") is None  # default skip list
    assert config.for_module("model.layers.0.self_attn.q_proj") is None
    head = config.for_module("lm_head")
    assert (head.bits, head.group_size) == (8, -1)
    down = config.for_module("model.layers.3.mlp.down_proj")
    assert (down.bits, down.group_size) == (4, 64)
    late_down = config.for_module("model.layers.12.mlp.down_proj")
    assert (late_down.bits, late_down.group_size) == (3, 64)  # both patterns apply, in order
    plain = config.for_module("model.layers.3.self_attn.k_proj")
    assert (plain.bits, plain.group_size) == (4, 128)
    assert plain.modules == {} and plain.skip == []


def test_skip_list_replaces_default():
    config = QuantConfig(skip=["lm_head"])
    assert config.for_module("lm_head") is None
    assert config.for_module("model.embed_tokens") is not None
