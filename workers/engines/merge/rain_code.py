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
                q_rot, k_rot = q, k
                if rot is not None:  # (T, d) each
                    q_rot = q * rot[0].unsqueeze(1) + rotate_half(q) * rot[1].unsqueeze(1)
                    k_rot = k * rot[0].unsqueeze(1) + rotate_half(k) * rot[1].unsqueeze(1)

                def back(v: Tensor, at: Tensor, rot: tuple[Tensor, Tensor] | None = rot) -> Tensor:
                    # R_pᵀ v for each row's position p: the rotation undone (a logit is (R_i q)·(R_j k))
                    if rot is None:
                        return v
                    cos, sin = rot[0][at].unsqueeze(1), rot[1][at].unsqueeze(1)
                    return v * cos - rotate_half(v) * sin

                kind = name.rpartition(".")[2]
                heads = torch.arange(h_count, device=x_in.device)
                groups = heads // group
                if kind in ("q_proj", "k_proj"):  # one constraint per pair and query head, in that order
                    query = torch.tensor([i for i, _ in pairs], device=x_in.device)
                    key = torch.tensor([j for _, j in pairs], device=x_in.device)
                    if kind == "q_proj":  # the logit's change through q_i: (ΔW_q x_i)_h · R_iᵀR_j k_j
                        c = torch.zeros(len(pairs), h_count, h_count, d, device=x_in.device)
                        c[:, heads, heads] = back(k_rot[key][:, groups], query)
                        xs.append(x_in[query].repeat_interleave(h_count, 0))
                    else:  # through k_j: (ΔW_k x_j)_g · R_jᵀR_i q_i, every query head of group g, jointly
                        c = torch.zeros(len(pairs), h_count, block.kv_heads, d, device=x_in.device)
                        c[:, heads, groups] = back(q_rot[query], key)
                        xs.append(x_in[key].repeat_interleave(h_count, 0))
                    cs.append(c.reshape(len(pairs) * h_count, -1))
                    continue
                at = torch.tensor(positions, device=x_in.device)
                c_out = readouts[name].to(x_in.device)  # (R, hidden)
                count = len(positions) * h_count * len(c_out)  # one per position, query head and readout
                if kind == "v_proj":  # c·W_O,h (ΔW_v)_g Σ_s A_h[t,s] x_s
                    w_o = weights_o[block.layer].to(x_in.device)
                    per_head = torch.einsum("ohd,ro->hrd", w_o.view(w_o.shape[0], h_count, d), c_out)
                    c = torch.zeros(h_count, len(c_out), block.kv_heads, d, device=x_in.device)
                    c[heads, :, groups] = per_head
                    probs = out.attentions[block.layer][0].float()  # (H, T, T)
                    weighted = (probs[:, at] @ x_in).transpose(0, 1)  # (positions, H, n)
                    cs.append(c.reshape(1, h_count, len(c_out), -1).expand(len(positions), -1, -1, -1)
                              .reshape(count, -1))
                    xs.append(weighted.unsqueeze(2).expand(-1, -1, len(c_out), -1).reshape(count, -1))
                else:  # o_proj: c·ΔW_O[:, head h] u_{t,h}
                    u = ins[block.o][at].view(len(positions), h_count, d)
                    x = torch.zeros(len(positions), h_count, h_count, d, device=x_in.device)
                    x[:, heads, heads] = u
                    cs.append(c_out.expand(len(positions), h_count, -1, -1).reshape(count, -1))
                    xs.append(x.reshape(len(positions), h_count, 1, -1).expand(-1, -1, len(c_out), -1)
                              .reshape(count, -1))
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

