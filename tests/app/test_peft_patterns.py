"""PEFT's rank_pattern / alpha_pattern rule, written once (`app.checks.peft_patterns`), against PEFT itself:
its `get_pattern_key`, and the ranks and alphas of the LoRA layers it creates for real adapters."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer
from peft.utils.other import get_pattern_key
from safetensors import safe_open

from app.checks.adapter import parse_config, validate_adapter
from app.checks.peft_patterns import PatternError, PeftPattern
from app.errors import InvalidAdapter
from app.schemas.merge import MergeOutput
from tests.factories import tiny_llama

LIMITS = dict(max_header_bytes=1 << 20, max_tensors=1000)
NAMES = [f"model.layers.{i}.self_attn.{leaf}" for i in range(12) for leaf in ("q_proj", "v_proj")] + [
    "model.layers.3.mlp.down_proj",
    "lm_head",
]
# (a) a regular expression, (b) a plain leaf name, (c) an exact full module name, and an order case where
# two keys match one module (PEFT takes the first; the keys are in sorted order, as save_pretrained writes them)
PATTERNS = {
    "regex": ({r"layers\.[1-9]\.self_attn\.q_proj": 2}, {r"layers\.1\.self_attn\.(q|v)_proj": 3}),
    "suffix": ({"q_proj": 2}, {"v_proj": 16}),
    "exact": ({"model.layers.0.self_attn.v_proj": 2}, {"model.layers.0.self_attn.v_proj": 4}),
    "first_key_wins": ({r"layers\.1\.self_attn\.q_proj": 6, "q_proj": 2}, {"q_proj": 32, "self_attn.q_proj": 2}),
}


def peft_value(pattern: dict, name: str, default):
    """What `LoraModel._create_and_replace` does with a pattern."""
    return pattern.get(get_pattern_key(pattern.keys(), name), default)


@pytest.mark.parametrize(
    "pattern",
    [*(p for pair in PATTERNS.values() for p in pair), {r"layers\.1[01]?\..*": 5, "mlp.down_proj": 7}, {}],
)
def test_rule_is_peft_get_pattern_key(pattern):
    compiled = PeftPattern.compile(pattern)
    for name in NAMES:
        assert compiled.value(name, -1) == peft_value(pattern, name, -1), name


@pytest.mark.parametrize("key", ["q_proj[", "(q_proj", "*q", "q_proj)"])
def test_invalid_regex_key_is_refused_naming_it(key):
    with pytest.raises(PatternError, match=rf"rank_pattern key '{re.escape(key)}' is not a valid"):
        PeftPattern.compile({"v_proj": 2, key: 3}, "rank_pattern")


def save_peft_adapter(directory: Path, rank_pattern: dict, alpha_pattern: dict) -> dict[str, tuple[int, float]]:
    """Save a real PEFT adapter for the tiny Llama; returns each LoRA layer's (r, lora_alpha) as PEFT made it."""
    model = tiny_llama(0)
    torch.manual_seed(1)
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj"],
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
        init_lora_weights=False,
    )
    peft_model = get_peft_model(model, config)
    peft_model.save_pretrained(directory)
    return {
        name.removeprefix("base_model.model."): (module.r["default"], module.lora_alpha["default"])
        for name, module in peft_model.named_modules()
        if isinstance(module, LoraLayer)
    }


@pytest.mark.parametrize("case", sorted(PATTERNS))
def test_ranks_and_alphas_of_real_adapters_are_the_ones_peft_created(tmp_path, case):
    rank_pattern, alpha_pattern = PATTERNS[case]
    created = save_peft_adapter(tmp_path, rank_pattern, alpha_pattern)
    config = parse_config((tmp_path / "adapter_config.json").read_bytes(), 1 << 16)
    ranks, alphas = PeftPattern.compile(config["rank_pattern"]), PeftPattern.compile(config["alpha_pattern"])
    with safe_open(str(tmp_path / "adapter_model.safetensors"), framework="np") as weights:
        stored = {
            key.removeprefix("base_model.model.").removesuffix(".lora_A.weight"): weights.get_slice(key).get_shape()[0]
            for key in weights.keys()
            if key.endswith("lora_A.weight")
        }
    assert set(stored) == set(created) and len(created) == 4
    assert len({r for r, _ in created.values()}) >= 2, "the case must give different ranks"
    for name, (rank, alpha) in created.items():
        assert ranks.value(name, config["r"]) == rank == stored[name], name
        assert alphas.value(name, config["lora_alpha"]) == alpha, name
    summary = validate_adapter(config, tmp_path / "adapter_model.safetensors", **LIMITS)
    assert summary.rank == 4 and summary.n_modules == 4


def test_regex_keyed_adapter_was_refused_by_a_suffix_rule_and_is_accepted_now(tmp_path):
    """The bug: the upload check read `layers\\.[1-9]\\.self_attn\\.q_proj` as a literal suffix (rank 4 for
    layer 1's q_proj) while PEFT and the worker gave it rank 2, so a valid adapter was refused."""
    save_peft_adapter(tmp_path, *PATTERNS["regex"])
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    validate_adapter(config, tmp_path / "adapter_model.safetensors", **LIMITS)
    # and a config that disagrees with the weights is still refused, naming the module
    config["rank_pattern"] = {r"layers\.[0-9]\.self_attn\.v_proj": 2}
    with pytest.raises(InvalidAdapter, match="layers.0.self_attn.q_proj.*rank 4|layers.0.self_attn.v_proj.*rank 2"):
        validate_adapter(config, tmp_path / "adapter_model.safetensors", **LIMITS)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"rank_pattern": {"q_proj[": 2}}, r"rank_pattern key 'q_proj\[' is not a valid regular expression"),
        ({"alpha_pattern": {"(v_proj": 2}}, r"alpha_pattern key '\(v_proj' is not a valid regular expression"),
        ({"rank_pattern": {"q_proj": "two"}}, r"rank_pattern\['q_proj'\] must be a number"),
        ({"rank_pattern": {"q_proj": 0}}, r"rank_pattern\['q_proj'\] must be an integer"),
        ({"alpha_pattern": {"q_proj": -1}}, r"alpha_pattern\['q_proj'\] must be a positive number"),
        ({"rank_pattern": ["q_proj"]}, "rank_pattern must be an object"),
    ],
)
def test_bad_patterns_are_refused_at_upload(tmp_path, change, message):
    save_peft_adapter(tmp_path, {}, {})
    config = json.loads((tmp_path / "adapter_config.json").read_text()) | change
    with pytest.raises(InvalidAdapter, match=message):
        parse_config(json.dumps(config).encode(), 1 << 16)
    with pytest.raises(InvalidAdapter, match=message):  # a job's output is checked by the same rule
        validate_adapter(config, tmp_path / "adapter_model.safetensors", **LIMITS)


def test_merge_output_rank_pattern_is_checked_at_the_door():
    assert MergeOutput(rank_pattern={r"layers\.[0-3]\.self_attn\.q_proj": 2}).rank_pattern
    with pytest.raises(ValueError, match=r"rank_pattern key 'q_proj\[' is not a valid regular expression"):
        MergeOutput(rank_pattern={"q_proj[": 2})


def test_upload_through_the_api(tmp_path, redis_url, redis_client, moto_s3):
    from fastapi.testclient import TestClient

    from app.main import create_app
    from app.settings import Settings
    from tests.conftest import tenant_keys

    key, _, api_keys = tenant_keys()
    settings = Settings(environment="test", redis_url=redis_url, s3_bucket="unit", api_keys=api_keys)
    good, bad, ordered = tmp_path / "good", tmp_path / "bad", tmp_path / "ordered"
    save_peft_adapter(good, *PATTERNS["regex"])
    save_peft_adapter(bad, {}, {})
    config = json.loads((bad / "adapter_config.json").read_text()) | {"rank_pattern": {"q_proj[": 2}}
    (bad / "adapter_config.json").write_text(json.dumps(config))
    # a hand-written config whose pattern keys are not in sorted order: the first key applies (rank 2 for
    # every q_proj), so the stored config must keep that order for the worker (and PEFT) to read rank 2
    precedence = {"q_proj": 2, r"layers\.1\.self_attn\.q_proj": 6}
    assert save_peft_adapter(ordered, precedence, {})["model.layers.1.self_attn.q_proj"][0] == 2
    config = json.loads((ordered / "adapter_config.json").read_text()) | {"rank_pattern": precedence}
    (ordered / "adapter_config.json").write_text(json.dumps(config))

    def upload(client: TestClient, directory: Path):
        files = {
            "config": ("adapter_config.json", (directory / "adapter_config.json").read_bytes()),
            "weights": ("adapter_model.safetensors", (directory / "adapter_model.safetensors").read_bytes()),
        }
        return client.post("/v1/adapters", files=files, data={"name": directory.name})

    with TestClient(create_app(settings)) as client:
        client.headers["Authorization"] = f"Bearer {key}"
        response = upload(client, good)
        assert response.status_code == 201, response.text
        body = response.json()
        assert body["rank"] == 4 and body["n_modules"] == 4 and body["target_modules"] == ["q_proj", "v_proj"]
        stored = client.get(f"/v1/adapters/{body['id']}/files/adapter_config.json").json()
        assert stored["rank_pattern"] == PATTERNS["regex"][0]
        response = upload(client, bad)
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["code"] == "invalid_adapter" and "'q_proj['" in error["message"]
        assert [item["id"] for item in client.get("/v1/adapters").json()["items"]] == [body["id"]]
        response = upload(client, ordered)
        assert response.status_code == 201, response.text
        stored = client.get(f"/v1/adapters/{response.json()['id']}/files/adapter_config.json").json()
        assert list(stored["rank_pattern"].items()) == list(precedence.items())
        assert list(stored) == sorted(stored)  # the rest stays sorted, as before
