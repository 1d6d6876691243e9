"""PrecisionMap: round trip, apply/from_model, every problem reported at once, fuzzed JSON."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fxquant.errors import FxquantError, PrecisionMapError
from fxquant.fixed_point import FixedPoint
from fxquant.passes import InsertQuantizers, capture
from fxquant.precision_map import PrecisionMap
from fxquant.quantizers import quantizers


def quantized(model):
    gm = capture(model)
    InsertQuantizers(FixedPoint(8, 4), FixedPoint(6, 3), grad_bits=8)(gm)
    return gm


def test_round_trip_through_json(tmp_path, cnn):
    gm = quantized(cnn)
    quantizers(gm)[("conv2", "weight")].set_format(FixedPoint(3, 9))
    pmap = PrecisionMap.from_model(gm)
    path = tmp_path / "precision_map.json"
    pmap.save(path)
    raw = json.loads(path.read_text())
    assert raw["format"] == "fxquant.precision_map" and raw["schema_version"] == 1
    assert raw["layers"]["conv2"] == {"kind": "conv2d", "weight": {"bits": 3, "frac_bits": 9},
                                      "act": {"bits": 6, "frac_bits": 3}, "grad": {"bits": 8, "frac_bits": None}}
    loaded = PrecisionMap.load(path)
    other = quantized(type(cnn)())
    loaded.apply(other)
    assert {k: q.fmt for k, q in quantizers(other).items()} == {k: q.fmt for k, q in quantizers(gm).items()}


def test_all_problems_listed_in_one_error(tmp_path, cnn):
    data = PrecisionMap.from_model(quantized(cnn)).to_json_dict()
    data["schema_version"] = 99
    data["layers"]["conv1"]["weight"]["bits"] = 40
    data["layers"]["fc"]["act"]["frac_bits"] = "x"
    with pytest.raises(PrecisionMapError) as err:
        PrecisionMap.from_json_dict(data)
    msg = err.value.message
    assert "3 problem(s)" in msg and "schema_version" in msg and "conv1" in msg and "fc" in msg


def test_mismatched_model_lists_layers(cnn, mlp):
    pmap = PrecisionMap.from_model(quantized(cnn))
    with pytest.raises(PrecisionMapError) as err:
        pmap.apply(quantized(mlp))
    assert "unknown layer 'conv1'" in err.value.message and "'fc1'" in err.value.message


def test_fingerprint_detects_other_shapes(mlp):
    import torch.nn as nn

    pmap = PrecisionMap.from_model(quantized(mlp))
    other = type(mlp)()
    other.fc1 = nn.Linear(16, 32 + 0)
    other.fc2 = nn.Linear(32, 11)
    with pytest.raises(PrecisionMapError, match="fingerprint"):
        pmap.apply(quantized(other))


json_values = st.recursive(st.none() | st.booleans() | st.integers(-100, 100) | st.text(max_size=5),
                           lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=3),
                           max_leaves=12)


@given(st.dictionaries(st.sampled_from(["format", "schema_version", "model", "layers", "history", "x"]),
                       json_values, max_size=5))
def test_fuzzed_json_never_crashes_with_anything_but_fxquant_errors(data):
    try:
        PrecisionMap.from_json_dict(data)
    except FxquantError:
        pass


@given(st.dictionaries(st.text(max_size=8), json_values, min_size=1, max_size=4))
def test_fuzzed_layers(layers):
    data = {"format": "fxquant.precision_map", "schema_version": 1, "model": {}, "layers": layers}
    try:
        PrecisionMap.from_json_dict(data)
    except FxquantError:
        pass
