"""slimserve: quantize, evaluate, run and serve language models. `from slimserve import LLM, SamplingParams`."""

__all__ = ["LLM", "SamplingParams"]


def __getattr__(name: str):
    # Imported on first use, so `slimserve --help` and light submodules do not pay for torch.
    if name == "LLM":
        from slimserve.engine.llm import LLM
        return LLM
    if name == "SamplingParams":
        from slimserve.engine.sampling_params import SamplingParams
        return SamplingParams
    raise AttributeError(f"module 'slimserve' has no attribute {name!r}")
