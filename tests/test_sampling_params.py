import re

import pytest

from slimserve.engine.sampling_params import SamplingParams


@pytest.mark.parametrize("field, value", [
    ("n", 0),
    ("temperature", -0.1),
    ("top_p", 0.0),
    ("top_p", 1.5),
    ("top_k", -2),
    ("min_p", -0.1),
    ("min_p", 1.1),
    ("repetition_penalty", 0.0),
    ("presence_penalty", 2.5),
    ("presence_penalty", -2.5),
    ("frequency_penalty", 2.1),
    ("frequency_penalty", -3.0),
    ("max_tokens", 0),
    ("min_tokens", -1),
    ("stop", [""]),
    ("stop_token_ids", [-1]),
    ("logprobs", -1),
    ("prompt_logprobs", -1),
])
def test_invalid_field_raises_naming_field_and_value(field, value):
    with pytest.raises(ValueError, match=rf"^{field} .*got {re.escape(repr(value))}$"):
        SamplingParams(**{field: value})


def test_min_tokens_above_max_tokens_is_rejected():
    with pytest.raises(ValueError, match=r"min_tokens must be <= max_tokens \(4\), got 5"):
        SamplingParams(max_tokens=4, min_tokens=5)
    assert SamplingParams(max_tokens=None, min_tokens=5).min_tokens == 5


@pytest.mark.parametrize("kwargs", [
    dict(temperature=0.0), dict(top_p=1.0), dict(top_p=1e-3), dict(top_k=0), dict(top_k=-1), dict(top_k=50),
    dict(min_p=0.0), dict(min_p=1.0), dict(repetition_penalty=1.3), dict(presence_penalty=-2.0),
    dict(frequency_penalty=2.0), dict(max_tokens=None), dict(logprobs=0), dict(prompt_logprobs=5), dict(seed=7),
])
def test_valid_values_are_accepted(kwargs):
    params = SamplingParams(**kwargs)
    for name, value in kwargs.items():
        assert getattr(params, name) == value


def test_stop_string_is_normalised_to_list_and_defaults_are_fresh():
    assert SamplingParams(stop="###").stop == ["###"]
    assert SamplingParams(stop=("a", "b")).stop == ["a", "b"]
    first, second = SamplingParams(), SamplingParams()
    first.stop_token_ids.append(3)
    assert second.stop_token_ids == []


def test_greedy_means_temperature_zero():
    assert SamplingParams(temperature=0.0).is_greedy
    assert not SamplingParams(temperature=1e-4).is_greedy
