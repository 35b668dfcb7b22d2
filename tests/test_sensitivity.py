import pytest
import torch

from slimserve.config import QuantConfig
from slimserve.models.attention import AttentionMetadata
from slimserve.models.llama import LlamaArgs, LlamaForCausalLM
from slimserve.quant.sensitivity import Sensitivity, rank_sensitivity


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    args = LlamaArgs(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                     num_key_value_heads=2, vocab_size=128)
    return LlamaForCausalLM(args).eval()


EVAL_IDS = torch.randint(0, 128, (96,), generator=torch.Generator().manual_seed(0)).tolist()


def logits(model: LlamaForCausalLM) -> torch.Tensor:
    ids = torch.tensor(EVAL_IDS[:32])
    with torch.no_grad():
        return model.compute_logits(model(ids, torch.arange(32), AttentionMetadata.without_cache([32])))


def test_ranks_layers_most_sensitive_first_and_restores_the_model():
    model = tiny_llama()
    before = logits(model)
    ranking = rank_sensitivity(model, QuantConfig(bits=2, group_size=32), EVAL_IDS, window=32)
    assert all(isinstance(entry, Sensitivity) for entry in ranking)
    assert {name for name, _ in ranking} == {"model.layers.0", "model.layers.1", "model.layers.2", "lm_head"}
    deltas = [delta for _, delta in ranking]
    assert deltas == sorted(deltas, reverse=True) and len(set(deltas)) == 4
    assert all(type(m).__name__ != "QuantLinear" for m in model.modules())
    torch.testing.assert_close(logits(model), before, rtol=0, atol=0)


def test_groups_by_linear_type_and_leaves_skipped_linears_out():
    config = QuantConfig(bits=3, group_size=32, skip=["embed_tokens", "lm_head", "o_proj"])
    ranking = rank_sensitivity(tiny_llama(), config, EVAL_IDS, window=32, max_windows=2, group_by="type")
    assert sorted(name for name, _ in ranking) == sorted(
        ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    )


def test_bad_input_rejected():
    with pytest.raises(ValueError, match="group_by must be one of"):
        rank_sensitivity(tiny_llama(), QuantConfig(group_size=32), EVAL_IDS, window=32, group_by="block")
    with pytest.raises(ValueError, match="config quantizes none of the model's linears"):
        rank_sensitivity(tiny_llama(), QuantConfig(group_size=32, skip=["*"]), EVAL_IDS, window=32)


@pytest.mark.real_model
def test_type_kept_at_8_bits_ranks_last_on_smollm2():
    from slimserve.eval.datasets import load_text
    from slimserve.models.loader import load_model, load_tokenizer

    model = load_model("smollm2-135m", torch.float32)
    eval_ids = load_tokenizer("smollm2-135m").encode(load_text("sotu")[:8000], add_special_tokens=False)
    config = QuantConfig(bits=3, group_size=64, modules={"o_proj": {"bits": 8}}, skip=["embed_tokens", "lm_head"])
    ranking = rank_sensitivity(model, config, eval_ids, window=512, max_windows=1, group_by="type")
    # measured: down_proj +55 %, up +35 %, gate +20 %, v +16 %, q +10 %, k +7.6 %, o_proj (8 bits) +0.05 %
    assert [name for name, _ in ranking][0] == "mlp.down_proj"
    assert ranking[-1].name == "self_attn.o_proj"
    assert abs(ranking[-1].delta_ppl_percent) < 0.1 * ranking[-2].delta_ppl_percent
