"""Tensors in, token ids out: the model, its paged KV cache, and one forward pass per step.

Every scheduled token of every sequence (prefill chunks and decodes alike) goes into one flat
batch; only the rows that end a sequence's scheduled work get logits and a sampled token.
"""
import logging
import types
from collections.abc import Collection

import torch

from slimserve.config import CPU_KV_CACHE_MEMORY, EngineConfig
from slimserve.engine.sampler import SamplerOutput, prompt_logprobs, sample
from slimserve.engine.scheduler import SchedulerOutput
from slimserve.engine.sequence import Sequence
from slimserve.models import opaque
from slimserve.models.attention import AttentionMetadata, store_kv
from slimserve.models.inference_linear import prepare_for_inference
from slimserve.models.loader import load_model, torch_dtype

logger = logging.getLogger(__name__)

MiB = 2**20
# Inductor inlines a pointwise input into the reduction reading it unless the input reads more than
# realize_acc_reads_threshold buffers (12 on the CPU by default) or takes more than
# realize_opcount_threshold operations (30). Inlined into a matrix-vector product, the input is
# recomputed for every output row: the residual add and RMSNorm before SmolLM2-135M's int8 layers
# (8.7 ms per step that way, 5.1 ms with the normalized row stored once), W8A8's activation
# quantization (15.6 ms per step, 6.4 ms stored once).
# cpp_wrapper: the graph's kernels are called from compiled C++ rather than from Python. SmolLM2-135M
# bs1 on 2 Zen 4 cores, fresh processes alternating: bf16 85-88 vs 72-74 tok/s; int8 100-110 either
# way. The first compilation takes longer (int8: 250 vs 120 s; later starts read the cache).
DECODE_GRAPH_OPTIONS = {"realize_acc_reads_threshold": 2, "realize_opcount_threshold": 4, "cpp_wrapper": True}


def input_guards(entries) -> list[bool]:
    """torch.compile's guard_filter_fn for a runner's graphs: keep the guards on the call's own
    tensors and on global state (grad mode and the like); drop those on the runner, its model and
    module globals, which never change after load. SmolLM2-135M's decode graph had 4,000 of them,
    whose check took 0.45 ms of a 12 ms bf16 step; 0.06 ms for the 13 kept. (vLLM's compiled
    models skip dynamo's guards altogether.)"""
    return [not (entry.is_global or entry.name == "self" or entry.name.startswith("self.")) for entry in entries]


def compile_own(method, dynamic: bool | None = None, options: dict | None = None):
    """torch.compile of a runner's method through a copy of its function with a code object of its
    own. Dynamo keeps compiled graphs per code object: without the copy, every runner of the process
    would share them, and with input_guards one runner's graphs would serve another's model."""
    function = method.__func__
    own = types.FunctionType(function.__code__.replace(), function.__globals__, function.__name__,
                             function.__defaults__, function.__closure__)
    return torch.compile(types.MethodType(own, method.__self__), dynamic=dynamic,
                         options={**(options or {}), "guard_filter_fn": input_guards})


class ModelRunner:
    def __init__(self, config: EngineConfig, eos_token_ids: Collection[int]):
        self.device = torch.device(config.device)
        self.dtype = torch_dtype(config.dtype)
        self.model = prepare_for_inference(load_model(config.model, self.dtype, self.device), config.compile)
        self.compiled_decode = self.compiled_model = None
        if config.compile:
            # Decode-only steps as one graph for one sequence and one for any number (the context
            # length a dynamic dimension of both): at batch 1 the eager step's per-op overhead and
            # oneDNN's GEMV leave half the memory bandwidth unused; batched, attention's operator
            # is called from the graph without Python.
            self.compiled_decode = compile_own(self._decode, options=DECODE_GRAPH_OPTIONS)
            # Every other step as one graph with a dynamic token count, the matrix products and
            # attention called from it as opaque operators (models/opaque.py).
            opaque.register(self.model)
            self.compiled_model = compile_own(self._model_step, dynamic=True)
        self.warmed_up = False  # every graph compiled: see _forward
        self.vocab_size: int = self.model.args.vocab_size
        self.block_size = config.block_size
        self.max_model_len = config.max_model_len or self.model.max_model_len
        if self.max_model_len > self.model.max_model_len:
            raise ValueError(f"max_model_len {self.max_model_len} exceeds the model's context length "
                             f"{self.model.max_model_len}")
        self.eos_token_ids = frozenset(eos_token_ids)

        block_bytes = torch.Size(self.model.kv_cache_shape(1, self.block_size)).numel() * self.dtype.itemsize
        memory = self._kv_cache_memory(config)
        self.num_blocks = memory // block_bytes
        self.blocks_per_seq = -(-self.max_model_len // self.block_size)
        if self.num_blocks < self.blocks_per_seq:
            needed = self.blocks_per_seq * block_bytes
            raise ValueError(f"the KV cache of {memory} bytes holds {self.num_blocks} blocks of {self.block_size} "
                             f"tokens, but one sequence of max_model_len={self.max_model_len} tokens needs "
                             f"{self.blocks_per_seq} blocks = {needed} bytes ({needed / MiB:.1f} MiB): raise "
                             "kv_cache_memory (or gpu_memory_utilization) or lower max_model_len")
        # Zeroed, not empty: batched decode attention reads (and masks) slots never written, and a
        # masked NaN would still poison the softmax.
        self.kv_cache = torch.zeros(self.model.kv_cache_shape(self.num_blocks, self.block_size),
                                    dtype=self.dtype, device=self.device)
        logger.info("KV cache: %d blocks of %d tokens = %.1f MiB, max concurrent sequences of length %d: %d",
                    self.num_blocks, self.block_size, self.num_blocks * block_bytes / MiB, self.max_model_len,
                    self.num_blocks // self.blocks_per_seq)
        # Per sequence, kept across steps (and preemptions): a seeded sequence draws the same noise
        # whatever else is in the batch. Unseeded ones are seeded from the engine's own generator.
        self.engine_generator = torch.Generator().manual_seed(config.seed)
        self.generators: dict[int, torch.Generator] = {}

    def _kv_cache_memory(self, config: EngineConfig) -> int:
        if config.kv_cache_memory is not None:
            return config.kv_cache_memory
        if self.device.type == "cpu":
            return CPU_KV_CACHE_MEMORY
        free, total = torch.cuda.mem_get_info(self.device)  # the model is loaded already
        return max(0, int(free - total * (1.0 - config.gpu_memory_utilization)))

    def free(self, seqs: list[Sequence]) -> None:
        """Forget finished or aborted sequences' generators."""
        for seq in seqs:
            self.generators.pop(seq.seq_id, None)

    def _generator(self, seq: Sequence) -> torch.Generator:
        if seq.seq_id not in self.generators:
            seed = seq.sampling_params.seed
            if seed is None:
                seed = int(torch.randint(2**62, (1,), generator=self.engine_generator))
            self.generators[seq.seq_id] = torch.Generator(self.device).manual_seed(seed)
        return self.generators[seq.seq_id]

    @torch.inference_mode()
    def execute(self, scheduled: SchedulerOutput) -> SamplerOutput:
        """Run the batch, sample for sequences whose scheduled tokens reach their end, fill prompt logprobs.

        Returns one entry per scheduled sequence; -1 (and logprobs None) where a prefill is still
        incomplete, which the scheduler ignores.
        """
        if not scheduled.seqs:
            return SamplerOutput(token_ids=[], logprobs=[])
        B = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slot_mapping: list[int] = []
        cu_seqlens_q, context_lens = [0], []
        for seq, num_tokens in zip(scheduled.seqs, scheduled.num_scheduled_tokens):
            start, end = seq.num_computed_tokens, seq.num_computed_tokens + num_tokens
            input_ids += seq.token_ids[start:end]
            positions += range(start, end)
            slot_mapping += [seq.block_table[p // B] * B + p % B for p in range(start, end)]
            cu_seqlens_q.append(cu_seqlens_q[-1] + num_tokens)
            context_lens.append(end)
        max_blocks = max(len(seq.block_table) for seq in scheduled.seqs)
        block_tables = [seq.block_table + [-1] * (max_blocks - len(seq.block_table)) for seq in scheduled.seqs]
        # The scheduler lists decodes first; any leading run of one-token sequences takes the batched path.
        num_decode_seqs = next((i for i, n in enumerate(scheduled.num_scheduled_tokens) if n != 1), len(scheduled.seqs))
        rows = [i for i, seq in enumerate(scheduled.seqs) if context_lens[i] == len(seq)]  # those sampling now
        if (self.compiled_decode is not None and len(input_ids) == len(rows)  # one token each, all sampling
                and all(seq.sampling_params.prompt_logprobs is None for seq in scheduled.seqs)):
            return self._sample(scheduled.seqs, self._run_compiled(input_ids, positions, slot_mapping, block_tables,
                                                                   context_lens))
        meta = AttentionMetadata(cu_seqlens_q, context_lens, self._tensor(slot_mapping), self._tensor(block_tables),
                                 self.kv_cache, num_decode_seqs)
        hidden = self._forward(self._tensor(input_ids), self._tensor(positions), meta)  # (T, hidden)

        for i, seq in enumerate(scheduled.seqs):
            if seq.sampling_params.prompt_logprobs is not None:
                self._fill_prompt_logprobs(seq, hidden[cu_seqlens_q[i]:cu_seqlens_q[i + 1]])
        sampled = SamplerOutput(token_ids=[-1] * len(scheduled.seqs), logprobs=[None] * len(scheduled.seqs))
        if not rows:
            return sampled
        logits = self.model.compute_logits(hidden[self._tensor([cu_seqlens_q[i + 1] - 1 for i in rows])])
        out = self._sample([scheduled.seqs[i] for i in rows], logits)
        for i, token_id, logprobs in zip(rows, out.token_ids, out.logprobs):
            sampled.token_ids[i], sampled.logprobs[i] = token_id, logprobs
        return sampled

    def _forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Hidden states (T, hidden) of the step's tokens: through the compiled graph for two tokens
        or more (one token would need a graph of its own), else eagerly."""
        if self.compiled_model is None or input_ids.shape[0] < 2:
            return self.model(input_ids, positions, meta)
        # Past warm-up, dynamo checks only the guards that tell graphs apart. Those of the graph
        # (input_guards) cannot fail here; the batched decode attention it calls first ran inside
        # warm-up's compilation, under tracing's dispatch keys, which later steps do not share.
        with opaque.step_metadata(meta), torch.compiler.set_stance(skip_guard_eval_unsafe=self.warmed_up):
            return self.compiled_model(input_ids, positions)

    @torch.inference_mode()
    def warm_up(self) -> None:
        """Compile the graphs now rather than at the first requests' steps: decode of one sequence
        and of two (which serves any number), and the other steps' graph with the batched decode
        attention it calls (a step of two one-token sequences). The block written is zeroed again
        afterwards."""
        if self.compiled_decode is None:
            return
        self._run_compiled([0], [0], [0], [[0]], [1])
        self._run_compiled([0, 0], [0, 0], [0, 0], [[0], [0]], [1, 1])
        meta = AttentionMetadata([0, 1, 2], [1, 1], self._tensor([0, 0]), self._tensor([[0], [0]]), self.kv_cache,
                                 num_decode_seqs=2)
        self._forward(self._tensor([0, 0]), self._tensor([0, 0]), meta)
        self.kv_cache[:, :, :, 0].zero_()
        self.warmed_up = True

    def _run_compiled(self, input_ids: list[int], positions: list[int], slot_mapping: list[int],
                      block_tables: list[list[int]], context_lens: list[int]) -> torch.Tensor:
        """A decode-only step through compiled_decode. Block tables get at least two columns (the
        second -1 where one block holds every context) and their width is marked dynamic, so one
        graph serves every context length; the sequence count is too from two sequences on."""
        block_tables = [table + [-1] for table in block_tables] if len(block_tables[0]) == 1 else block_tables
        tensors = [self._tensor(values) for values in (input_ids, positions, slot_mapping, block_tables, context_lens)]
        torch._dynamo.mark_dynamic(tensors[3], 1)
        if len(input_ids) > 1:
            for tensor in tensors:
                torch._dynamo.mark_dynamic(tensor, 0)
        logits, new_kv = self.compiled_decode(*tensors)
        store_kv(new_kv, self.kv_cache, tensors[2])
        return logits

    def _model_step(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The body of the graph of two tokens or more: attention reads the step's metadata from
        opaque.step_metadata."""
        return self.model(input_ids, positions, None)

    def _decode(self, input_ids: torch.Tensor, positions: torch.Tensor, slot_mapping: torch.Tensor,
                block_tables: torch.Tensor, context_lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The body of the compiled graph: a decode-only step (one new token per sequence). Returns
        the logits and the new keys and values of every layer, (layers, 2, n, Hkv, D), for store_kv."""
        n = input_ids.shape[0]
        meta = AttentionMetadata([], [], slot_mapping, block_tables, self.kv_cache, n, context_lens, new_kv=[])
        logits = self.model.compute_logits(self.model(input_ids, positions, meta))
        return logits, torch.stack([torch.stack(kv) for kv in meta.new_kv])

    def _sample(self, seqs: list[Sequence], logits: torch.Tensor) -> SamplerOutput:
        return sample(logits, [seq.sampling_params for seq in seqs], [seq.output_token_ids for seq in seqs],
                      [seq.prompt_token_ids for seq in seqs], [self._generator(seq) for seq in seqs],
                      self.eos_token_ids)

    def _fill_prompt_logprobs(self, seq: Sequence, hidden: torch.Tensor) -> None:
        """Append the entries this chunk completes: position p predicts prompt token p + 1.

        hidden (num_tokens, hidden) holds seq's rows from position num_computed_tokens on. Entries
        already known (a recompute after preemption) are not computed again.
        """
        start = seq.num_computed_tokens
        if not seq.prompt_logprobs:
            assert start == 0, "prefix-cache hits skip the positions prompt logprobs need"
            seq.prompt_logprobs.append(None)  # nothing predicts the first token
        first = len(seq.prompt_logprobs) - 1  # the first position whose entry is missing
        last = min(start + hidden.shape[0], seq.num_prompt_tokens - 1)  # exclusive
        if first >= last:
            return
        assert first >= start, (seq, first)
        logits = self.model.compute_logits(hidden[first - start:last - start])
        seq.prompt_logprobs += prompt_logprobs(logits, seq.token_ids[first + 1:last + 1],
                                               seq.sampling_params.prompt_logprobs)

    def _tensor(self, values: list) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.int64, device=self.device)
