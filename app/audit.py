"""Signed audit records of unlearning jobs: canonical JSON and an HMAC-SHA256 over it.

The canonical form is the record without its `signature`, serialised with sorted keys, no whitespace,
UTF-8 and no NaN/Infinity (which JSON cannot carry faithfully), so any reader can recompute the same bytes.
The signature is `{"alg": "HMAC-SHA256", "value": <hex>}` keyed with `AMEND_AUDIT_HMAC_KEY`; `verify`
compares in constant time and reports any change to any field (or to the signature) as invalid.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
from typing import Any

ALGORITHM = "HMAC-SHA256"


def _finite(value: Any) -> Any:
    """Replace non-finite floats by None: canonical JSON has no NaN or Infinity."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def canonical_json(value: Any) -> bytes:
    """Deterministic bytes: sorted keys, compact separators, UTF-8, no NaN/Infinity."""
    return json.dumps(
        _finite(value), sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode()


def _digest(record: dict[str, Any], key: bytes) -> str:
    unsigned = {k: v for k, v in record.items() if k != "signature"}
    return hmac.new(key, canonical_json(unsigned), hashlib.sha256).hexdigest()


def sign(record: dict[str, Any], key: str | bytes) -> dict[str, Any]:
    """The record (made JSON-canonical) with a `signature` over everything else in it."""
    key_bytes = key.encode() if isinstance(key, str) else key
    clean = json.loads(canonical_json({k: v for k, v in record.items() if k != "signature"}))
    clean["signature"] = {"alg": ALGORITHM, "value": _digest(clean, key_bytes)}
    return clean


def verify(record: dict[str, Any], key: str | bytes) -> bool:
    """True when the record's signature is an HMAC of the rest of the record under `key`."""
    signature = record.get("signature")
    if not isinstance(signature, dict) or signature.get("alg") != ALGORITHM:
        return False
    value = signature.get("value")
    if not isinstance(value, str):
        return False
    key_bytes = key.encode() if isinstance(key, str) else key
    try:
        expected = _digest(record, key_bytes)
    except (TypeError, ValueError):
        return False
    return hmac.compare_digest(expected, value)
