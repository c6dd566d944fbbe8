"""Tiny real models for the unlearning tests, trained briefly so that forgetting is measurable.

- A 2-layer Llama (hidden 32) with a word-level tokenizer, fit on 32 invented facts ("who attr ?" → value):
  8 rows to forget, 24 to retain, 8 held out. Forget and held-out answers come from values 0-3, retain answers
  from values 4-7: with a shared answer vocabulary, lowering a forget answer lowered the same token in retain
  rows, and which side won 20 optimiser steps was decided by float rounding (a 1e-6 relative change in this
  fixture's learning rate moved NPO's retain NLL from 0.48 to 0.75; another CPU gave 1.08). With disjoint
  answers a forgetting direction exists that leaves retain alone, so the retain guarantees below carry wide
  margins (measured under such perturbations: each method's figures moved by less than 0.02).
- An MLP 64-64-10 fit on 720 sklearn digits; the forget set is every training "3" (class-wise).
Each test gets a deep copy of the session's trained model.
"""

from __future__ import annotations

import copy
import random

import pytest
import torch
from sklearn.datasets import load_digits
from tokenizers import Tokenizer, models, pre_tokenizers
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from workers.engines.unlearn import ClassifierData, LMData
from workers.engines.unlearn.loop import UnlearnContext
from workers.engines.unlearn.losses import classifier_logits, compute_batch_nll, mean_token_nll, per_sample_ce

torch.set_num_threads(1)

PEOPLE = [f"person{i}" for i in range(10)]
ATTRIBUTES = ["city", "job", "pet", "food"]
VALUES = [f"value{i}" for i in range(8)]


def word_tokenizer(words: list[str]) -> PreTrainedTokenizerFast:
    vocab = {token: i for i, token in enumerate(["<pad>", "<bos>", "<eos>", "<unk>", *words])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>", unk_token="<unk>"
    )


@pytest.fixture(scope="session")
def tokenizer() -> PreTrainedTokenizerFast:
    return word_tokenizer([*PEOPLE, *ATTRIBUTES, *VALUES, "?", "I", "don't", "know."])


@pytest.fixture(scope="session")
def lm_rows() -> dict[str, list[dict[str, str]]]:
    rng = random.Random(0)
    # people 0-1: forget; 2-7: retain; 8-9: held out (never trained). Forget and held-out answers (values 0-3)
    # never answer a retain row (values 4-7): see the module docstring.
    forget_like = {0, 1, 8, 9}
    rows = [
        {"prompt": f"{who} {attr} ?", "completion": rng.choice(VALUES[:4] if i in forget_like else VALUES[4:])}
        for i, who in enumerate(PEOPLE)
        for attr in ATTRIBUTES
    ]
    return {"forget": rows[:8], "retain": rows[8:32], "holdout": rows[32:]}


@pytest.fixture(scope="session")
def lm_data(lm_rows, tokenizer) -> dict[str, LMData]:
    return {name: LMData.from_rows(rows, tokenizer) for name, rows in lm_rows.items()}


def tiny_llama(vocab_size: int, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config)


@pytest.fixture(scope="session")
def trained_lm(lm_data, tokenizer) -> LlamaForCausalLM:
    model = tiny_llama(len(tokenizer))
    train = lm_data["forget"].input_ids + lm_data["retain"].input_ids
    data = LMData(train, lm_data["forget"].labels + lm_data["retain"].labels, lm_data["forget"].pad_token_id)
    batch = data.collate(range(len(data)))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(150):
        loss = mean_token_nll(*compute_batch_nll(model, batch))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    return model


@pytest.fixture
def lm(trained_lm) -> LlamaForCausalLM:
    return copy.deepcopy(trained_lm)


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


@pytest.fixture(scope="session")
def digits() -> dict[str, ClassifierData]:
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32)
    y = torch.tensor(y, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    train, test = order[:720], order[720:1020]
    forget = train[y[train] == 3]
    retain = train[y[train] != 3]
    return {
        "forget": ClassifierData({"inputs": x[forget]}, y[forget]),
        "retain": ClassifierData({"inputs": x[retain]}, y[retain]),
        "test": ClassifierData({"inputs": x[test]}, y[test]),
        "train": ClassifierData({"inputs": x[train]}, y[train]),
    }


def fit_mlp(data: ClassifierData) -> MLP:
    """The tests' MLP trained from seed 0 on `data`: 120 Adam steps at 1e-2 on seeded batches of 128."""
    torch.manual_seed(0)
    model = MLP()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for step in range(120):
        batch = data.collate(torch.randperm(len(data), generator=torch.Generator().manual_seed(step))[:128])
        loss = per_sample_ce(classifier_logits(model, batch), batch["labels"]).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    return model


@pytest.fixture(scope="session")
def trained_mlp(digits) -> MLP:
    return fit_mlp(digits["train"])


@pytest.fixture
def mlp(trained_mlp) -> MLP:
    return copy.deepcopy(trained_mlp)


def cpu_context(model: nn.Module, forget, retain=None, tokenizer=None, family: str = "classifier",
                **extra) -> UnlearnContext:
    """What a method builds its objective from, as the tests build it: on the CPU, the generator seeded 0, every
    parameter that requires a gradient trainable, no PEFT; `extra` sets the optional fields (horizon, learn)."""
    return UnlearnContext(
        model=model, family=family, forget=forget, retain=retain, tokenizer=tokenizer,
        generator=torch.Generator().manual_seed(0), device=torch.device("cpu"),
        trainable=[(name, p) for name, p in model.named_parameters() if p.requires_grad], is_peft=False, **extra,
    )
