"""The cost-weighted start rule as the API states it: tasks[].costWeight, and tier prices relative to the reference."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from routenlp.api.modeltier import TierCost, relative_costs
from routenlp.api.routingpolicy import Task


def test_cost_weight_is_optional_bounded_and_read_from_camel_case():
    assert Task.model_validate({"name": "qa"}).cost_weight is None
    assert Task.model_validate({"name": "qa", "costWeight": 0.2}).cost_weight == 0.2
    for bad in (-0.1, 101):
        with pytest.raises(ValidationError):
            Task.model_validate({"name": "qa", "costWeight": bad})


def test_relative_costs_blend_three_input_tokens_per_output_token():
    cheap, mid, ref = TierCost(input_per_million=0.1, output_per_million=0.3), \
        TierCost(input_per_million=1.0, output_per_million=1.0), TierCost(input_per_million=2.0, output_per_million=6.0)
    # blended: 0.15, 1.0, 3.0 per million tokens
    assert relative_costs([cheap, mid, ref]) == pytest.approx([0.05, 1 / 3, 1.0])
    free = TierCost(input_per_million=0, output_per_million=0)
    assert relative_costs([free, cheap, free]) == [0.0, 1.0, 0.0]  # a free reference: paid tiers count as 1
    assert relative_costs([]) == []
