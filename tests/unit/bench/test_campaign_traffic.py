"""The campaign's traffic sampler: uniform by default, Zipf-skewed over intents on request."""

import collections
import random
from dataclasses import dataclass

import pytest

from routenlp.bench.campaign import sample_traffic


@dataclass(frozen=True)
class Ex:
    text: str
    label: str


POOL = [Ex(f"{lab}-{i}", lab) for lab in "abcdefghij" for i in range(400)]


def test_uniform_is_a_plain_sample():
    a = sample_traffic(POOL, 200, random.Random(3), 0.0, list("abcdefghij"))
    assert a == random.Random(3).sample(POOL, 200)


@pytest.mark.parametrize("skew", [1.0, 2.0])
def test_skewed_traffic_follows_the_ranking_and_has_no_repeats(skew):
    ranking = list("jihgfedcba")
    out = sample_traffic(POOL, 300, random.Random(0), skew, ranking)
    assert len(out) == 300 and len(set(out)) == 300
    counts = collections.Counter(e.label for e in out)
    # the most popular intent gets far more than the uniform 30, the least popular far fewer
    top3 = sum(counts[c] for c in "jih")
    bottom5 = sum(counts.get(c, 0) for c in "edcba")
    assert counts["j"] > 60 and top3 > 2 * bottom5
    share_top = counts["j"] / 300
    expected = 1 / sum(1 / (r + 1) ** skew for r in range(10))
    assert share_top == pytest.approx(expected, abs=0.1)


def test_skewed_sampler_stops_at_the_pool_size():
    out = sample_traffic(POOL[:150], 500, random.Random(0), 1.0, list("abcdefghij"))
    assert len(out) == 150 and len(set(out)) == 150
