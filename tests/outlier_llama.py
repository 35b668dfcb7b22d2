"""A tiny Llama with outlier activation channels, and random token sequences, for the quantization tests."""

import torch

from slimserve.models.llama import LlamaArgs, LlamaForCausalLM


def outlier_llama(scale: float, num_kv_heads: int) -> LlamaForCausalLM:
    """RMSNorm outputs have a few channels `scale`x the rest, as LLM activations do."""
    torch.manual_seed(0)
    args = LlamaArgs(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=num_kv_heads, vocab_size=128, tie_word_embeddings=True)
    model = LlamaForCausalLM(args).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.input_layernorm.weight[:3] = scale
            layer.post_attention_layernorm.weight[5:7] = scale
    return model


def sequences(num: int, length: int, seed: int, vocab_size: int = 128) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab_size, (length,), generator=generator) for _ in range(num)]
