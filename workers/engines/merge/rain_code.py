"""`rain`'s `preserve: "code"` stage 1 (see `rain.py` for the method and the decisions): the released code's
relaxed constraints near the markers, each a scalar cᵢᵀ·ΔW·xᵢ = 0 for one module, collected in one hooked
forward pass per reasoning row, and the ridge-regularised minimum-norm correction of A that meets them."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from app.schemas.merge import RainParams
from workers.engines.merge.errors import MergeInputError
from workers.engines.merge.rain_model import (
    attention_of,
    device_of,
    eager_attention,
    hooks,
    marker_positions,
    neighbourhoods,
    rotary,
    rotate_half,
    weight_of,
)

DIRECT_MAX = 4096  # constraints per module solved by Cholesky up to this many, by conjugate gradients beyond
CG_ITERATIONS, CG_TOL = 1000, 1e-8


def _unit(generator: torch.Generator, count: int, size: int) -> Tensor:
    c = torch.randn(count, size, generator=generator, dtype=torch.float64)
    return (c / c.norm(dim=1, keepdim=True)).float()



@torch.no_grad()
def code_constraints(model: nn.Module, names: Sequence[str], shapes: dict[str, tuple[int, int]],
                     rows: Sequence[Tensor], markers: tuple[int, int], params: RainParams
                     ) -> dict[str, tuple[Tensor, Tensor]]:
    """Each module's constraints (C: N×m readouts, X: N×n inputs), cᵢᵀΔWxᵢ = 0, near the markers."""
    generator = torch.Generator().manual_seed(params.seed)
    radius = params.neighbourhood()
    blocks = {name: attention_of(model, name) for name in names}
    attention = {b.layer: b for b in blocks.values() if b is not None}
    # random unit readouts, fixed per module: o_proj/v_proj read the block's output, others their own output
    readouts: dict[str, Tensor] = {}
    for name in sorted(names):
        block = blocks[name]
        width = int(weight_of(model, block.o).shape[0]) if block is not None else shapes[name][0]
        readouts[name] = _unit(generator, params.readouts, width)
    watched = set(names) | {n for b in attention.values() for n in (b.q, b.k, b.o)}
    ins: dict[str, Tensor] = {}
    outs: dict[str, Tensor] = {}

    def grab_in(name: str) -> Callable[..., None]:
        def pre(_: nn.Module, args: tuple[Tensor, ...]) -> None:
            ins[name] = args[0][0].detach().float()

        return pre

    def grab_out(name: str) -> Callable[..., None]:
        def post(_: nn.Module, args: tuple[Tensor, ...], output: Tensor) -> None:
            outs[name] = output[0].detach().float()

        return post

    weights_o = {layer: weight_of(model, b.o) for layer, b in attention.items()}
    constraints: dict[str, tuple[list[Tensor], list[Tensor]]] = {name: ([], []) for name in names}
    device = device_of(model)
    with eager_attention(model), hooks(model, {n: grab_in(n) for n in watched},
                                        {n: grab_out(n) for b in attention.values() for n in (b.q, b.k)}):
        for ids in rows:
            found = marker_positions(ids, markers)
            if found is None:
                raise MergeInputError("a reasoning row lacks exactly one start and one end marker")
            t_s, t_e = found
            near_s, near_e = neighbourhoods(t_s, t_e, radius, int(ids.numel()))
            # query/key pairs with the key never after the query (the code's pairs were causally masked)
            pairs = [(i, t_s) for i in near_s] + [(t_e, j) for j in near_e]
            order = torch.randperm(len(pairs), generator=generator).tolist()[: params.pairs]
            pairs = [pairs[i] for i in order]
            near = sorted(set(near_s) | set(near_e))
            picks = torch.randperm(len(near), generator=generator).tolist()[: params.positions]
            positions = [near[i] for i in sorted(picks)]
            out = model(ids.unsqueeze(0).to(device), output_attentions=True)
            rotations: dict[int, tuple[Tensor, Tensor] | None] = {}  # per head size, once per row
            for name in names:
                block = blocks[name]
                cs, xs = constraints[name]
                if block is None:  # a random readout of the module's own output at each position
                    x = ins[name][positions]
                    for c in readouts[name]:
                        cs.append(c.to(x.device).expand(len(positions), -1))
                        xs.append(x)
                    continue
                d, h_count, group = block.head_dim, block.heads, block.heads // block.kv_heads
                x_in = ins[block.q]
                if d not in rotations:
                    rotations[d] = rotary(model, int(ids.numel()), d, x_in.device)
                rot = rotations[d]
                q = outs[block.q].view(-1, h_count, d)
                k = outs[block.k].view(-1, block.kv_heads, d)
                cos: Tensor | None = None
                sin: Tensor | None = None
                q_rot, k_rot = q, k
                if rot is not None:  # (T, d) each
                    cos, sin = rot
                    q_rot = q * cos.unsqueeze(1) + rotate_half(q) * sin.unsqueeze(1)
                    k_rot = k * cos.unsqueeze(1) + rotate_half(k) * sin.unsqueeze(1)

                def back(v: Tensor, p: int, cos: Tensor | None = cos, sin: Tensor | None = sin) -> Tensor:
                    # R_pᵀ v: the rotation at position p undone (a logit is (R_i q)·(R_j k))
                    return v if cos is None or sin is None else v * cos[p] - rotate_half(v) * sin[p]

                kind = name.rpartition(".")[2]
                m = shapes[name][0]
                if kind in ("q_proj", "k_proj"):
                    for i, j in pairs:
                        for h in range(h_count):
                            g = h // group
                            c = torch.zeros(m, device=x_in.device)
                            if kind == "q_proj":  # the logit's change through q_i: (ΔW_q x_i)_h · R_iᵀR_j k_j
                                c[h * d:(h + 1) * d] = back(k_rot[j, g], i)
                                xs.append(x_in[i:i + 1])
                            else:  # through k_j: (ΔW_k x_j)_g · R_jᵀR_i q_i, every query head of group g
                                c[g * d:(g + 1) * d] = back(q_rot[i, h], j)
                                xs.append(x_in[j:j + 1])
                            cs.append(c.unsqueeze(0))
                    continue
                probs = out.attentions[block.layer][0].float()  # (H, T, T)
                w_o = weights_o[block.layer].to(x_in.device)
                for t in positions:
                    for h in range(h_count):
                        g = h // group
                        for c_out in readouts[name].to(x_in.device):
                            c = torch.zeros(m, device=x_in.device)
                            if kind == "v_proj":  # c·W_O,h (ΔW_v)_g Σ_s A_h[t,s] x_s
                                c[g * d:(g + 1) * d] = w_o[:, h * d:(h + 1) * d].mT @ c_out
                                xs.append((probs[h, t] @ x_in).unsqueeze(0))
                            else:  # o_proj: c·ΔW_O[:, head h] u_{t,h}
                                c = c_out
                                x = torch.zeros_like(ins[block.o][t])
                                x[h * d:(h + 1) * d] = ins[block.o][t, h * d:(h + 1) * d]
                                xs.append(x.unsqueeze(0))
                            cs.append(c.unsqueeze(0))
    return {name: (torch.cat(cs), torch.cat(xs)) for name, (cs, xs) in constraints.items()}


def _conjugate_gradient(apply: Callable[[Tensor], Tensor], rhs: Tensor) -> Tensor:
    z = torch.zeros_like(rhs)
    r = rhs.clone()
    p = r.clone()
    rr = float(r @ r)
    stop = CG_TOL * CG_TOL * max(rr, 1e-300)
    for _ in range(CG_ITERATIONS):
        if rr <= stop:
            break
        q = apply(p)
        step = rr / float(p @ q)
        z += step * p
        r -= step * q
        rr_next = float(r @ r)
        p = r + (rr_next / rr) * p
        rr = rr_next
    return z


def project_constraints(lora_A: Tensor, lora_B: Tensor, readouts: Tensor, inputs: Tensor, ridge: float) -> Tensor:
    """The minimum-norm A' with c̃ᵢᵀA'xᵢ ≈ 0 (c̃ᵢ = Bᵀcᵢ), ridge-regularised: A' = A − C̃ᵀ·diag(z)·X with
    ((C̃C̃ᵀ)∘(XXᵀ) + λI)z = [c̃ᵢᵀAxᵢ] and λ = ridge·mean(diag). Never forms m×n."""
    a, x = lora_A.double(), inputs.double().to(lora_A.device)
    pulled = readouts.double().to(lora_A.device) @ lora_B.double()  # c̃ᵢ = Bᵀcᵢ, (N×K)
    rhs = ((pulled @ a) * x).sum(1)
    diag = pulled.square().sum(1) * x.square().sum(1)
    lam = ridge * float(diag.mean()) if diag.numel() else 0.0
    if rhs.numel() == 0 or float(diag.max()) == 0.0:
        return lora_A
    if rhs.numel() <= DIRECT_MAX:
        gram = (pulled @ pulled.mT) * (x @ x.mT)
        gram.diagonal().add_(lam if lam > 0 else float(diag.mean()) * 1e-12)
        z = torch.linalg.lstsq(gram, rhs.unsqueeze(1)).solution.squeeze(1) if lam == 0 else torch.cholesky_solve(
            rhs.unsqueeze(1), torch.linalg.cholesky(gram)).squeeze(1)
    else:
        z = _conjugate_gradient(lambda v: ((pulled @ (pulled.mT @ (v.unsqueeze(1) * x))) * x).sum(1) + lam * v, rhs)
    return (a - pulled.mT @ (z.unsqueeze(1) * x)).to(lora_A.dtype)

