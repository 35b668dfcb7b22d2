"""llama.cpp as a benchmark peer, through llama-cpp-python's low-level API (PEERS.md).

Not a project dependency: install a llama-cpp-python wheel built with AMX off into the bench
environment. Greedy argmax in numpy, one `llama_decode` per step, one seq_id per sequence, KV not
unified, the same thread count as the other engines.
"""

import ctypes
import time
from pathlib import Path

import llama_cpp
import numpy as np

FTYPES = {
    "f32": llama_cpp.LLAMA_FTYPE_ALL_F32,
    "bf16": llama_cpp.LLAMA_FTYPE_MOSTLY_BF16,
    "f16": llama_cpp.LLAMA_FTYPE_MOSTLY_F16,
    "q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0,
    "q4_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0,
}
llama_cpp.llama_backend_init()
_QUIET = llama_cpp.llama_log_callback(lambda level, text, user_data: None)  # kept alive: llama.cpp holds it
llama_cpp.llama_log_set(_QUIET, ctypes.c_void_p())


def requantize(src: Path, quant: str, out_dir: Path) -> Path:
    """The shipped GGUF rewritten at another precision (same dense weights: it was dequantized first)."""
    dst = out_dir / f"{src.stem}.{quant}.gguf"
    if not dst.exists():
        out_dir.mkdir(parents=True, exist_ok=True)  # llama.cpp does not make it
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = FTYPES[quant]
        params.allow_requantize = True
        status = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
        assert status == 0, f"llama_model_quantize({quant}) failed with {status}"
    return dst


class LlamaCppPeer:
    def __init__(self, gguf: Path, threads: int, max_seqs: int, n_ctx: int = 4096):
        self.model = llama_cpp.llama_model_load_from_file(str(gguf).encode(), llama_cpp.llama_model_default_params())
        params = llama_cpp.llama_context_default_params()
        params.n_ctx, params.n_batch, params.n_ubatch = n_ctx, 2048, 512
        params.n_seq_max, params.kv_unified = max_seqs, False
        params.n_threads = params.n_threads_batch = threads
        self.ctx = llama_cpp.llama_init_from_model(self.model, params)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(self.model))
        self.batch = llama_cpp.llama_batch_init(2048, 0, max_seqs)

    def close(self) -> None:
        llama_cpp.llama_batch_free(self.batch)
        llama_cpp.llama_free(self.ctx)
        llama_cpp.llama_model_free(self.model)

    def _decode(self, entries: list[tuple[int, int, int, bool]]) -> None:
        """entries: (token, position, seq_id, wants_logits)."""
        b = self.batch
        b.n_tokens = len(entries)
        for i, (token, pos, seq, logits) in enumerate(entries):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = token, pos, 1, logits
            b.seq_id[i][0] = seq
        assert llama_cpp.llama_decode(self.ctx, b) == 0

    def _argmax(self, i: int) -> int:
        return int(np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self.ctx, i), shape=(self.n_vocab,)).argmax())

    def generate(self, prompts: list[list[int]], new_tokens: int) -> tuple[list[list[int]], float, float]:
        """Greedy, all prompts as one batch: (outputs, prefill seconds, decode seconds)."""
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(self.ctx), True)
        start = time.perf_counter()
        outputs: list[list[int]] = []
        for s, prompt in enumerate(prompts):  # one decode call per prompt: n_batch bounds a call
            self._decode([(t, p, s, p == len(prompt) - 1) for p, t in enumerate(prompt)])
            outputs.append([self._argmax(len(prompt) - 1)])
        prefill = time.perf_counter() - start
        start = time.perf_counter()
        for step in range(new_tokens - 1):
            self._decode([(out[-1], len(p) + step, s, True) for s, (p, out) in enumerate(zip(prompts, outputs))])
            for s, out in enumerate(outputs):
                out.append(self._argmax(s))
        return outputs, prefill, time.perf_counter() - start
