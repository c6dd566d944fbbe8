"""Hugging Face model folders and dataset files, loaded for unlearning (fetching is `workers/jobs/inputs.py`).

Models load with transformers from `config.json` + `*.safetensors` only: `trust_remote_code=False`,
`use_safetensors=True`, `local_files_only=True`, always. Datasets never go through pickle either: JSONL is
parsed as JSON, tensors are read with `safetensors`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from app.checks.model import TOKENIZER_FILES, check_name
from app.schemas.datasets import DatasetRecord
from app.schemas.models import ModelRecord
from workers.formats.tensor_files import DTYPES

log = logging.getLogger(__name__)

MAX_TEXT_TOKENS = 512


class HfFormatError(ValueError):
    """A model folder or dataset file cannot be read the way the job needs (custom code, does not load, rows
    of the wrong kind for the model)."""


def load_model(directory: Path, model: ModelRecord) -> tuple[nn.Module, Any]:
    """(model in float32, tokenizer or None) from a fetched model directory; never runs custom code."""
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        AutoModelForImageClassification,
        AutoModelForSequenceClassification,
        AutoTokenizer,
    )
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # no progress bars in the worker's logs

    raw_config = json.loads((directory / "config.json").read_text())
    if "auto_map" in raw_config:
        raise HfFormatError("the model's config needs custom code (auto_map); Amend never runs it")
    config = AutoConfig.from_pretrained(directory, trust_remote_code=False, local_files_only=True)
    if model.family == "causal_lm":
        loader: Any = AutoModelForCausalLM
    elif model.architecture.endswith("ForImageClassification"):
        loader = AutoModelForImageClassification
    else:
        loader = AutoModelForSequenceClassification
    try:
        network = loader.from_pretrained(
            directory,
            config=config,
            trust_remote_code=False,
            use_safetensors=True,
            local_files_only=True,
            dtype=torch.float32,
        )
    except (OSError, ValueError, KeyError) as error:
        raise HfFormatError(f"model {model.id} does not load with transformers: {error}") from None
    tokenizer = None
    if TOKENIZER_FILES & {path.name for path in directory.iterdir()}:
        try:
            tokenizer = AutoTokenizer.from_pretrained(directory, trust_remote_code=False, local_files_only=True)
        except (OSError, ValueError, KeyError) as error:
            raise HfFormatError(f"model {model.id}: its tokenizer does not load: {error}") from None
        if tokenizer.pad_token is None and tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
    return network, tokenizer


def stored_dtype(directory: Path) -> torch.dtype:
    """The float dtype most of a model's stored weights use (training runs in float32; outputs go back)."""
    from collections import Counter

    from app.checks.adapter import ALL_DTYPES, read_header

    counts: Counter[str] = Counter()
    for path in directory.glob("*.safetensors"):
        for info in read_header(path, 1 << 30, 1 << 20, dtypes=ALL_DTYPES).values():
            if info.dtype in DTYPES:
                counts[info.dtype] += 1
    return DTYPES[counts.most_common(1)[0][0]] if counts else torch.float32


def read_rows(path: Path) -> list[dict[str, Any]]:
    """The JSONL rows in order (blank lines skipped, as at upload): row id i is the i-th row."""
    rows = []
    with path.open("rb") as source:
        for line in source:
            if line.strip():
                rows.append(json.loads(line))
    return rows


def max_tokens(model: nn.Module) -> int:
    """Rows are truncated to what the model's positions allow (absolute position embeddings crash past it)."""
    positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return min(MAX_TEXT_TOKENS, int(positions)) if isinstance(positions, int) and positions > 0 else MAX_TEXT_TOKENS


def load_data(
    path: Path,
    dataset: DatasetRecord,
    rows: Sequence[int] | None,
    family: str,
    tokenizer: Any,
    max_length: int = MAX_TEXT_TOKENS,
) -> Any:
    """The engine's data container for `rows` of a fetched dataset (all rows when None)."""
    from workers.engines.unlearn import ClassifierData, LMData

    if dataset.format == "safetensors":
        from safetensors.torch import load_file

        tensors = load_file(str(path))
        if rows is not None:
            index = torch.as_tensor(list(rows), dtype=torch.long)
            tensors = {name: value[index] for name, value in tensors.items()}
        return ClassifierData.from_tensors(
            {"pixel_values": tensors["pixel_values"].float(), "labels": tensors["labels"].long()}
        )
    all_rows = read_rows(path)
    picked = all_rows if rows is None else [all_rows[i] for i in rows]
    if dataset.kind == "lm":
        if family != "causal_lm":
            raise HfFormatError(f"dataset {dataset.id} holds language-model rows; the model is a {family}")
        return LMData.from_rows(picked, tokenizer, max_length=max_length)
    if tokenizer is None:
        raise HfFormatError(f"dataset {dataset.id} holds text rows but the model has no tokenizer")
    encoded = tokenizer(
        [row["text"] for row in picked],
        padding=True,
        truncation=True,
        max_length=max_length,
        return_tensors="pt",
    )
    tensors = {key: encoded[key] for key in ("input_ids", "attention_mask") if key in encoded}
    tensors["labels"] = torch.tensor([int(row["label"]) for row in picked], dtype=torch.long)
    return ClassifierData.from_tensors(tensors)


def model_output_files(directory: Path, source: Path) -> dict[str, Path]:
    """The files of a saved model that a registered model may hold, plus the input's files that saving
    did not write (tokenizer, preprocessor). Anything else the library wrote is left out, with a log line."""
    files: dict[str, Path] = {}
    for path in sorted(directory.iterdir()):
        try:
            check_name(path.name)
        except Exception:  # noqa: BLE001 - a file type a model may not hold is simply not published
            log.warning("not publishing an unexpected file written by save_pretrained", extra={"file": path.name})
            continue
        files[path.name] = path
    for path in sorted(source.iterdir()):
        if path.name not in files and not path.name.lower().endswith(".safetensors") and path.name != "config.json":
            if path.name != "model.safetensors.index.json":
                files[path.name] = path
    return files
