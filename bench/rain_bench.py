"""RAIN-Merging on a tiny reasoning LM: does the merged instruction adapter keep the thinking format?

    python -m bench.rain_bench [--seed 0]

A tiny Llama (hidden 64, 2 layers, 4 heads, 2 K/V heads) is trained from scratch (AdamW, 200 steps) as the
"reasoning model" on single-digit sums written in a thinking format, the prompt ending in `<think>` as R1-style
chat templates do:  `3 plus 4 <think>` → `3 plus 4 is 7 </think> so 7 </s>`.
An "instruction" LoRA (r 8 on every linear layer, 150 steps) is trained on that model for the instruction
`words` (answer in words), with instruction-tuning data that does not think:
`words 3 plus 4 <think>` → `</think> so seven </s>` — 60 of the 100 digit pairs; the other 40 are held out.

Merged into the reasoning model by task arithmetic (the adapter at weight 1: one adapter, λ = 1) and by `rain`
(calibration: 32 reasoning rows and 32 instruction rows of the training pairs; one row uses only 4 reasoning
rows, 8 marker features in 64 dimensions, closer to the paper's 300 in 3584), each model answers the 40 held-out
pairs greedily, with the instruction (`words a plus b <think>`) and without it (`a plus b <think>`).
Columns: `format` — the share of answers in the thinking format (a non-empty thought, one `</think>`, `so`, one
answer token, `</s>`); `in words` — the share of answers (the token after `</think> so`) that are number words:
the instruction metric; `correct` — the right sum in words; `plain fmt` / `plain ok` — format and the right sum
in digits on the prompts without the instruction. `merge s` is the merge's time (rain: its calibration passes).
Below the table: the coefficients rain chose, and how much of each module's input space the projection removed.
"""

from __future__ import annotations

import argparse
import random
import sys
import time

import torch
from torch import nn

WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
         "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen"]
VOCAB = ["<pad>", "<s>", "</s>", "<think>", "</think>", "plus", "is", "so", "words", *map(str, range(19)), *WORDS]
ID = {token: i for i, token in enumerate(VOCAB)}
START, END, EOS = ID["<think>"], ID["</think>"], ID["</s>"]
STEPS = (200, 150)  # reasoning model, instruction adapter
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def encode(text: str) -> list[int]:
    return [ID[token] for token in text.split()]


def reasoning_row(a: int, b: int) -> tuple[str, str]:
    return f"<s> {a} plus {b} <think>", f"{a} plus {b} is {a + b} </think> so {a + b} </s>"


def instruction_row(a: int, b: int) -> tuple[str, str]:
    return f"<s> words {a} plus {b} <think>", f"</think> so {WORDS[a + b]} </s>"


def batch(rows: list[tuple[str, str]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Padded ids and labels (the completion's tokens only)."""
    ids, labels = [], []
    for prompt, completion in rows:
        p, c = encode(prompt), encode(completion)
        ids.append(p + c)
        labels.append([-100] * len(p) + c)
    width = max(len(x) for x in ids)
    pad = [[ID["<pad>"]] * (width - len(x)) for x in ids]
    return (torch.tensor([x + q for x, q in zip(ids, pad, strict=True)]),
            torch.tensor([y + [-100] * len(q) for y, q in zip(labels, pad, strict=True)]))


def train(model: nn.Module, rows: list[tuple[str, str]], steps: int, lr: float, seed: int) -> float:
    generator = random.Random(seed)
    optimiser = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    model.train()
    loss = torch.tensor(0.0)
    for _ in range(steps):
        ids, labels = batch(generator.sample(rows, min(32, len(rows))))
        loss = model(input_ids=ids, labels=labels).loss
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    model.eval()
    return loss.item()


@torch.no_grad()
def generate(model: nn.Module, prompt: str, limit: int = 10) -> list[str]:
    ids = encode(prompt)
    out: list[int] = []
    for _ in range(limit):
        logits = model(torch.tensor([ids + out])).logits[0, -1]
        out.append(int(logits.argmax()))
        if out[-1] == EOS:
            break
    return [VOCAB[i] for i in out]


def judge(tokens: list[str], thinks: bool) -> tuple[bool, str | None]:
    """(thinking format kept, the answer token or None). `thinks`: the prompt ended in <think>, so a thought
    must come before </think>."""
    if tokens.count("</think>") != 1:
        return False, None
    end = tokens.index("</think>")
    answer = tokens[end + 2] if tokens[end + 1:end + 2] == ["so"] and end + 2 < len(tokens) else None
    well_formed = thinks and end >= 1 and answer is not None and tokens[end + 3:end + 4] == ["</s>"]
    return well_formed, answer


def evaluate(model: nn.Module, pairs: list[tuple[int, int]]) -> dict[str, float]:
    scores = {"format": 0, "in words": 0, "correct": 0, "plain format": 0, "plain correct": 0}
    for a, b in pairs:
        kept, answer = judge(generate(model, f"<s> words {a} plus {b} <think>"), True)
        scores["format"] += kept
        scores["in words"] += answer in WORDS
        scores["correct"] += answer == WORDS[a + b]
        kept, answer = judge(generate(model, f"<s> {a} plus {b} <think>"), True)
        scores["plain format"] += kept
        scores["plain correct"] += answer == str(a + b)
    return {key: 100.0 * value / len(pairs) for key, value in scores.items()}


def build(seed: int, started: float) -> tuple[nn.Module, dict[str, list], list[tuple[int, int]], list[tuple[int, int]]]:  # noqa: E501
    """The reasoning model, the instruction adapter's factors (scaling folded in), the seen and held-out pairs."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from workers.engines.merge.types import TaskFactors

    torch.manual_seed(seed)
    pairs = [(a, b) for a in range(10) for b in range(10)]
    random.Random(seed).shuffle(pairs)
    seen, held_out = pairs[:60], pairs[60:]
    config = LlamaConfig(vocab_size=len(VOCAB), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                         attn_implementation="eager")
    model = LlamaForCausalLM(config)
    loss = train(model, [reasoning_row(a, b) for a, b in pairs], STEPS[0], 3e-3, seed)
    elapsed = time.perf_counter() - started
    sys.stdout.write(f"reasoning model: {STEPS[0]} steps, final loss {loss:.3f} ({elapsed:.0f} s)\n")
    model.requires_grad_(False)

    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, lora_dropout=0.0))
    loss = train(peft_model, [instruction_row(a, b) for a, b in seen], STEPS[1], 5e-3, seed + 1)
    elapsed = time.perf_counter() - started
    sys.stdout.write(f"instruction adapter: {STEPS[1]} steps, final loss {loss:.3f} ({elapsed:.0f} s)\n")
    modules: dict[str, list[TaskFactors | None]] = {}
    for name, layer in peft_model.named_modules():
        if hasattr(layer, "lora_A") and "default" in getattr(layer, "lora_A", {}):
            key = name.removeprefix("base_model.model.")
            modules[key] = [TaskFactors(layer.lora_A["default"].weight.detach().clone(),
                                        layer.lora_B["default"].weight.detach().clone() * layer.scaling["default"])]
    model = peft_model.unload()  # the reasoning model without the adapter's layers
    model.eval()

    return model, modules, seen, held_out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(2)
    from app.schemas.merge import MergeOutput, RainParams, TaskArithmeticParams
    from workers.engines.merge.engine import merge_modules
    from workers.engines.merge.rain import InstructionRow, RainCalibration
    from workers.engines.merge.tune import lora_applied

    started = time.perf_counter()
    model, modules, seen, held_out = build(args.seed, started)
    def tokens(prompt: str, completion: str) -> tuple[torch.Tensor, int]:
        return torch.tensor(encode(prompt) + encode(completion)), len(encode(prompt))

    reasoning = [tokens(*reasoning_row(a, b))[0] for a, b in seen[:32]]
    instruction = []
    for a, b in seen[:32]:
        ids, cut = tokens(*instruction_row(a, b))
        positions = torch.arange(len(ids))
        instruction.append(InstructionRow(ids, (positions >= 1) & (positions < cut - 1), positions >= cut))
    calibration = RainCalibration(model, reasoning, (START, END), instruction)
    few = RainCalibration(model, reasoning[:4], (START, END), instruction)  # 8 marker features of 64 dims

    variants: list[tuple[str, str, object, object]] = [
        ("task_arithmetic", "task_arithmetic", TaskArithmeticParams(space="core"), None),
        ("rain features", "rain", RainParams(), calibration),
        ("rain features, no coefficients", "rain", RainParams(coefficients=False), calibration),
        ("rain features, no coef., 4 rows", "rain", RainParams(coefficients=False), few),
        ("rain code", "rain", RainParams(preserve="code"), calibration),
        ("rain code, no coefficients", "rain", RainParams(preserve="code", coefficients=False), calibration),
    ]
    rows = [("reasoning model (no adapter)", evaluate(model, held_out), 0.0)]
    notes: list[str] = []
    for label, method, params, calib in variants:
        tick = time.perf_counter()
        result = merge_modules(method, modules, params, MergeOutput(rank=64), calibration=calib)  # type: ignore[arg-type]
        spent = time.perf_counter() - tick
        if method == "rain" and not params.coefficients:  # type: ignore[attr-defined]
            projection = result.report["rain"]["projection"]
            key = "rank_removed" if params.preserve == "features" else "constraints"  # type: ignore[attr-defined]
            per_layer: dict[str, set[int]] = {}
            for name, entry in projection.items():
                per_layer.setdefault(name.split(".")[2], set()).add(entry[key])
            worst = max(entry["residual"] for entry in projection.values())
            counts = "; ".join(f"layer {layer}: {sorted(values)}" for layer, values in per_layer.items())
            notes.append(f"{label}: {key.replace('_', ' ')} per module (of 64 input dims) {counts}; "
                         f"residual at the markers <= {worst:.1e}")
        elif method == "rain":
            alpha = result.report["rain"]["alpha"]
            notes.append(f"{label}: alpha per layer and head {[[round(a, 2) for a in layer] for layer in alpha]}")
        factors = {name: (m.lora_A, m.lora_B) for name, m in result.modules.items()}
        with lora_applied(model, factors):
            rows.append((label, evaluate(model, held_out), spent))
    header = f"{'model (40 held-out sums)':<34}{'format':>8}{'in words':>10}{'correct':>9}{'plain fmt':>11}" \
             f"{'plain ok':>10}{'merge s':>9}\n"
    sys.stdout.write("\n" + header)
    for label, scores, spent in rows:
        sys.stdout.write(f"{label:<34}{scores['format']:>7.0f}%{scores['in words']:>9.0f}%{scores['correct']:>8.0f}%"
                         f"{scores['plain format']:>10.0f}%{scores['plain correct']:>9.0f}%{spent:>9.2f}\n")
    for note in notes:
        sys.stdout.write(f"  {note}\n")
    ta = dict((label, scores) for label, scores, _ in rows)["task_arithmetic"]
    best = max(rows[2:], key=lambda row: row[1]["format"] + row[1]["in words"])
    verdict = ("wins" if best[1]["format"] > ta["format"] and best[1]["in words"] >= ta["in words"] - 10 else
               "does not win")
    sys.stdout.write(f"\nrain ({best[0]}) {verdict} against task arithmetic on format + instruction "
                     f"(format {best[1]['format']:.0f}% vs {ta['format']:.0f}%, in words {best[1]['in words']:.0f}% "
                     f"vs {ta['in words']:.0f}%); total {time.perf_counter() - started:.0f} s\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
