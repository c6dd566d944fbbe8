"""The `calibration` step of a merge job (rain): fetch the base model (as `tune` does: `load_base_model`) and
the calibration rows, check the markers against the tokenizer, tokenize, and hand the engine a
`RainCalibration`. Refusals here are `invalid_input` before any compute: a model without a tokenizer, a marker
that is not one token of its vocabulary, reasoning rows none of which holds one start and one end marker,
instruction rows that are not prompt + completion."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from app.schemas.merge import MergeCalibration
from workers.jobs.context import InputRejected, JobContext
from workers.jobs.inputs import dataset_record, fetch_dataset
from workers.jobs.merge_tune import load_base_model

MAX_ROWS = 10_000  # rows read from each calibration dataset (the method's max_rows caps what it uses)


def marker_ids(tokenizer: Any, markers: tuple[str, str], model_id: str) -> tuple[int, int]:
    """Each marker's token id; refuses a marker that is not in the vocabulary or is not read as one token."""
    vocab = tokenizer.get_vocab()
    ids = []
    for marker in markers:
        if marker not in vocab:
            raise InputRejected(f"the marker {marker!r} is not in the vocabulary of model {model_id}'s tokenizer")
        encoded = list(tokenizer(marker, add_special_tokens=False)["input_ids"])
        if encoded != [vocab[marker]]:
            raise InputRejected(f"the marker {marker!r} is in the vocabulary of model {model_id} but text holding it "
                                f"is tokenized as {encoded}, not as the one token {vocab[marker]}")
        ids.append(int(vocab[marker]))
    return ids[0], ids[1]


def _encode(tokenizer: Any, row: dict[str, Any], max_length: int) -> tuple[list[int], int]:
    """(ids, prompt length): the prompt with special tokens, the completion without, as every LM job reads rows."""
    if "prompt" in row and "completion" in row:
        prompt = list(tokenizer(str(row["prompt"]), add_special_tokens=True)["input_ids"])
        answer = list(tokenizer(str(row["completion"]), add_special_tokens=False)["input_ids"])
        return (prompt + answer)[:max_length], len(prompt)
    return list(tokenizer(str(row.get("text", "")), add_special_tokens=True)["input_ids"])[:max_length], 0


def load_calibration(context: JobContext, calibration: MergeCalibration, root: Path) -> Any:
    """The engine's `RainCalibration` for this job (model on the worker's device)."""
    import torch

    from workers.device import current
    from workers.engines.merge.rain import InstructionRow, RainCalibration
    from workers.engines.merge.rain_model import marker_positions
    from workers.formats.hf_models import max_tokens, read_rows

    records, tenant = context.records, context.job.tenant
    record, model, tokenizer = load_base_model(context, calibration.model, root / "calibration-model")
    if tokenizer is None:
        raise InputRejected(f"model {record.id} has no tokenizer: the markers and rows cannot be tokenized")
    markers = marker_ids(tokenizer, calibration.markers, record.id)
    model.eval()
    model.to(current().torch_device)
    limit = max_tokens(model)

    def rows_of(dataset_id: str) -> list[dict[str, Any]]:
        dataset = dataset_record(records, tenant, dataset_id)
        return read_rows(fetch_dataset(records, dataset, root / "calibration-data"))[:MAX_ROWS]

    reasoning = []
    for row in rows_of(calibration.reasoning):
        ids = torch.tensor(_encode(tokenizer, row, limit)[0], dtype=torch.long)
        if marker_positions(ids, markers) is not None:  # the code drops rows without exactly one of each
            reasoning.append(ids)
    if not reasoning:
        raise InputRejected(f"no row of dataset {calibration.reasoning} holds exactly one {calibration.markers[0]!r} "
                            f"followed by one {calibration.markers[1]!r} (within {limit} tokens)")
    instruction = []
    if calibration.instruction is not None:
        special = set(getattr(tokenizer, "all_special_ids", []) or [])
        for number, row in enumerate(rows_of(calibration.instruction)):
            if "prompt" not in row or "completion" not in row:
                raise InputRejected(f"instruction row {number}: needs prompt (the instruction) and completion")
            tokens, prompt_length = _encode(tokenizer, row, limit)
            tensor = torch.tensor(tokens, dtype=torch.long)
            positions = torch.arange(len(tokens))
            is_special = torch.tensor([token in special for token in tokens], dtype=torch.bool)
            response = positions >= prompt_length
            if not bool(response.any()):
                continue
            instruction.append(InstructionRow(tensor, (positions < prompt_length) & ~is_special, response))
    return RainCalibration(model=model, reasoning=reasoning, markers=markers, instruction=instruction)
