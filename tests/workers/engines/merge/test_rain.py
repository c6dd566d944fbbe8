"""`rain` (RAIN-Merging) on a tiny random Llama: the projection of one module against plain code, the invariant
(module outputs at the markers of the reasoning rows are the base's; elsewhere the update is there), the code
mode's constrained solve against a plain pseudo-inverse, the coefficients' closed form, and the result loading
with peft."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from app.schemas.merge import MergeOutput, RainParams
from tests.factories import make_adapter, tiny_llama
from workers.engines.merge.engine import merge_modules
from workers.engines.merge.errors import MergeInputError
from workers.engines.merge.rain import InstructionRow, RainCalibration, attention_shares, coefficients
from workers.engines.merge.rain_code import project_constraints
from workers.engines.merge.types import TaskFactors

START, END = 5, 6
ATTN = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
MLP = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
NAMES = [f"model.layers.{layer}.{kind}" for layer in range(2) for kind in ATTN + MLP]


def reasoning_rows(seed: int, count: int = 4, length: int = 18) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(count):
        ids = torch.randint(10, 64, (length,), generator=g)
        start = int(torch.randint(1, 6, (1,), generator=g))
        ids[start], ids[start + 8] = START, END
        rows.append(ids)
    return rows


def instruction_rows(seed: int, count: int = 3) -> list[InstructionRow]:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(count):
        ids = torch.randint(10, 64, (14,), generator=g)
        positions = torch.arange(14)
        rows.append(InstructionRow(ids, (positions >= 1) & (positions < 7), positions >= 7))
    return rows


def adapter_factors(model, seed: int, r: int = 3) -> dict[str, list[TaskFactors | None]]:
    g = torch.Generator().manual_seed(seed)
    modules = {}
    for name in NAMES:
        m, n = model.get_submodule(name).weight.shape
        modules[name] = [TaskFactors(torch.randn(r, n, generator=g), torch.randn(m, r, generator=g) * 0.05)]
    return modules


def module_inputs(model, name: str, rows, positions_of) -> torch.Tensor:
    """Plain capture: the module's inputs at the chosen positions of each row."""
    captured = []
    handle = model.get_submodule(name).register_forward_pre_hook(
        lambda _, args: captured.append(args[0][0].detach())
    )
    try:
        with torch.no_grad():
            for ids in rows:
                model(ids.unsqueeze(0))
    finally:
        handle.remove()
    return torch.cat([x[positions_of(ids)] for x, ids in zip(captured, rows, strict=True)])


def markers_of(ids: torch.Tensor) -> list[int]:
    return [int((ids == START).nonzero()), int((ids == END).nonzero())]


def dense(module) -> torch.Tensor:
    return module.lora_B.double() @ module.lora_A.double()


@pytest.fixture(scope="module")
def model():
    network = tiny_llama(0, num_key_value_heads=2)  # grouped-query attention: 2 query heads per K/V head
    network.requires_grad_(False)
    return network


def test_features_projection_of_one_module_equals_a_plain_implementation(model) -> None:
    rows = reasoning_rows(1)
    modules = adapter_factors(model, 2)
    name = "model.layers.1.self_attn.q_proj"
    out = merge_modules("rain", {name: modules[name]}, RainParams(coefficients=False), MergeOutput(),
                        calibration=RainCalibration(model, rows, (START, END)))
    # plain: X = the module's inputs at the two marker tokens of each row, A' = A − A·X⁺X (pinv)
    x = module_inputs(model, name, rows, markers_of).double()
    (task,) = modules[name]
    a = task.lora_A.double()
    expected = task.lora_B.double() @ (a - a @ torch.linalg.pinv(x) @ x)
    got = dense(out.modules[name])
    assert (got - expected).norm() / expected.norm() < 1e-6
    assert out.modules[name].rank == 3  # input-side projection: the rank stays r
    assert out.report["rain"]["projection"][name]["constraints"] == 2 * len(rows)


@pytest.mark.parametrize("with_coefficients", [False, True])
def test_module_outputs_at_the_markers_are_the_bases_and_the_update_is_present_elsewhere(model, with_coefficients):
    rows = reasoning_rows(3)
    modules = adapter_factors(model, 4)
    calibration = RainCalibration(model, rows, (START, END), instruction_rows(5) if with_coefficients else [])
    result = merge_modules("rain", modules, RainParams(alpha_min=0.2), MergeOutput(), calibration=calibration)
    assert (result.report["rain"]["alpha"] is not None) == with_coefficients
    others = reasoning_rows(7)  # other inputs: same markers' tokens, different text
    for name in NAMES:
        merged, (task,) = result.modules[name], modules[name]
        # the base's inputs of this module at the markers: the merged update adds nothing there
        x = module_inputs(model, name, rows, markers_of).double()
        before = (task.lora_B.double() @ (task.lora_A.double() @ x.mT)).norm()
        after = (dense(merged) @ x.mT).norm()
        assert after / before < 1e-5, name
        # away from the markers, and on rows it was not calibrated on, the update is there
        y = module_inputs(model, name, others, lambda ids: [i for i in range(len(ids)) if i not in markers_of(ids)])
        assert (dense(merged) @ y.double().mT).norm() / (dense(task) @ y.double().mT).norm() > 0.1, name


def test_code_mode_solve_equals_a_plain_minimum_norm_correction() -> None:
    g = torch.Generator().manual_seed(8)
    lora_A, lora_B = torch.randn(3, 10, generator=g), torch.randn(7, 3, generator=g)
    readouts, inputs = torch.randn(12, 7, generator=g), torch.randn(12, 10, generator=g)
    got = project_constraints(lora_A, lora_B, readouts, inputs, ridge=1e-12).double()
    # plain: each constraint is ⟨c̃ᵢxᵢᵀ, A⟩ = 0 with c̃ᵢ = Bᵀcᵢ; the minimum-norm change is the projection of
    # vec(A) onto the constraints' span, A' = A − M⁺M·vec(A)
    pulled = readouts.double() @ lora_B.double()
    m = torch.stack([torch.outer(c, x).flatten() for c, x in zip(pulled, inputs.double(), strict=True)])
    expected = (lora_A.double().flatten() - torch.linalg.pinv(m) @ (m @ lora_A.double().flatten())).view(3, 10)
    assert (got - expected).norm() / expected.norm() < 1e-6
    assert (((pulled @ got) * inputs.double()).sum(1)).abs().max() < 1e-6
    # a positive ridge leaves part of each constraint: the correction is smaller
    loose = project_constraints(lora_A, lora_B, readouts, inputs, ridge=1e-1).double()
    assert (loose - lora_A).norm() < (got - lora_A).norm()


def test_code_mode_holds_its_constraints_with_grouped_query_attention(model) -> None:
    rows = reasoning_rows(9, count=1)  # at most 32 constraints per module on 8×n unknowns: not all of A
    modules = adapter_factors(model, 10, r=8)
    result = merge_modules("rain", modules, RainParams(preserve="code", coefficients=False, ridge=1e-8),
                           MergeOutput(), calibration=RainCalibration(model, rows, (START, END)))
    projection = result.report["rain"]["projection"]
    heads, pairs, readouts, positions = 4, 8, 2, 4
    for name in NAMES:
        kind = name.rpartition(".")[2]
        expected = {"q_proj": pairs * heads, "k_proj": pairs * heads, "v_proj": positions * heads * readouts,
                    "o_proj": positions * heads * readouts}.get(kind, positions * readouts)
        # every query head's constraint of a shared K/V slice sits in one joint solve of that module
        assert projection[name]["constraints"] == expected * len(rows), name
        assert projection[name]["residual"] < 1e-3, name
        assert dense(result.modules[name]).norm() / dense(modules[name][0]).norm() > 0.5, name  # not emptied
    assert result.report["rain"]["radius"] == 5


def test_coefficients_closed_form() -> None:
    # spec test: S = 2, Σ_sΔa = (1, 0), Σ_sΔu = (0, 2), Σ_s u1 = (0, 1) -> α* = (1.1/2.1, 0)
    a0, u0 = torch.zeros(2, 1, 2), torch.zeros(2, 1, 2)
    a1 = torch.tensor([[[0.5, 0.0]], [[0.5, 0.0]]])
    u1 = torch.tensor([[[0.0, 0.5]], [[0.0, 0.5]]])
    u0 = u1 - torch.tensor([[[0.0, 1.0]], [[0.0, 1.0]]])
    alpha = coefficients((a0, u0), (a1, u1), RainParams())
    assert alpha[0].tolist() == pytest.approx([1.1 / 2.1, 0.0])


def test_attention_shares_read_the_response_rows_attending_to_the_instruction(model) -> None:
    rows = instruction_rows(11)
    a, u = attention_shares(model, rows)
    assert a.shape == (3, 2, 4)
    assert bool((a > 0).all())  # response -> instruction is causal: never a masked (empty) read
    # every response row's attention sums to one over instruction, unrelated and the response itself
    assert bool((a + u <= 7 + 1e-4).all())


def test_rain_refuses_without_calibration_and_with_a_module_the_model_lacks(model) -> None:
    modules = adapter_factors(model, 12)
    with pytest.raises(MergeInputError, match="calibration"):
        merge_modules("rain", modules, RainParams(), MergeOutput())
    bad = {"model.layers.0.self_attn.nope": modules[NAMES[0]]}
    with pytest.raises(MergeInputError, match="not in the calibration model"):
        merge_modules("rain", bad, RainParams(), MergeOutput(),
                      calibration=RainCalibration(model, reasoning_rows(1), (START, END)))


def test_the_merged_adapter_loads_with_peft_and_keeps_the_markers(model, tmp_path: Path) -> None:
    from peft import PeftModel

    from workers.formats.lora import merge_adapter_files

    source = make_adapter(tmp_path / "instruction", seed=3, r=4, targets=("q_proj", "v_proj", "down_proj"),
                          num_key_value_heads=2)
    config = __import__("json").loads((source / "adapter_config.json").read_text())
    rows = reasoning_rows(13)
    report = merge_adapter_files([(config, source / "adapter_model.safetensors", 1.0)], "rain",
                                 {"coefficients": False}, {}, tmp_path / "out",
                                 calibration=RainCalibration(model, rows, (START, END)))
    assert report["method"] == "rain"
    merged = PeftModel.from_pretrained(tiny_llama(0, num_key_value_heads=2), tmp_path / "out").eval()
    plain = PeftModel.from_pretrained(tiny_llama(0, num_key_value_heads=2), source).eval()
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.v_proj", "model.layers.1.mlp.down_proj"):
        # the base model's inputs of the module at the markers, through the PEFT layers (base weight + B·A·s)
        x = module_inputs(model, name, rows, markers_of)
        expected = model.get_submodule(name)(x)
        with torch.no_grad():
            assert torch.allclose(merged.get_submodule("base_model.model." + name)(x), expected, atol=1e-5), name
            assert not torch.allclose(plain.get_submodule("base_model.model." + name)(x), expected, atol=1e-3), name


@pytest.mark.parametrize("kind", ["q_proj", "k_proj"])
def test_code_mode_keeps_the_attention_logits_of_its_causal_pairs(model, kind: str) -> None:
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    from workers.engines.merge.rain_model import neighbourhoods

    rows = reasoning_rows(14, count=1)  # 12 pairs × 4 heads = 48 constraints on 8×32 unknowns: not all of A
    name = f"model.layers.0.self_attn.{kind}"
    modules = {name: adapter_factors(model, 15, r=8)[name]}
    params = RainParams(preserve="code", coefficients=False, ridge=1e-10, pairs=64)
    merged = merge_modules("rain", modules, params, MergeOutput(),
                           calibration=RainCalibration(model, rows, (START, END))).modules[name]
    attention = model.model.layers[0].self_attn
    heads, d = 4, attention.head_dim

    def logits(ids: torch.Tensor, delta: torch.Tensor | None) -> torch.Tensor:
        """(H, T, T) pre-softmax logits of layer 0 with `delta` (m×n) added to the module: plain transformers code."""
        hidden = model.model.layers[0].input_layernorm(model.model.embed_tokens(ids.unsqueeze(0)))
        q, k = attention.q_proj(hidden), attention.k_proj(hidden)
        if delta is not None:
            change = hidden @ delta.float().mT
            q, k = (q + change, k) if kind == "q_proj" else (q, k + change)
        q = q.view(1, -1, heads, d).transpose(1, 2)
        k = k.view(1, -1, 2, d).transpose(1, 2).repeat_interleave(2, dim=1)  # 2 query heads per K/V head
        cos, sin = model.model.rotary_emb(hidden, torch.arange(len(ids)).unsqueeze(0))
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        return (q @ k.mT)[0] / d**0.5

    moved_plain, moved_rain = [], []
    with torch.no_grad():
        for ids in rows:
            t_s, t_e = markers_of(ids)
            near_s, near_e = neighbourhoods(t_s, t_e, 5, len(ids))
            pairs = [(i, t_s) for i in near_s] + [(t_e, j) for j in near_e]
            assert all(j <= i for i, j in pairs)  # the key never after the query: no masked logit
            base = logits(ids, None)
            for delta, moved in ((dense(modules[name][0]), moved_plain), (dense(merged), moved_rain)):
                change = logits(ids, delta) - base
                moved.append(torch.stack([change[:, i, j] for i, j in pairs]))
    plain, kept = torch.cat(moved_plain).norm(), torch.cat(moved_rain).norm()
    assert kept / plain < 1e-4, (float(kept), float(plain))
    assert dense(merged).norm() / dense(modules[name][0]).norm() > 0.5  # most of the update is still there


def test_a_gpt2_model_with_fused_conv1d_attention_keeps_its_marker_outputs() -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64)).eval()
    gpt2.requires_grad_(False)
    g = torch.Generator().manual_seed(16)
    names = [f"transformer.h.{i}.attn.c_attn" for i in range(2)] + ["transformer.h.1.mlp.c_proj"]
    modules = {}
    for name in names:
        n, m = gpt2.get_submodule(name).weight.shape  # Conv1D stores (in, out); factors are (out, in)
        modules[name] = [TaskFactors(torch.randn(3, n, generator=g), torch.randn(m, 3, generator=g) * 0.05)]
    rows = reasoning_rows(17)
    result = merge_modules("rain", modules, RainParams(alpha_min=0.3), MergeOutput(),  # no head emptied
                           calibration=RainCalibration(gpt2, rows, (START, END), instruction_rows(18)))
    alpha = torch.tensor(result.report["rain"]["alpha"])
    assert alpha.shape == (2, 4)
    for name in names:
        x = module_inputs(gpt2, name, rows, markers_of).double()
        assert (dense(result.modules[name]) @ x.mT).norm() / (dense(modules[name][0]) @ x.mT).norm() < 1e-5, name
        # stage 2 reached the block's modules: the layer's mean α (one value: no per-head rows to tell apart)
        block = int(name.split(".")[2])
        merged, (task,) = result.modules[name], modules[name]
        expected = float(alpha[block].mean())
        ratio = merged.lora_B.double().norm() / task.lora_B.double().norm()
        assert float(ratio) == pytest.approx(expected, rel=1e-5), name
