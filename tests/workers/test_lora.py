"""PEFT adapter files <-> factors, and file-to-file merges loaded back with `PeftModel.from_pretrained`.

Tiny random-weight transformers models (Llama, GPT-2 with Conv1D / fan_in_fan_out), real PEFT adapters with
init_lora_weights=False (so B ≠ 0), saved with save_pretrained; nothing is mocked.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from workers.engines.merge.errors import MergeInputError
from workers.formats.lora import AdapterFormatError, adapter_shapes, merge_adapter_files, read_adapter_factors

LLAMA = LlamaConfig(
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=64,
    max_position_embeddings=32,
)
GPT2 = GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=64, n_positions=32)


def base(kind: str = "llama") -> torch.nn.Module:
    torch.manual_seed(0)
    model = LlamaForCausalLM(LLAMA) if kind == "llama" else GPT2LMHeadModel(GPT2)
    return model.eval()


def save_adapter(tmp: Path, name: str, seed: int, kind: str = "llama", **lora) -> Path:
    torch.manual_seed(seed)
    lora.setdefault("target_modules", ["q_proj", "v_proj"])
    model = get_peft_model(base(kind), LoraConfig(init_lora_weights=False, **lora))
    with torch.no_grad():  # make B large enough that the update matters
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    out = tmp / name
    model.save_pretrained(str(out))
    cfg = json.loads((out / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = f"tiny-{kind}"
    (out / "adapter_config.json").write_text(json.dumps(cfg))
    return out


def config(path: Path) -> dict:
    return json.loads((path / "adapter_config.json").read_text())


def inputs(*adapters: tuple[Path, float]) -> list[tuple[dict, Path, float]]:
    return [(config(p), p / "adapter_model.safetensors", w) for p, w in adapters]


def deltas(path: Path, kind: str = "llama") -> dict[str, torch.Tensor]:
    """ΔW per weight, as PEFT itself computes it (merge_and_unload minus the base), in the layer's layout."""
    plain = base(kind).state_dict()
    merged = PeftModel.from_pretrained(base(kind), str(path)).merge_and_unload().state_dict()
    return {k: (merged[k].double() - plain[k].double()) for k in plain if not torch.equal(merged[k], plain[k])}


def dense_model(parts: list[tuple[Path, float]], kind: str = "llama", lam: float = 1.0) -> torch.nn.Module:
    model = base(kind)
    state = model.state_dict()
    for path, weight in parts:
        for k, d in deltas(path, kind).items():
            state[k] = (state[k].double() + lam * weight * d).to(state[k].dtype)
    model.load_state_dict(state)
    return model


def logits(model: torch.nn.Module) -> torch.Tensor:
    ids = torch.arange(12).reshape(2, 6) % 64
    with torch.no_grad():
        return model(input_ids=ids).logits.double()


def loaded(out: Path, kind: str = "llama") -> torch.nn.Module:
    return PeftModel.from_pretrained(base(kind), str(out)).eval()


def test_read_factors_match_peft_deltas_with_alpha_rslora_and_patterns(tmp_path: Path) -> None:
    plain = save_adapter(tmp_path, "a", 1, r=4, lora_alpha=12)
    rs = save_adapter(tmp_path, "b", 2, r=4, lora_alpha=8, use_rslora=True)
    pat = save_adapter(
        tmp_path, "c", 3, r=4, lora_alpha=8, rank_pattern={"layers.0.self_attn.q_proj": 2}, alpha_pattern={"v_proj": 3}
    )
    for path in (plain, rs, pat):
        factors = read_adapter_factors(config(path), path / "adapter_model.safetensors", 0.5)
        reference = deltas(path)
        assert len(factors) == 4 == len(reference)
        for name, f in factors.items():
            d = f.lora_B.double() @ f.lora_A.double()
            assert torch.allclose(d, 0.5 * reference[f"{name}.weight"], atol=1e-5), (path.name, name)
    factors = read_adapter_factors(config(pat), pat / "adapter_model.safetensors", 1.0)
    assert factors["model.layers.0.self_attn.q_proj"].rank == 2
    assert factors["model.layers.1.self_attn.q_proj"].rank == 4


def test_end_to_end_llama_merge_loads_in_peft_and_matches_the_dense_merge(tmp_path: Path) -> None:
    a = save_adapter(tmp_path, "a", 1, r=4, lora_alpha=16)
    b = save_adapter(
        tmp_path,
        "b",
        2,
        r=8,
        lora_alpha=4,
        use_rslora=True,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    )
    reference = logits(dense_model([(a, 0.7), (b, -0.4)]))
    cases = [
        ("cat", {}, {}),
        ("task_arithmetic", {}, {"rank": 32}),
        ("merge_then_compress", {}, {"rank": 32}),
        ("ctm", {"rule": "task_arithmetic"}, {"rank": 32}),
    ]
    for method, params, output in cases:
        out = tmp_path / f"out-{method}"
        report = merge_adapter_files(inputs((a, 0.7), (b, -0.4)), method, params, output, out)
        assert report["summary"]["deviation_from_sum_total"] < 1e-4, method
        got = logits(loaded(out))
        assert torch.allclose(got, reference, atol=1e-4), method
        cfg = config(out)
        assert cfg["peft_type"] == "LORA" and cfg["lora_alpha"] == cfg["r"] and cfg["use_rslora"] is False
        assert set(cfg["target_modules"]) == {
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
        }
        assert json.loads((out / "merge_report.json").read_text())["method"] == method


def test_compressed_merge_writes_rank_pattern_that_peft_loads(tmp_path: Path) -> None:
    qkv = ["q_proj", "k_proj", "v_proj"]
    a = save_adapter(tmp_path, "a", 1, r=4, lora_alpha=8, target_modules=qkv)
    b = save_adapter(tmp_path, "b", 2, r=4, lora_alpha=8, target_modules=qkv)
    out = tmp_path / "out"
    params = {"rule": "ties", "density": 0.5}
    merge_adapter_files(inputs((a, 1.0), (b, 1.0)), "ctm", params, {"rank_pattern": {"v_proj": 2}}, out)
    cfg = config(out)
    assert cfg["r"] == 4 and set(cfg["rank_pattern"].values()) == {2}
    assert all(name.endswith("v_proj") for name in cfg["rank_pattern"])
    weights = load_file(str(out / "adapter_model.safetensors"))
    assert weights["base_model.model.model.layers.0.self_attn.v_proj.lora_A.weight"].shape[0] <= 2
    model = loaded(out)  # loads with the per-module ranks
    assert torch.isfinite(logits(model)).all()
    # the merged adapter reads back to the same factors (scaling 1)
    factors = read_adapter_factors(cfg, out / "adapter_model.safetensors", 1.0)
    assert factors["model.layers.1.self_attn.v_proj"].rank <= 2


def test_gpt2_conv1d_fan_in_fan_out(tmp_path: Path) -> None:
    kw = {"r": 4, "lora_alpha": 8, "target_modules": ["c_attn", "c_proj"], "fan_in_fan_out": True}
    a = save_adapter(tmp_path, "a", 1, kind="gpt2", **kw)
    b = save_adapter(tmp_path, "b", 2, kind="gpt2", **{**kw, "r": 2})
    reference = logits(dense_model([(a, 1.0), (b, 0.5)], kind="gpt2"))
    out = tmp_path / "out"
    merge_adapter_files(inputs((a, 1.0), (b, 0.5)), "task_arithmetic", {}, {"rank": 16}, out)
    assert config(out)["fan_in_fan_out"] is True
    assert torch.allclose(logits(loaded(out, "gpt2")), reference, atol=1e-4)


def _cast(path: Path, dtype: torch.dtype, dest: Path) -> Path:
    dest.mkdir()
    (dest / "adapter_config.json").write_text((path / "adapter_config.json").read_text())
    weights = {k: v.to(dtype) for k, v in load_file(str(path / "adapter_model.safetensors")).items()}
    save_file(weights, str(dest / "adapter_model.safetensors"))
    return dest


@pytest.mark.parametrize(
    ("dtypes", "expected"),
    [
        ((torch.bfloat16,) * 2, torch.bfloat16),
        ((torch.float16,) * 2, torch.float16),
        ((torch.bfloat16, torch.float16), torch.float32),
    ],
)
def test_half_precision_in_same_dtype_out(tmp_path: Path, dtypes, expected) -> None:
    a = _cast(save_adapter(tmp_path, "a", 1, r=4, lora_alpha=8), dtypes[0], tmp_path / "a16")
    b = _cast(save_adapter(tmp_path, "b", 2, r=4, lora_alpha=8), dtypes[1], tmp_path / "b16")
    out = tmp_path / "out"
    merge_adapter_files(inputs((a, 1.0), (b, 1.0)), "cat", {}, {}, out)
    weights = load_file(str(out / "adapter_model.safetensors"))
    assert {v.dtype for v in weights.values()} == {expected}
    assert adapter_shapes(out / "adapter_model.safetensors")


def test_refusals(tmp_path: Path) -> None:
    a = save_adapter(tmp_path, "a", 1, r=4, lora_alpha=8)
    weights = a / "adapter_model.safetensors"
    for change, message in (
        ({"use_dora": True}, "DoRA"),
        ({"lora_bias": True}, "lora_bias"),
        ({"peft_type": "IA3"}, "IA3"),
    ):
        with pytest.raises(AdapterFormatError, match=message):
            read_adapter_factors({**config(a), **change}, weights, 1.0)
    tensors = load_file(str(weights))

    def write(name: str, data: dict) -> Path:
        path = tmp_path / f"{name}.safetensors"
        save_file(data, str(path))
        return path

    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
    missing = write("missing", {k: v for k, v in tensors.items() if k != key})
    with pytest.raises(AdapterFormatError, match="layers.0.self_attn.q_proj.*no lora_B"):
        read_adapter_factors(config(a), missing, 1.0)
    emb = write("emb", {**tensors, "base_model.model.model.embed_tokens.lora_embedding_A": torch.zeros(4, 64)})
    with pytest.raises(AdapterFormatError, match="embedding.*embed_tokens"):
        read_adapter_factors(config(a), emb, 1.0)
    conv = write(
        "conv",
        {
            **tensors,
            "base_model.model.conv.lora_A.weight": torch.zeros(4, 3, 1, 1),
            "base_model.model.conv.lora_B.weight": torch.zeros(8, 4, 1, 1),
        },
    )
    with pytest.raises(AdapterFormatError, match="'conv'.*conv"):
        read_adapter_factors(config(a), conv, 1.0)
    with pytest.raises(AdapterFormatError, match="modules_to_save"):
        read_adapter_factors(
            config(a), write("head", {**tensors, "base_model.model.lm_head.weight": torch.zeros(2)}), 1.0
        )


def test_merge_refusals_before_compute(tmp_path: Path) -> None:
    a = save_adapter(tmp_path, "a", 1, r=4, lora_alpha=8)
    b = save_adapter(tmp_path, "b", 2, r=4, lora_alpha=8)
    other = copy.deepcopy(config(b))
    other["base_model_name_or_path"] = "another-model"
    pair = [(config(a), a / "adapter_model.safetensors", 1.0), (other, b / "adapter_model.safetensors", 1.0)]
    with pytest.raises(MergeInputError, match="different base models"):
        merge_adapter_files(pair, "cat", {}, {}, tmp_path / "x")
    merge_adapter_files(pair, "cat", {"allow_base_mismatch": True}, {}, tmp_path / "y")
    # a module whose base shape differs
    tensors = load_file(str(b / "adapter_model.safetensors"))
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    tensors[key] = torch.zeros(4, 40)
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad))
    with pytest.raises(MergeInputError, match="layers.0.self_attn.q_proj.*base shapes differ"):
        merge_adapter_files([pair[0], (config(b), bad, 1.0)], "cat", {}, {}, tmp_path / "z")
    with pytest.raises(MergeInputError, match="invalid"):
        merge_adapter_files(pair, "ties", {"density": 2.0}, {}, tmp_path / "w")
    # a NaN or Inf in any factor, float32 or half precision, is refused naming the module and the adapter
    for dtype, value in ((torch.float32, float("nan")), (torch.bfloat16, float("inf"))):
        tensors = {k: v.to(dtype) for k, v in load_file(str(b / "adapter_model.safetensors")).items()}
        tensors["base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"][3, 1] = value
        save_file(tensors, str(bad))
        with pytest.raises(MergeInputError, match=r"layers.1.self_attn.v_proj', adapter 1: .*NaN or Inf"):
            merge_adapter_files([pair[0], (config(b), bad, 1.0)], "ties", {}, {}, tmp_path / "v")
    assert not any((tmp_path / name).exists() for name in "zwv")


def test_every_method_streamed_from_files_equals_the_in_memory_merge(tmp_path: Path) -> None:
    """The file path streams modules through the engine's loader (shape-only planning, batches read on
    demand); every method, in both spaces, must give what the engine gives on factors held in memory."""
    from app.schemas.merge import MERGE_PARAMS, MergeOutput
    from workers.engines import registry
    from workers.engines.merge.engine import merge_modules

    registry.load_all()
    a = save_adapter(tmp_path, "a", 1, r=4, lora_alpha=8)
    b = save_adapter(tmp_path, "b", 2, r=2, lora_alpha=4, target_modules=["q_proj", "v_proj", "down_proj"])
    pairs = ((a, 0.8), (b, -0.5))
    in_memory: dict[str, list] = {}
    for t, (path, weight) in enumerate(pairs):
        for name, factors in read_adapter_factors(config(path), path / "adapter_model.safetensors", weight).items():
            in_memory.setdefault(name, [None] * len(pairs))[t] = factors
    cases = []
    for method, model in MERGE_PARAMS.items():
        if model.calibrated:  # rain reads a base model and calibration rows: tests/workers/engines/merge/test_rain.py
            continue
        fields = model.model_fields
        kw = {"density": 0.5} if "density" in fields else {}
        spaces = ("full", "core") if "space" in fields else (None,)
        cases += [(method, kw if space is None else {**kw, "space": space}) for space in spaces]
    for method, params in cases:
        out = tmp_path / f"out-{method}-{params.get('space', '')}"
        report = merge_adapter_files(inputs(*pairs), method, params, {"rank": 3}, out)
        expected = merge_modules(method, in_memory, MERGE_PARAMS[method].model_validate(params), MergeOutput(rank=3))
        weights = load_file(str(out / "adapter_model.safetensors"))
        assert len(weights) == 2 * len(expected.modules), (method, params)
        for name, merged in expected.modules.items():
            got = weights[f"base_model.model.{name}.lora_B.weight"] @ weights[f"base_model.model.{name}.lora_A.weight"]
            want = merged.lora_B @ merged.lora_A
            assert torch.allclose(got, want, atol=1e-5, rtol=1e-4), (method, params, name)
        assert report["summary"]["energy_kept_fraction_per_task"] == pytest.approx(
            expected.report["summary"]["energy_kept_fraction_per_task"], rel=1e-5, abs=1e-6
        ), (method, params)


def test_inputs_restricted_to_some_layers_give_an_adapter_on_exactly_those_modules(tmp_path: Path) -> None:
    a = save_adapter(tmp_path, "a", 1, r=4, lora_alpha=8, layers_to_transform=[0])
    b = save_adapter(tmp_path, "b", 2, r=2, lora_alpha=4, layers_to_transform=[0])
    reference = logits(dense_model([(a, 1.0), (b, 0.5)]))
    out = tmp_path / "out"
    merge_adapter_files(inputs((a, 1.0), (b, 0.5)), "task_arithmetic", {}, {"rank": 6}, out)
    assert config(out)["target_modules"] == ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"]
    model = loaded(out)
    wrapped = {name for name, _ in model.named_modules() if name.endswith("lora_A")}
    assert wrapped and all(".layers.0." in name for name in wrapped)
    assert torch.allclose(logits(model), reference, atol=1e-4)
    # inputs that wrap every layer of their targets keep the plain union of leaf names
    c = save_adapter(tmp_path, "c", 3, r=4, lora_alpha=8)
    merge_adapter_files(inputs((c, 1.0)), "cat", {}, {}, tmp_path / "o2")
    assert config(tmp_path / "o2")["target_modules"] == ["q_proj", "v_proj"]


# rank_pattern / alpha_pattern keys of each kind PEFT accepts: (a) a regular expression, (b) a plain leaf
# name, (c) an exact full module name (the rule itself: app/checks/peft_patterns.py)
PATTERN_CASES = {
    "regex": ({r"layers\.[1-9]\.self_attn\.q_proj": 2}, {r"layers\.1\.self_attn\.(q|v)_proj": 3}),
    "suffix": ({"q_proj": 2}, {"v_proj": 16}),
    "exact": ({"model.layers.0.self_attn.v_proj": 2}, {"model.layers.0.self_attn.v_proj": 4}),
}


@pytest.mark.parametrize("case", sorted(PATTERN_CASES))
def test_pattern_keys_give_the_ranks_and_scalings_peft_uses_and_merge(tmp_path: Path, case: str) -> None:
    from peft.tuners.lora import LoraLayer

    from workers.formats.lora import scaling_rule

    rank_pattern, alpha_pattern = PATTERN_CASES[case]
    kw = {"r": 4, "lora_alpha": 8, "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern}
    a, b = save_adapter(tmp_path, "a", 1, **kw), save_adapter(tmp_path, "b", 2, **kw)
    peft_layers = {
        name.removeprefix("base_model.model."): module
        for name, module in loaded(a).named_modules()
        if isinstance(module, LoraLayer)
    }
    weights = load_file(str(a / "adapter_model.safetensors"))
    factors = read_adapter_factors(config(a), a / "adapter_model.safetensors", 1.0)
    scaling = scaling_rule(config(a))
    assert set(factors) == set(peft_layers) and len(peft_layers) == 4
    assert len({f.rank for f in factors.values()}) == 2
    for name, layer in peft_layers.items():
        rank = weights[f"base_model.model.{name}.lora_A.weight"].shape[0]
        assert factors[name].rank == layer.r["default"] == rank, name
        assert scaling(name, rank) == pytest.approx(layer.scaling["default"]), name
    reference = logits(dense_model([(a, 1.0), (b, -0.5)]))
    for method, output in (("cat", {}), ("task_arithmetic", {"rank": 8})):
        out = tmp_path / f"out-{method}"
        merge_adapter_files(inputs((a, 1.0), (b, -0.5)), method, {}, output, out)
        assert torch.allclose(logits(loaded(out)), reference, atol=1e-4), method


def test_regex_output_rank_pattern_and_invalid_pattern_keys(tmp_path: Path) -> None:
    a = save_adapter(tmp_path, "a", 1, r=4, lora_alpha=8)
    out = tmp_path / "out"
    merge_adapter_files(inputs((a, 1.0)), "task_arithmetic", {}, {"rank_pattern": {r"layers\.[1]\..*q_proj": 2}}, out)
    factors = read_adapter_factors(config(out), out / "adapter_model.safetensors", 1.0)
    ranks = {name: f.rank for name, f in factors.items()}
    assert ranks["model.layers.1.self_attn.q_proj"] == 2
    assert {rank for name, rank in ranks.items() if name != "model.layers.1.self_attn.q_proj"} == {4}
    assert torch.isfinite(logits(loaded(out))).all()
    for field in ("rank_pattern", "alpha_pattern"):
        bad = {**config(a), field: {"q_proj": 4, "v_proj[": 4}}
        with pytest.raises(AdapterFormatError, match=rf"{field} key 'v_proj\[' is not a valid regular expression"):
            merge_adapter_files([(bad, a / "adapter_model.safetensors", 1.0)], "cat", {}, {}, tmp_path / field)
        assert not (tmp_path / field).exists()
