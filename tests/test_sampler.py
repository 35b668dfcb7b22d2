import pytest
import torch

from slimserve.engine.sampler import apply_penalties, prompt_logprobs, sample, sampling_probs
from slimserve.engine.sampling_params import SamplingParams


def run_sample(logits, params, output_token_ids=None, prompt_token_ids=None, generators=None, eos_token_ids=()):
    S = logits.shape[0]
    return sample(logits, params, output_token_ids or [[] for _ in range(S)], prompt_token_ids or [[1] for _ in range(S)],
                  generators or [None] * S, eos_token_ids)


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_greedy_is_argmax_whatever_the_other_knobs():
    logits = torch.randn(6, 50, generator=seeded(0))
    params = [SamplingParams(temperature=0.0, top_k=3, top_p=0.5, min_p=0.2)] * 6
    assert run_sample(logits, params).token_ids == logits.argmax(dim=-1).tolist()


def test_greedy_rows_stay_argmax_inside_a_random_batch():
    logits = torch.randn(4, 50, generator=seeded(1))
    params = [SamplingParams(temperature=0.0), SamplingParams(), SamplingParams(temperature=0.0), SamplingParams(top_k=1)]
    token_ids = run_sample(logits, params).token_ids
    argmax = logits.argmax(dim=-1).tolist()
    assert [token_ids[0], token_ids[2], token_ids[3]] == [argmax[0], argmax[2], argmax[3]]


def allowed_tokens(probs: torch.Tensor, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0) -> set[int]:
    """Reference, one token at a time: min-p, then top-k, then top-p over the renormalised rest."""
    order = sorted(range(len(probs)), key=lambda t: -probs[t].item())
    kept = [t for t in order if probs[t] >= min_p * probs[order[0]]]
    if top_k > 0:
        kept = kept[:top_k]
    total = sum(probs[t].item() for t in kept)
    result, mass = [], 0.0
    for t in kept:
        if mass >= top_p * total and top_p < 1.0:
            break
        result.append(t)
        mass += probs[t].item()
    return set(result)


@pytest.mark.parametrize("knobs", [
    dict(top_k=3), dict(top_p=0.6), dict(min_p=0.3), dict(top_k=5, top_p=0.7), dict(top_k=4, min_p=0.4, top_p=0.9),
])
def test_truncation_only_ever_picks_allowed_tokens_and_reaches_all_of_them(knobs):
    torch.manual_seed(0)
    row = torch.tensor([2.0, 1.6, 1.5, 1.2, 1.0, 0.9, 0.5, 0.0, -1.0, -3.0])
    allowed = allowed_tokens(row.softmax(dim=-1), **knobs)
    assert 1 < len(allowed) < len(row)
    logits = row.repeat(3000, 1)
    token_ids = run_sample(logits, [SamplingParams(**knobs)] * 3000).token_ids
    assert set(token_ids) == allowed


def test_seeded_sampling_is_batch_invariant():
    vocab = 1000
    rows = torch.randn(8, 4, vocab, generator=seeded(2))  # 8 steps, 4 sequences
    ours = SamplingParams(seed=123, top_p=0.95, temperature=0.8)
    others = [SamplingParams(), SamplingParams(temperature=0.0), SamplingParams(seed=5, top_k=20)]

    alone_generator, batch_generator, other_generator = seeded(123), seeded(123), seeded(5)
    alone, batched = [], []
    for step in range(8):
        alone += run_sample(rows[step, :1], [ours], generators=[alone_generator]).token_ids
        batch = run_sample(rows[step, [1, 2, 0, 3]], [others[0], others[1], ours, others[2]],
                           generators=[None, None, batch_generator, other_generator])
        batched.append(batch.token_ids[2])
    assert alone == batched
    other_seed_generator = seeded(124)
    other_seed = [run_sample(rows[step, :1], [ours], generators=[other_seed_generator]).token_ids[0]
                  for step in range(8)]
    assert other_seed != alone


def test_penalties_follow_the_vllm_formulas():
    logits = torch.tensor([[2.0, -1.0, 0.5, -0.5, 3.0, 1.0], [1.0, 1.0, 1.0, 1.0, 1.0, 1.0]])
    params = [SamplingParams(repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25), SamplingParams()]
    output_token_ids = [[0, 0, 1, 5], [0, 1]]
    prompt_token_ids = [[2, 3], [2]]
    got = apply_penalties(logits, params, output_token_ids, prompt_token_ids)

    expected = logits.clone()
    for t in range(6):
        count = output_token_ids[0].count(t)
        if count or t in prompt_token_ids[0]:
            expected[0, t] = expected[0, t] / 2.0 if expected[0, t] > 0 else expected[0, t] * 2.0
        expected[0, t] -= 0.25 * count + 0.5 * (count > 0)
    torch.testing.assert_close(got, expected)
    assert expected[0, 4] == 3.0 and expected[0, 0] == 2.0 / 2 - 0.5 - 0.5  # untouched; seen twice


def test_min_tokens_blocks_eos_and_stop_token_ids():
    torch.manual_seed(0)
    logits = torch.full((4, 10), -5.0)
    logits[:, 0] = 10.0  # EOS
    logits[:, 7] = 9.0  # a stop token id
    params = [SamplingParams(min_tokens=3, stop_token_ids=[7]), SamplingParams(min_tokens=3, stop_token_ids=[7]),
              SamplingParams(min_tokens=3, ignore_eos=True, temperature=0.0), SamplingParams(min_tokens=1)]
    output_token_ids = [[4, 4], [4, 4, 4], [], [4]]
    token_ids = run_sample(logits, params, output_token_ids, eos_token_ids=[0]).token_ids
    assert token_ids[0] not in (0, 7)
    assert token_ids[2] == 0  # ignore_eos: EOS does not stop, so min_tokens leaves it alone
    blocked = apply_penalties(logits, params, output_token_ids, [[1]] * 4, eos_token_ids=[0])
    assert torch.isinf(blocked[0, [0, 7]]).all() and torch.isfinite(blocked[1:, [0, 7]]).all()


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    return (((counts - expected) ** 2) / expected).sum().item()


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_empirical_distribution_matches_softmax(temperature):
    torch.manual_seed(0)
    row = torch.tensor([1.0, 0.5, 0.0, -0.5, 0.2, 0.8])
    num_samples = 30_000
    token_ids = run_sample(row.repeat(num_samples, 1), [SamplingParams(temperature=temperature)] * num_samples).token_ids
    counts = torch.bincount(torch.tensor(token_ids), minlength=6).float()
    # 20.5 is the chi-square critical value for 5 degrees of freedom at p = 0.001.
    assert chi_square(counts, (row / temperature).softmax(dim=-1)) < 20.5
    # The same test has the power to reject a wrong temperature.
    assert chi_square(counts, (row / (temperature * 1.25)).softmax(dim=-1)) > 20.5


def test_sampling_probs_matches_temperature_softmax_without_truncation():
    logits = torch.randn(3, 30, generator=seeded(3))
    params = [SamplingParams(temperature=0.7), SamplingParams(), SamplingParams(temperature=0.0)]
    expected = torch.stack([(logits[0] / 0.7).softmax(-1), logits[1].softmax(-1), logits[2].softmax(-1)])
    torch.testing.assert_close(sampling_probs(logits, params), expected)


def test_logprobs_are_raw_and_hold_the_sampled_token_and_top_n():
    logits = torch.randn(3, 40, generator=seeded(4))
    params = [SamplingParams(logprobs=3, temperature=0.3, repetition_penalty=1.5), SamplingParams(),
              SamplingParams(logprobs=0, top_k=2)]
    out = run_sample(logits, params, output_token_ids=[[1, 2], [], []], generators=[seeded(0)] * 3)
    raw = logits.log_softmax(dim=-1)
    top3 = raw[0].topk(3).indices.tolist()
    assert set(out.logprobs[0]) == set(top3) | {out.token_ids[0]}
    for token_id, logprob in out.logprobs[0].items():
        assert logprob == pytest.approx(raw[0, token_id].item())
    assert out.logprobs[1] is None
    assert out.logprobs[2] == {out.token_ids[2]: pytest.approx(raw[2, out.token_ids[2]].item())}


def test_prompt_logprobs_score_each_next_prompt_token():
    logits = torch.randn(4, 20, generator=seeded(5))
    next_token_ids = [3, 7, 7, 19]
    entries = prompt_logprobs(logits, next_token_ids, num_logprobs=2)
    raw = logits.log_softmax(dim=-1)
    for t, (entry, token_id) in enumerate(zip(entries, next_token_ids)):
        assert entry[token_id] == pytest.approx(raw[t, token_id].item())
        assert set(entry) == set(raw[t].topk(2).indices.tolist()) | {token_id}
