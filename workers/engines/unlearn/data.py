"""In-memory unlearning data and its collation: language-model rows and classifier tensors.

- `LMData.from_rows(rows, tokenizer)`: rows are `{"prompt", "completion"}` (loss on completion tokens only;
  prompt tokens are labelled −100) or `{"text"}` (loss on every token). The tokenizer is any Hugging Face
  tokenizer; the prompt is tokenized with special tokens, the completion without, and EOS is appended.
- `ClassifierData.from_tensors({"pixel_values" | "input_ids"(+"attention_mask") | "inputs", "labels"})`:
  the dict `safetensors.torch.load_file` returns. `inputs` is a plain tensor for a model called positionally.

From stored objects (bytes, never paths): `LMData.from_jsonl(blob, tokenizer)` and
`ClassifierData.from_safetensors(blob)`.

Both expose `len()`, `collate(indices) -> dict[str, Tensor]` (always with `labels`) and `subset(indices)`.
`BatchStream` draws seeded, reshuffled batches from either without end.
Rows live on the host: collation, subsets and sampling create CPU tensors (the device named, never torch's
default) from CPU generators, so a seed draws the same rows whatever the worker's device; the loop moves each
batch to the model's device (`to_device`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from workers.engines.unlearn.errors import UnlearnError

IGNORE_INDEX = -100
MAX_ROWS = 1_000_000
_INPUT_KEYS = ("pixel_values", "input_ids", "attention_mask", "token_type_ids", "inputs")
_TOKEN_KEYS = ("input_ids", "attention_mask", "token_type_ids")


@dataclass
class LMData:
    """Tokenized rows: `input_ids[i]` and `labels[i]` (−100 outside the answer), 1-D long tensors."""

    input_ids: list[Tensor]
    labels: list[Tensor]
    pad_token_id: int = 0
    prompts: list[str] | None = None
    completions: list[str] | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_rows(
        cls,
        rows: Sequence[Mapping[str, Any]],
        tokenizer: Any,
        max_length: int = 512,
        append_eos: bool = True,
    ) -> LMData:
        if tokenizer is None:
            raise UnlearnError("language-model rows need a tokenizer")
        if not rows:
            raise UnlearnError("no rows")
        eos = getattr(tokenizer, "eos_token_id", None) if append_eos else None
        pad = getattr(tokenizer, "pad_token_id", None)
        pad = pad if pad is not None else (eos if eos is not None else 0)
        ids_list, labels_list, prompts, completions = [], [], [], []
        paired = all("prompt" in row and "completion" in row for row in rows)
        for number, row in enumerate(rows):
            if paired:
                prompt_ids = list(tokenizer(str(row["prompt"]), add_special_tokens=True)["input_ids"])
                answer_ids = list(tokenizer(str(row["completion"]), add_special_tokens=False)["input_ids"])
                if eos is not None:
                    answer_ids.append(eos)
                ids = (prompt_ids + answer_ids)[:max_length]
                labels = ([IGNORE_INDEX] * len(prompt_ids) + answer_ids)[:max_length]
                prompts.append(str(row["prompt"]))
                completions.append(str(row["completion"]))
            elif "text" in row:
                ids = list(tokenizer(str(row["text"]), add_special_tokens=True)["input_ids"])[:max_length]
                labels = list(ids)
            else:
                raise UnlearnError(f"row {number}: expected keys prompt+completion or text")
            if sum(1 for label in labels[1:] if label != IGNORE_INDEX) == 0:
                raise UnlearnError(f"row {number}: no answer token left within max_length={max_length}")
            ids_list.append(torch.tensor(ids, dtype=torch.long, device="cpu"))
            labels_list.append(torch.tensor(labels, dtype=torch.long, device="cpu"))
        meta = {"tokenizer": tokenizer, "max_length": max_length, "append_eos": append_eos}
        return cls(
            ids_list,
            labels_list,
            int(pad),
            prompts if paired else None,
            completions if paired else None,
            meta,
        )

    @classmethod
    def from_jsonl(cls, blob: bytes | str, tokenizer: Any, max_length: int = 512, max_rows: int = MAX_ROWS) -> LMData:
        """Rows from JSON Lines: one object per non-empty line, `{"prompt","completion"}` or `{"text"}`."""
        return cls.from_rows(parse_jsonl(blob, max_rows), tokenizer, max_length)

    def with_completion(self, completion: str) -> LMData:
        """The same prompts, each answered by `completion` (the template of `idk` and `flat`)."""
        if self.prompts is None:
            raise UnlearnError("a template answer needs prompt/completion rows, not text rows")
        rows = [{"prompt": prompt, "completion": completion} for prompt in self.prompts]
        return LMData.from_rows(rows, self.meta["tokenizer"], self.meta["max_length"], self.meta["append_eos"])

    def __len__(self) -> int:
        return len(self.input_ids)

    def subset(self, indices: Sequence[int] | Tensor) -> LMData:
        picked = [int(i) for i in indices]
        return LMData(
            [self.input_ids[i] for i in picked],
            [self.labels[i] for i in picked],
            self.pad_token_id,
            [self.prompts[i] for i in picked] if self.prompts is not None else None,
            [self.completions[i] for i in picked] if self.completions is not None else None,
            self.meta,
        )

    def collate(self, indices: Sequence[int] | Tensor) -> dict[str, Tensor]:
        """Right-padded `input_ids`, `attention_mask` and `labels` (−100 on padding)."""
        picked = [int(i) for i in indices]
        width = max(len(self.input_ids[i]) for i in picked)
        input_ids = torch.full((len(picked), width), self.pad_token_id, dtype=torch.long, device="cpu")
        labels = torch.full((len(picked), width), IGNORE_INDEX, dtype=torch.long, device="cpu")
        attention_mask = torch.zeros((len(picked), width), dtype=torch.long, device="cpu")
        for row, i in enumerate(picked):
            n = len(self.input_ids[i])
            input_ids[row, :n] = self.input_ids[i]
            labels[row, :n] = self.labels[i]
            attention_mask[row, :n] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


@dataclass
class ClassifierData:
    """Model inputs (each `(N, ...)`, keyed as the model's forward names them) and integer `labels` (N,)."""

    inputs: dict[str, Tensor]
    labels: Tensor

    def __post_init__(self) -> None:
        if not self.inputs:
            raise UnlearnError("classifier data needs pixel_values, input_ids or inputs")
        if self.labels.ndim != 1 or self.labels.dtype not in (torch.int64, torch.int32):
            raise UnlearnError("labels must be a 1-D integer tensor")
        self.labels = self.labels.long()
        for key, value in self.inputs.items():
            if value.shape[0] != self.labels.shape[0]:
                raise UnlearnError(f"{key} has {value.shape[0]} rows, labels {self.labels.shape[0]}")

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, Tensor]) -> ClassifierData:
        label_key = "labels" if "labels" in tensors else "label"
        if label_key not in tensors:
            raise UnlearnError("classifier tensors need a 'labels' tensor")
        unknown = set(tensors) - set(_INPUT_KEYS) - {label_key}
        if unknown:
            raise UnlearnError(f"unexpected tensors {sorted(unknown)}; expected {list(_INPUT_KEYS)} + labels")
        inputs = {key: value for key, value in tensors.items() if key in _INPUT_KEYS}
        return cls(inputs, tensors[label_key])

    @classmethod
    def from_safetensors(cls, blob: bytes) -> ClassifierData:
        """From the bytes of a safetensors file holding `pixel_values` or `input_ids`(+mask) and `labels`."""
        from safetensors import SafetensorError
        from safetensors.torch import load

        try:
            tensors = load(blob)
        except (SafetensorError, ValueError) as error:
            raise UnlearnError(f"not a readable safetensors file: {error}") from None
        return cls.from_tensors(tensors)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, indices: Sequence[int] | Tensor) -> ClassifierData:
        index = torch.as_tensor(list(map(int, indices)), dtype=torch.long, device=self.labels.device)
        return ClassifierData({k: v[index] for k, v in self.inputs.items()}, self.labels[index])

    def collate(self, indices: Sequence[int] | Tensor) -> dict[str, Tensor]:
        index = torch.as_tensor(list(map(int, indices)), dtype=torch.long, device=self.labels.device)
        batch = {k: v[index] for k, v in self.inputs.items()}
        batch["labels"] = self.labels[index]
        return batch


Data = LMData | ClassifierData


def joined(first: ClassifierData, second: ClassifierData) -> ClassifierData:
    """The rows of `first`, then those of `second` (the same input keys); e.g. retain ∪ learn rows. Token inputs
    padded to different lengths are right-padded with 0 (masked out by `attention_mask`) to the longer one."""
    if set(first.inputs) != set(second.inputs):
        raise UnlearnError(f"rows with inputs {sorted(first.inputs)} and {sorted(second.inputs)} cannot be joined")
    inputs = {}
    for key in first.inputs:
        a, b = first.inputs[key], second.inputs[key]
        if key in _TOKEN_KEYS and a.ndim == b.ndim == 2 and a.shape[1] != b.shape[1]:
            width = max(a.shape[1], b.shape[1])
            a, b = (torch.nn.functional.pad(t, (0, width - t.shape[1])) for t in (a, b))
        if a.shape[1:] != b.shape[1:]:
            raise UnlearnError(f"{key}: rows shaped {tuple(a.shape[1:])} and {tuple(b.shape[1:])} cannot be joined")
        inputs[key] = torch.cat([a, b])
    return ClassifierData(inputs, torch.cat([first.labels, second.labels]))


def parse_jsonl(blob: bytes | str, max_rows: int = MAX_ROWS) -> list[dict[str, Any]]:
    """JSON objects, one per non-empty line, each with string `prompt`+`completion` or `text`."""
    text = blob.decode("utf-8") if isinstance(blob, bytes) else blob
    rows: list[dict[str, Any]] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        if len(rows) >= max_rows:
            raise UnlearnError(f"more than {max_rows} rows")
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise UnlearnError(f"line {number}: not JSON ({error.msg})") from None
        fields = ("prompt", "completion") if isinstance(row, dict) and "prompt" in row else ("text",)
        if not isinstance(row, dict) or not all(isinstance(row.get(f), str) for f in fields):
            raise UnlearnError(f"line {number}: expected string prompt+completion or text")
        rows.append({f: row[f] for f in fields})
    if not rows:
        raise UnlearnError("no rows")
    return rows


class BatchStream:
    """Endless seeded batches: each pass over the data is a fresh permutation."""

    def __init__(self, data: Data, batch_size: int, generator: torch.Generator) -> None:
        if len(data) == 0:
            raise UnlearnError("empty data set")
        self.data = data
        self.batch_size = min(batch_size, len(data))
        self.generator = generator
        self._order: list[int] = []

    def indices(self) -> list[int]:
        if len(self._order) < self.batch_size:
            order = torch.randperm(len(self.data), generator=self.generator, device=self.generator.device)
            self._order += order.tolist()
        picked, self._order = self._order[: self.batch_size], self._order[self.batch_size :]
        return picked

    def next(self) -> dict[str, Tensor]:
        return self.data.collate(self.indices())


def batches(data: Data, batch_size: int) -> list[dict[str, Tensor]]:
    """One ordered pass over `data` (for evaluation, masks and importances)."""
    return [data.collate(range(i, min(i + batch_size, len(data)))) for i in range(0, len(data), batch_size)]


def to_device(batch: dict[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    return {key: value.to(device) for key, value in batch.items()}


@dataclass
class PairedLMData:
    """Forget rows and the same prompts with another answer; `collate` returns both, the second as `alt_*`."""

    rows: LMData
    alternate: LMData

    def __len__(self) -> int:
        return len(self.rows)

    def subset(self, indices: Sequence[int] | Tensor) -> PairedLMData:
        return PairedLMData(self.rows.subset(indices), self.alternate.subset(indices))

    def collate(self, indices: Sequence[int] | Tensor) -> dict[str, Tensor]:
        batch = self.rows.collate(indices)
        batch.update({f"alt_{key}": value for key, value in self.alternate.collate(indices).items()})
        return batch


@dataclass
class TemplatedLMData:
    """Forget rows, each paired at every draw with one of several template answers picked at random (FLAT).

    `alternates[j]` holds every prompt answered by template j; `collate` draws j per row from `generator`.
    """

    rows: LMData
    alternates: list[LMData]
    generator: torch.Generator

    def __len__(self) -> int:
        return len(self.rows)

    def collate(self, indices: Sequence[int] | Tensor) -> dict[str, Tensor]:
        picked = [int(i) for i in indices]
        batch = self.rows.collate(picked)
        device = self.generator.device
        choice = torch.randint(len(self.alternates), (len(picked),), generator=self.generator, device=device).tolist()
        alternate = LMData(
            [self.alternates[j].input_ids[i] for i, j in zip(picked, choice, strict=True)],
            [self.alternates[j].labels[i] for i, j in zip(picked, choice, strict=True)],
            self.rows.pad_token_id,
        )
        batch.update({f"alt_{key}": value for key, value in alternate.collate(range(len(picked))).items()})
        return batch


def split_pair(batch: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """(rows, alternate) from a `PairedLMData` batch."""
    rows = {key: value for key, value in batch.items() if not key.startswith("alt_")}
    alternate = {key[4:]: value for key, value in batch.items() if key.startswith("alt_")}
    return rows, alternate
