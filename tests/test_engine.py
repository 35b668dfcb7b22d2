"""The engine end to end: greedy parity with transformers under every scheduling regime, sampling
knobs, stopping rules, abort, KV accounting and bad input. Broad cases run a tiny random Llama with
a one-character-per-token ASCII tokenizer; `real_model` tests run SmolLM2-135M in fp32."""
import json
import random

import pytest
import torch
import transformers
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, pre_tokenizers
from tokenizers.models import BPE
from transformers.initialization import no_init_weights

from slimserve import LLM, SamplingParams
from slimserve.config import EngineConfig
from slimserve.engine.llm_engine import LLMEngine, RequestOutput
from slimserve.errors import ContextLengthError
from slimserve.models.loader import load_model

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=512, initializer_range=0.1)
NUM_CHARS = 96  # token i < 96 is one ASCII character; 96 is <eos>
EOS = NUM_CHARS
GREEDY = dict(temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """On 2 cores shared with other jobs, torch's OpenMP threads spin waiting for each other and a
    step takes up to 10x longer than on one thread; the results do not depend on it."""
    num_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(num_threads)


def tiny_block_bytes(block_size: int) -> int:
    return TINY["num_hidden_layers"] * 2 * block_size * TINY["num_key_value_heads"] * 16 * 4  # head_dim 16, fp32


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(folder holding a random Llama and its ASCII tokenizer, the same model in transformers)."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    # No EOS in the transformers config: its greedy reference never stops early, like ignore_eos.
    config = transformers.LlamaConfig(**TINY, vocab_size=NUM_CHARS + 1, bos_token_id=None, eos_token_id=None)
    hf = transformers.LlamaForCausalLM(config).eval()
    hf.save_pretrained(folder)
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    chars = [byte_level.pre_tokenize_str(chr(b))[0][0] for b in [10, *range(32, 127)]]
    tokenizer = HFTokenizer(BPE({c: i for i, c in enumerate(chars)}, merges=[]))
    tokenizer.pre_tokenizer, tokenizer.decoder = byte_level, decoders.ByteLevel()
    tokenizer.add_special_tokens(["<eos>"])
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<eos>"}))
    return folder, hf


def tiny_engine(folder, **overrides) -> LLMEngine:
    return LLMEngine(EngineConfig(str(folder), **({"kv_cache_memory": 2**22, "max_num_seqs": 16} | overrides)))


@torch.no_grad()
def hf_greedy(hf, prompt_ids: list[int], num_tokens: int) -> list[int]:
    ids = torch.tensor([prompt_ids])
    # An explicit mask: generate() would otherwise treat prompt tokens equal to the pad id as padding.
    out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=num_tokens, do_sample=False,
                      pad_token_id=EOS)
    return out[0, len(prompt_ids):].tolist()


def all_seqs(engine: LLMEngine):
    return [text.seq for request in engine.requests.values() for text in request.texts.values()]


def run_staggered(engine: LLMEngine, requests: list[tuple[str, list[int] | str, SamplingParams]],
                  arrival_steps: list[int]) -> tuple[dict[str, RequestOutput], int]:
    """Add each request at its step, step to the end; returns final outputs and the number of steps
    in which one sequence advanced its prefill while another decoded."""
    pending = sorted(zip(arrival_steps, range(len(requests))))
    outputs, num_mixed, step = {}, 0, 0
    while pending or engine.has_unfinished():
        while pending and pending[0][0] <= step:
            engine.add_request(*requests[pending.pop(0)[1]])
        seqs = all_seqs(engine)
        before = {seq.seq_id: (seq.num_computed_tokens, len(seq)) for seq in seqs}
        for output in engine.step():
            if output.finished:
                outputs[output.request_id] = output
        prefilled = [s for s in seqs if before[s.seq_id][0] < before[s.seq_id][1] - 1
                     and (s.num_computed_tokens > before[s.seq_id][0] or len(s) > before[s.seq_id][1])]
        decoded = [s for s in seqs if before[s.seq_id][0] == before[s.seq_id][1] - 1 and len(s) > before[s.seq_id][1]]
        num_mixed += bool(prefilled and decoded)
        step += 1
    assert engine.scheduler.block_manager.usage == 0.0
    return outputs, num_mixed


def generate_one(engine: LLMEngine, prompt, params: SamplingParams) -> RequestOutput:
    outputs, _ = run_staggered(engine, [("one", prompt, params)], [0])
    return outputs["one"]


def check_greedy_parity(engine, hf, prompts: list[list[int]], num_tokens: int) -> int:
    """16 prompts arriving over the first steps; every output equals transformers' greedy one."""
    requests = [(f"r{i}", p, SamplingParams(max_tokens=num_tokens, **GREEDY)) for i, p in enumerate(prompts)]
    outputs, num_mixed = run_staggered(engine, requests, arrival_steps=[i // 3 * 2 for i in range(len(prompts))])
    for i, prompt in enumerate(prompts):
        got = outputs[f"r{i}"].outputs[0]
        assert got.token_ids == hf_greedy(hf, prompt, num_tokens), f"prompt {i} of {len(prompt)} tokens"
        assert got.finish_reason == "length"
    return num_mixed


def random_prompts(num: int, min_len: int, max_len: int, seed: int = 0, prefix: list[int] = ()) -> list[list[int]]:
    rng = random.Random(seed)
    return [list(prefix) + [rng.randrange(NUM_CHARS) for _ in range(rng.randint(min_len, max_len))]
            for _ in range(num)]


def test_greedy_matches_transformers_with_mixed_batches(tiny, decode_operator):
    folder, hf = tiny
    engine = tiny_engine(folder, block_size=4, max_num_batched_tokens=32)
    num_mixed = check_greedy_parity(engine, hf, random_prompts(16, 3, 60), num_tokens=10)
    assert num_mixed > 0
    assert engine.stats().num_preemptions == 0


def test_greedy_matches_transformers_under_preemption(tiny):
    folder, hf = tiny
    # 17 blocks of 4 tokens: one full 64-token sequence fits, 16 concurrent ones do not.
    engine = tiny_engine(folder, block_size=4, max_model_len=64, kv_cache_memory=17 * tiny_block_bytes(4))
    check_greedy_parity(engine, hf, random_prompts(16, 3, 40, seed=1), num_tokens=12)
    assert engine.stats().num_preemptions > 0


def test_greedy_matches_transformers_with_shared_prefixes(tiny):
    folder, hf = tiny
    engine = tiny_engine(folder, block_size=4)
    prompts = random_prompts(16, 1, 12, seed=2, prefix=random_prompts(1, 45, 45, seed=3)[0])
    check_greedy_parity(engine, hf, prompts, num_tokens=8)
    stats = engine.stats()
    print(f"prefix cache: {stats.prefix_cache_hits} of {stats.prefix_cache_queries} prompt tokens hit")
    assert stats.prefix_cache_hits >= 10 * 44  # most later arrivals reuse all 11 full prefix blocks


def test_greedy_matches_transformers_with_chunked_prefill(tiny):
    folder, hf = tiny
    engine = tiny_engine(folder, block_size=8, max_num_seqs=4, max_num_batched_tokens=8)
    num_mixed = check_greedy_parity(engine, hf, random_prompts(16, 20, 70, seed=4), num_tokens=6)
    assert num_mixed > 0


def test_compiled_decode_matches_transformers(tiny, decode_operator):
    """compile=True: decode-only steps run as a compiled graph for one sequence and one for any
    number (each for every context length), every other step (prefill chunks, mixed steps) as
    another, one for every token count; warm_up compiles all three. Greedy tokens equal
    transformers' throughout."""
    folder, hf = tiny
    engine = tiny_engine(folder, block_size=4, max_num_batched_tokens=32, compile=True)
    runner = engine.model_runner
    decode_sizes, step_sizes = [], []
    compiled_decode, compiled_model = runner.compiled_decode, runner.compiled_model

    def counting_decode(input_ids, *args):
        decode_sizes.append(input_ids.shape[0])
        return compiled_decode(input_ids, *args)

    def counting_model(input_ids, *args):
        step_sizes.append(input_ids.shape[0])
        return compiled_model(input_ids, *args)

    runner.compiled_decode, runner.compiled_model = counting_decode, counting_model
    engine.warm_up()
    assert decode_sizes == [1, 2] and step_sizes == [2] and not runner.kv_cache.any()
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    decode_sizes.clear(), step_sizes.clear()
    prompt = random_prompts(1, 2, 2, seed=17)[0]
    out = generate_one(engine, prompt, SamplingParams(max_tokens=30, **GREEDY))
    assert out.outputs[0].token_ids == hf_greedy(hf, prompt, 30)
    assert step_sizes == [2] and decode_sizes == [1] * 29  # the prompt's step, then every other
    decode_sizes.clear()
    check_greedy_parity(engine, hf, random_prompts(16, 3, 60), num_tokens=10)
    assert len(set(step_sizes)) >= 3 and len(set(decode_sizes)) > 3  # many sizes, one graph for each kind:
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs  # warm_up compiled them all
    assert engine.stats().kv_cache_usage == 0


def test_compiled_warm_up_when_no_context_spans_two_blocks(tiny):
    folder, hf = tiny
    engine = tiny_engine(folder, block_size=4, max_model_len=4, kv_cache_memory=tiny_block_bytes(4), compile=True)
    engine.warm_up()
    assert not engine.model_runner.kv_cache.any()
    prompt = random_prompts(1, 2, 2, seed=18)[0]
    assert generate_one(engine, prompt, SamplingParams(max_tokens=2, **GREEDY)).outputs[0].token_ids == \
        hf_greedy(hf, prompt, 2)


def test_compiled_runners_keep_their_own_graphs(tiny):
    """Compiled graphs skip the guards on the runner's model (model_runner.input_guards), so each
    runner compiles its own: a bf16 runner's graphs never serve an fp32 runner of the same model in
    the same process, whose tokens equal its eager run's."""
    folder, _ = tiny
    prompt = random_prompts(1, 5, 5, seed=19)[0]
    params = SamplingParams(max_tokens=6, **GREEDY)
    outputs = {}
    for dtype, compiled in (("bf16", True), ("fp32", True), ("fp32", False)):
        engine = tiny_engine(folder, dtype=dtype, compile=compiled)
        engine.warm_up()
        outputs[dtype, compiled] = generate_one(engine, prompt, params).outputs[0].token_ids
    assert outputs["fp32", True] == outputs["fp32", False]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_greedy_parity_and_seeded_sampling_on_cuda(tiny):
    folder, hf = tiny
    engine = tiny_engine(folder, device="cuda", block_size=4, max_num_batched_tokens=32)
    assert engine.model_runner.kv_cache.is_cuda
    check_greedy_parity(engine, hf, random_prompts(16, 3, 60), num_tokens=10)
    params = SamplingParams(temperature=1.0, seed=7, max_tokens=16)
    prompt, *others = random_prompts(5, 5, 40, seed=15)
    alone = generate_one(engine, prompt, params).outputs[0].token_ids
    requests = [(f"o{i}", p, SamplingParams(temperature=1.0, max_tokens=10)) for i, p in enumerate(others)]
    outputs, _ = run_staggered(engine, requests + [("seeded", prompt, params)], [0, 0, 1, 2, 1])
    assert outputs["seeded"].outputs[0].token_ids == alone


def test_llm_generate_keeps_input_order(tiny):
    folder, hf = tiny
    llm = LLM(str(folder), kv_cache_memory=2**22)
    prompts = random_prompts(4, 5, 30, seed=5)
    params = [SamplingParams(max_tokens=n, **GREEDY) for n in (9, 1, 5, 3)]  # finishing out of order
    outputs = llm.generate(prompts, params, use_tqdm=False)
    assert [o.prompt_token_ids for o in outputs] == prompts
    references = [hf_greedy(hf, prompt, p.max_tokens) for prompt, p in zip(prompts, params)]
    assert [o.outputs[0].token_ids for o in outputs] == references
    text = llm.generate("Hello", SamplingParams(max_tokens=4, **GREEDY), use_tqdm=False)[0]
    assert text.prompt == "Hello" and text.prompt_token_ids == llm.tokenizer.encode("Hello")
    assert text.outputs[0].text == llm.tokenizer.decode(text.outputs[0].token_ids)
    with pytest.raises(ValueError, match="one per prompt"):
        llm.generate(prompts, params[:2])
    with pytest.raises(ValueError, match="unknown engine options.*'kv_cache_size'"):
        LLM(str(folder), kv_cache_size=2**22)


def test_seeded_sampling_is_batch_invariant(tiny):
    folder, _ = tiny
    engine = tiny_engine(folder, block_size=4, max_num_batched_tokens=16)
    prompt = random_prompts(1, 20, 20, seed=6)[0]
    params = SamplingParams(temperature=1.0, top_p=0.95, seed=7, max_tokens=16)
    alone = generate_one(engine, prompt, params).outputs[0].token_ids
    others = [(f"o{i}", p, SamplingParams(temperature=1.0, seed=i if i % 2 else None, max_tokens=12))
              for i, p in enumerate(random_prompts(6, 3, 50, seed=8))]
    outputs, _ = run_staggered(engine, others + [("seeded", prompt, params)], [0, 0, 1, 2, 4, 5, 3])
    assert outputs["seeded"].outputs[0].token_ids == alone
    other_seed = generate_one(engine, prompt, SamplingParams(temperature=1.0, top_p=0.95, seed=8, max_tokens=16))
    assert other_seed.outputs[0].token_ids != alone
    # n > 1 with a seed: completion i samples like a lone request with seed + i.
    three = generate_one(engine, prompt, SamplingParams(n=3, temperature=1.0, top_p=0.95, seed=6, max_tokens=16))
    assert [c.index for c in three.outputs] == [0, 1, 2]
    assert three.outputs[1].token_ids == alone and three.outputs[0].token_ids != alone


def test_n_completions_share_prompt_blocks(tiny):
    folder, hf = tiny
    engine = tiny_engine(folder, block_size=4)
    prompt = random_prompts(1, 41, 41, seed=9)[0]
    out = generate_one(engine, prompt, SamplingParams(n=3, max_tokens=5, **GREEDY))
    reference = hf_greedy(hf, prompt, 5)
    assert [c.token_ids for c in out.outputs] == [reference] * 3
    assert engine.stats().prefix_cache_hits == 2 * 40  # both siblings reuse the 10 full prompt blocks


@torch.no_grad()
def test_prompt_and_sample_logprobs_match_transformers(tiny):
    folder, hf = tiny
    engine = tiny_engine(folder, block_size=4, max_num_seqs=4, max_num_batched_tokens=8)  # chunked prompt
    prompt = random_prompts(1, 30, 30, seed=16)[0]
    out = generate_one(engine, prompt, SamplingParams(max_tokens=4, logprobs=3, prompt_logprobs=2, **GREEDY))
    tokens = out.outputs[0].token_ids
    reference = hf(torch.tensor([prompt + tokens])).logits[0].log_softmax(-1)  # (T, V)
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(prompt)
    for t, entry in enumerate(out.prompt_logprobs[1:], start=1):
        top = reference[t - 1].topk(2).indices.tolist()
        assert set(entry) == {prompt[t], *top}
        assert entry[prompt[t]] == pytest.approx(reference[t - 1, prompt[t]].item(), abs=1e-4)
    for i, entry in enumerate(out.outputs[0].logprobs):
        row = reference[len(prompt) - 1 + i]
        assert set(entry) == set(row.topk(3).indices.tolist()) and tokens[i] in entry
        assert entry[tokens[i]] == pytest.approx(row.max().item(), abs=1e-4)


def test_prompt_logprobs_of_a_prompt_whose_prefix_is_cached(tiny):
    """A repeated prompt with prompt_logprobs used to hit the prefix cache and trip an assert in the runner."""
    folder, _ = tiny
    engine = tiny_engine(folder, block_size=4)
    prompt = random_prompts(1, 30, 30, seed=17)[0]
    generate_one(engine, prompt, SamplingParams(max_tokens=2, **GREEDY))
    out = generate_one(engine, prompt, SamplingParams(max_tokens=2, prompt_logprobs=0, **GREEDY))
    assert len(out.prompt_logprobs) == len(prompt)


def test_stop_strings_cut_text_and_stream_only_growing_text(tiny):
    folder, hf = tiny
    engine = tiny_engine(folder)
    prompt = random_prompts(1, 10, 10, seed=10)[0]
    tokens = hf_greedy(hf, prompt, 24)
    full = engine.tokenizer.decode(tokens)
    assert len(full) == 24  # one character per token
    stop = full[9:12]
    start = full.find(stop)
    engine.add_request("s", prompt, SamplingParams(max_tokens=24, stop=["not there", stop], **GREEDY))
    texts = []
    while engine.has_unfinished():
        texts += [o.outputs[0].text for o in engine.step()]
    assert texts[-1] == full[:start]
    assert all(texts[-1].startswith(t) for t in texts)  # a stop string's start is never streamed
    final = engine.stats()
    assert final.kv_cache_usage == 0.0 and final.num_generation_tokens == start + 3


def test_stop_token_ids_min_tokens_and_max_tokens(tiny):
    folder, hf = tiny
    engine = tiny_engine(folder, max_model_len=64)
    prompt = random_prompts(1, 10, 10, seed=11)[0]
    tokens = hf_greedy(hf, prompt, 20)
    stop_id = tokens[4]
    k = tokens.index(stop_id)
    out = generate_one(engine, prompt, SamplingParams(max_tokens=20, stop_token_ids=[stop_id], **GREEDY)).outputs[0]
    assert out.token_ids == tokens[:k + 1] and out.finish_reason == "stop"
    assert out.text == engine.tokenizer.decode(tokens[:k])  # the stop token's text is not output
    out = generate_one(engine, prompt, SamplingParams(max_tokens=20, stop_token_ids=[tokens[0]], min_tokens=6,
                                                      **GREEDY)).outputs[0]
    assert len(out.token_ids) >= 6 and tokens[0] not in out.token_ids[:6]
    # max_tokens past the context: stops with "length" when prompt + output fill max_model_len.
    long_prompt = random_prompts(1, 60, 60, seed=12)[0]
    for max_tokens in (100, None):
        out = generate_one(engine, long_prompt, SamplingParams(max_tokens=max_tokens, **GREEDY)).outputs[0]
        assert len(out.token_ids) == 4 and out.finish_reason == "length"


def test_abort_frees_blocks_at_once(tiny):
    folder, _ = tiny
    engine = tiny_engine(folder, block_size=4, max_num_seqs=2)
    prompts = random_prompts(3, 30, 30, seed=13)
    for i, prompt in enumerate(prompts):
        engine.add_request(f"a{i}", prompt, SamplingParams(n=2 if i == 0 else 1, max_tokens=50, **GREEDY))
    engine.step()  # a0's first completion and a1 run, a0's sibling waits for a0's first token, a2 waits
    usage = engine.stats().kv_cache_usage
    engine.abort("a1")
    assert 0.0 < engine.stats().kv_cache_usage < usage
    engine.abort("a2")  # still waiting
    engine.step()
    engine.abort("a0")  # with its sibling admitted by now
    engine.abort("a0")  # twice is harmless
    assert not engine.has_unfinished() and engine.stats().kv_cache_usage == 0.0
    assert engine.step() == []


def test_kv_memory_utilisation_under_mixed_lengths(tiny):
    """PagedAttention's claim: only the last block of a sequence wastes slots, so >= 95 % of the
    slots held store a token (a contiguous max_model_len reservation per sequence wastes most)."""
    folder, _ = tiny
    engine = tiny_engine(folder, block_size=16, max_num_batched_tokens=512, kv_cache_memory=2**24)
    rng = random.Random(14)
    for i, prompt in enumerate(random_prompts(24, 100, 400, seed=14)):
        engine.add_request(f"u{i}", prompt, SamplingParams(max_tokens=rng.randint(10, 60), **GREEDY))
    num_stored = num_slots = num_seq_steps = 0
    while engine.has_unfinished():
        engine.step()
        decoding = [s for s in all_seqs(engine) if s.status.name == "RUNNING" and s.num_computed_tokens == len(s) - 1]
        num_stored += sum(s.num_computed_tokens for s in decoding)
        num_slots += sum(len(s.block_table) * 16 for s in decoding)
        num_seq_steps += len(decoding)
    utilisation = num_stored / num_slots
    contiguous = num_stored / (num_seq_steps * engine.model_runner.max_model_len)
    print(f"KV utilisation while decoding: {utilisation:.1%} of held slots store a token "
          f"(a contiguous max_model_len reservation per sequence: {contiguous:.1%})")
    assert utilisation >= 0.95
    assert engine.stats().kv_cache_usage == 0.0 and engine.stats().num_preemptions == 0


def test_bad_input_is_refused(tiny):
    folder, _ = tiny
    engine = tiny_engine(folder, max_model_len=64)
    with pytest.raises(ContextLengthError, match="64 tokens, but max_model_len is 64"):
        engine.add_request("long", [1] * 64, SamplingParams())
    with pytest.raises(ValueError, match=r"prompt token ids must be ints in \[0, 97\)"):
        engine.add_request("oov", [1, 97], SamplingParams())
    with pytest.raises(ValueError, match="prompt must not be empty"):
        engine.add_request("empty", "", SamplingParams())
    engine.add_request("dup", [1, 2], SamplingParams())
    with pytest.raises(ValueError, match="request_id 'dup' is already running"):
        engine.add_request("dup", [1, 2], SamplingParams())
    engine.abort("dup")
    assert not engine.has_unfinished()
    needed = 16 * tiny_block_bytes(16)  # 256 tokens = 16 blocks of 16
    with pytest.raises(ValueError, match=f"max_model_len=256 tokens needs 16 blocks = {needed} bytes"):
        tiny_engine(folder, max_model_len=256, kv_cache_memory=needed - 1)
    with pytest.raises(ValueError, match="max_num_seqs must be >= 1, got 0"):
        EngineConfig(str(folder), max_num_seqs=0)
    with pytest.raises(ValueError, match="max_model_len 1024 exceeds the model's context length 512"):
        tiny_engine(folder, max_model_len=1024)


@pytest.mark.parametrize("field, value", [("top_p", 0.0), ("temperature", -1.0), ("n", 0)])
def test_invalid_sampling_params_name_the_field(field, value):
    with pytest.raises(ValueError, match=f"^{field} "):
        SamplingParams(**{field: value})


@pytest.fixture(scope="module")
def smol():
    """SmolLM2-135M in fp32, one engine for all real-model tests; each leaves it empty."""
    return LLMEngine(EngineConfig("smollm2-135m", max_model_len=256, kv_cache_memory=64 * 2**20,
                                  max_num_batched_tokens=16, max_num_seqs=16))


@pytest.mark.real_model
def test_smollm2_greedy_matches_transformers(smol):
    # transformers' Llama holding the weights our loader reads (test_real_model checks those against
    # transformers' own GGUF loader); so a mismatch here is the engine's, not the loader's. The
    # engine's own model is fused and prepacked, so the weights come from a fresh load.
    args = smol.model_runner.model.args
    with no_init_weights():
        hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            hidden_size=args.hidden_size, intermediate_size=args.intermediate_size,
            num_hidden_layers=args.num_hidden_layers, num_attention_heads=args.num_attention_heads,
            num_key_value_heads=args.num_key_value_heads, vocab_size=args.vocab_size, rms_norm_eps=args.rms_norm_eps,
            rope_theta=args.rope_theta, max_position_embeddings=args.max_position_embeddings,
            tie_word_embeddings=args.tie_word_embeddings)).eval()
    hf.load_state_dict(load_model("smollm2-135m").state_dict())
    words = "The printing press began in Mainz when a goldsmith combined movable metal type with an oil ink".split()
    prompts = [" ".join(words[:n]) for n in range(1, 17)]
    requests = [(f"r{i}", p, SamplingParams(max_tokens=4, **GREEDY)) for i, p in enumerate(prompts)]
    outputs, num_mixed = run_staggered(smol, requests, arrival_steps=[i // 4 for i in range(16)])
    assert num_mixed > 0
    for i, prompt in enumerate(prompts):
        # Teacher-forced: transformers' greedy choice after prompt + our first k tokens is our token k,
        # for every k, iff its greedy generate() would return our tokens; one forward instead of four.
        prompt_ids, got = smol.tokenizer.encode(prompt), outputs[f"r{i}"].outputs[0].token_ids
        with torch.no_grad():
            logits = hf(torch.tensor([prompt_ids + got[:-1]])).logits[0, len(prompt_ids) - 1:]
        assert logits.argmax(-1).tolist() == got, prompt


@pytest.mark.real_model
def test_smollm2_eos_ignore_eos_and_min_tokens(smol):
    prompt = smol.tokenizer.apply_chat_template([{"role": "user", "content": "Is the sky blue? Answer yes or no."}])
    requests = [("plain", prompt, SamplingParams(temperature=0.0, max_tokens=8)),
                ("ignore_eos", prompt, SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True)),
                ("min_tokens", prompt, SamplingParams(temperature=0.0, max_tokens=6, min_tokens=5))]
    outputs, _ = run_staggered(smol, requests, [0, 0, 0])
    plain = outputs["plain"].outputs[0]
    eos = plain.token_ids[-1]
    assert plain.finish_reason == "stop" and eos in smol.tokenizer.eos_token_ids and len(plain.token_ids) < 5
    assert plain.text == smol.tokenizer.decode(plain.token_ids) and "<|im_end|>" not in plain.text
    ignored = outputs["ignore_eos"].outputs[0]
    assert ignored.finish_reason == "length" and ignored.token_ids[:len(plain.token_ids)] == plain.token_ids
    at_least = outputs["min_tokens"].outputs[0]
    assert len(at_least.token_ids) >= 5 and eos not in at_least.token_ids[:5]
    assert at_least.token_ids[:len(plain.token_ids) - 1] == plain.token_ids[:-1]


def test_out_of_range_stop_token_ids_are_refused(tiny):
    """An id past the vocabulary used to reach the sampler and fail the step for every request in it."""
    folder, _ = tiny
    engine = tiny_engine(folder)
    with pytest.raises(ValueError, match="stop_token_ids"):
        engine.add_request("r", [1, 2, 3], SamplingParams(stop_token_ids=[NUM_CHARS + 5]))
    assert not engine.has_unfinished()
