"""Offline batch generation: `LLM("smollm2-135m").generate(prompts, params)`."""
from tqdm import tqdm

from slimserve.assets import DEFAULT_MODEL
from slimserve.config import EngineConfig
from slimserve.engine.llm_engine import LLMEngine, RequestOutput
from slimserve.engine.sampling_params import SamplingParams


class LLM:
    def __init__(self, model: str = DEFAULT_MODEL, **engine_options):
        """engine_options: any EngineConfig field (dtype, device, kv_cache_memory, max_model_len, ...).
        With compile=True, the engine's graphs are compiled here, before the first generate."""
        self.engine = LLMEngine(EngineConfig.from_options(model, **engine_options))
        self.engine.warm_up()
        self.tokenizer = self.engine.tokenizer

    def generate(self, prompts: str | list[str] | list[list[int]],
                 params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """All prompts at once through continuous batching; finished outputs in input order."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if params is None:
            params = SamplingParams()
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"params must be one SamplingParams or one per prompt ({len(prompts)}), "
                             f"got {len(params)}")
        request_ids = [f"generate-{i}" for i in range(len(prompts))]
        finished: dict[str, RequestOutput] = {}
        try:
            for request_id, prompt, p in zip(request_ids, prompts, params):
                self.engine.add_request(request_id, prompt, p)
            with tqdm(total=len(prompts), desc="generate", unit="req", disable=not use_tqdm) as bar:
                while self.engine.has_unfinished():
                    for output in self.engine.step():
                        if output.finished:
                            finished[output.request_id] = output
                            bar.update(1)
        finally:  # a bad prompt or an interrupt leaves nothing behind in the engine
            for request_id in request_ids:
                self.engine.abort(request_id)
        return [finished[request_id] for request_id in request_ids]
