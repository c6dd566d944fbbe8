"""Audit records: canonical JSON, HMAC-SHA256 signing, and tampering detected."""

from __future__ import annotations

import copy
import json

import pytest

from app import audit

KEY = "test-audit-key"


def record() -> dict:
    return {
        "job_id": "jb_0123456789abcdef0123",
        "tenant": "tenant-a",
        "method": "grad_diff",
        "params": {"lr": 0.001, "steps": 5},
        "forget": {"dataset_id": "ds_0123456789abcdef0123", "row_ids": [0, 2], "row_sha256": ["aa", "bb"]},
        "metrics": {"before": {"forget_nll": 2.5}, "after": {"forget_nll": 4.0}},
        "versions": {"torch": "2.x", "amend": "0.1.0"},
    }


def test_sign_then_verify_and_survives_a_json_round_trip():
    signed = audit.sign(record(), KEY)
    assert signed["signature"]["alg"] == "HMAC-SHA256" and len(signed["signature"]["value"]) == 64
    assert audit.verify(signed, KEY)
    assert audit.verify(json.loads(json.dumps(signed, indent=3)), KEY)  # whitespace and key order do not matter


def test_canonical_json_is_order_independent_and_refuses_nothing_non_finite():
    assert audit.canonical_json({"b": 1, "a": [1.5, "é"]}) == '{"a":[1.5,"é"],"b":1}'.encode()
    assert audit.canonical_json({"x": float("nan")}) == b'{"x":null}'
    assert audit.canonical_json({"b": 1, "a": 2}) == audit.canonical_json({"a": 2, "b": 1})


@pytest.mark.parametrize(
    "tamper",
    [
        lambda r: r["forget"]["row_ids"].append(3),
        lambda r: r["metrics"]["after"].__setitem__("forget_nll", 9.0),
        lambda r: r.__setitem__("tenant", "tenant-b"),
        lambda r: r.pop("versions"),
        lambda r: r.__setitem__("extra", True),
        lambda r: r["signature"].__setitem__("value", "0" * 64),
        lambda r: r.pop("signature"),
        lambda r: r["signature"].__setitem__("alg", "none"),
    ],
)
def test_tampering_is_detected(tamper):
    signed = audit.sign(record(), KEY)
    changed = copy.deepcopy(signed)
    tamper(changed)
    assert not audit.verify(changed, KEY)


def test_another_key_does_not_verify():
    assert not audit.verify(audit.sign(record(), KEY), "another-key")
