"""PrecisionMap: round trip, apply/from_model, every problem reported at once, fuzzed JSON."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fxquant.errors import PrecisionMapError
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


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _fmt_problems(raw, dynamic_ok: bool) -> tuple[int, tuple | None]:
    """(number of problems, (bits, frac_bits) or None) of one format, from the schema in docs/precision_map.md."""
    if raw is None:
        return 0, None
    if not isinstance(raw, dict) or "bits" not in raw:
        return 1, None
    n = 1 if set(raw) - {"bits", "frac_bits"} else 0
    bits, fl = raw["bits"], raw.get("frac_bits")
    if not _is_int(bits) or not (2 <= bits <= 16 or bits == 32):
        return n + 1, None
    if fl is not None and (not _is_int(fl) or abs(fl) > 64):
        return n + 1, None
    if fl is None and not dynamic_ok and bits != 32:
        return n + 1, None
    return n, (bits, fl if fl is not None or dynamic_ok else 0)


def expected_outcome(data) -> tuple[int, dict | None]:
    """(problem count, {layer: (weight, act, grad)} when accepted): an oracle written from the schema."""
    n = 0
    if data.get("format") != "fxquant.precision_map":
        n += 1
    if not _is_int(data.get("schema_version")) or data.get("schema_version") != 1:
        n += 1
    model = data.get("model", {})
    if not isinstance(model, dict):
        n += 1
    else:
        n += sum(1 for k in ("name", "fingerprint") if k in model and not isinstance(model[k], str))
    layers = data.get("layers")
    parsed = {}
    if not isinstance(layers, dict) or not layers:
        n += 1
        layers = {}
    for name, entry in layers.items():
        if not isinstance(entry, dict):
            n += 1
            continue
        m = 1 if set(entry) - {"kind", "weight", "act", "grad"} else 0
        m += 1 if "kind" in entry and not isinstance(entry["kind"], str) else 0
        mw, w = _fmt_problems(entry.get("weight"), False)
        ma, a = _fmt_problems(entry.get("act"), False)
        mg, g = _fmt_problems(entry.get("grad", {"bits": 32, "frac_bits": None}), True)
        m += mw + ma + mg
        if w is None and a is None and m == 0:
            m = 1  # neither weight nor act
        n += m
        if m == 0:
            parsed[name] = (w, a, g or (32, None))
    if not isinstance(data.get("history", []), list):
        n += 1
    return n, (parsed if n == 0 else None)


def assert_outcome(data) -> None:
    problems, layers = expected_outcome(data)
    if problems == 0:
        pmap = PrecisionMap.from_json_dict(data)
        got = {name: tuple(None if f is None else (f.bits, f.frac_bits) for f in (lp.weight, lp.act, lp.grad))
               for name, lp in pmap.layers.items()}
        assert got == layers
    else:
        with pytest.raises(PrecisionMapError) as err:
            PrecisionMap.from_json_dict(data)
        assert err.value.message.startswith(f"precision map: {problems} problem(s): "), err.value.message
        assert err.value.hint and "docs/precision_map.md" in err.value.hint


@given(st.dictionaries(st.sampled_from(["format", "schema_version", "model", "layers", "history", "x"]),
                       json_values, max_size=5))
def test_fuzzed_top_level_is_rejected_listing_every_problem(data):
    assert_outcome(data)
    # a fuzzed format is never the real one (texts are at most 5 characters): always rejected
    with pytest.raises(PrecisionMapError, match="format is"):
        PrecisionMap.from_json_dict(data)


formats = (st.none()
           | st.fixed_dictionaries({"bits": st.sampled_from([1, 2, 8, 16, 17, 32, True, "8", None])},
                                   optional={"frac_bits": st.integers(-70, 70) | st.none() | st.booleans()
                                             | st.just("x"), "extra": st.integers()})
           | json_values)
entries = st.fixed_dictionaries({}, optional={"kind": st.text(max_size=4) | st.integers(), "weight": formats,
                                              "act": formats, "grad": formats, "bogus": st.integers()}) | json_values


@given(st.dictionaries(st.text(max_size=8), entries, min_size=1, max_size=4))
def test_fuzzed_layers_accept_exactly_the_valid_maps(layers):
    assert_outcome({"format": "fxquant.precision_map", "schema_version": 1, "model": {}, "layers": layers})


def test_oracle_sees_both_outcomes():
    valid = {"format": "fxquant.precision_map", "schema_version": 1, "model": {"name": "m"},
             "layers": {"fc": {"kind": "linear", "weight": {"bits": 8, "frac_bits": 6}, "act": None,
                               "grad": {"bits": 8, "frac_bits": None}}}}
    assert expected_outcome(valid) == (0, {"fc": ((8, 6), None, (8, None))})
    assert_outcome(valid)
    for change, count in ((lambda d: d.update(schema_version=True), 1),
                          (lambda d: d["layers"]["fc"]["weight"].update(bit=8), 1),
                          (lambda d: d["layers"]["fc"].update(kind=3, act={"bits": 40}), 2)):
        data = json.loads(json.dumps(valid))
        change(data)
        assert expected_outcome(data)[0] == count
        assert_outcome(data)
