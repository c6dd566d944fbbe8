"""Data containers and metrics: prompt tokens masked, tensors accepted as safetensors gives them, known answers."""

from __future__ import annotations

import pytest
import torch

from workers.engines.unlearn import ClassifierData, LMData, UnlearnError
from workers.engines.unlearn.data import IGNORE_INDEX, BatchStream
from workers.engines.unlearn.metrics import classifier_report, lm_report, mia_efficacy, min_k_auc


def test_prompt_tokens_are_masked(tokenizer):
    data = LMData.from_rows([{"prompt": "person1 city ?", "completion": "value3"}], tokenizer)
    labels, ids = data.labels[0].tolist(), data.input_ids[0].tolist()
    assert labels[:3] == [IGNORE_INDEX] * 3
    assert labels[3:] == ids[3:] == [tokenizer.convert_tokens_to_ids("value3"), tokenizer.eos_token_id]


def test_text_rows_train_on_every_token_and_collate_pads(tokenizer):
    data = LMData.from_rows([{"text": "person1 city value3"}, {"text": "person2 ?"}], tokenizer)
    batch = data.collate([0, 1])
    assert batch["input_ids"].shape == (2, 3)
    assert batch["labels"][1].tolist() == [*data.input_ids[1].tolist(), IGNORE_INDEX]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]


def test_bad_rows_are_refused(tokenizer):
    with pytest.raises(UnlearnError):
        LMData.from_rows([{"question": "x"}], tokenizer)
    with pytest.raises(UnlearnError):
        LMData.from_rows([{"prompt": "a", "completion": "b"}], None)
    with pytest.raises(UnlearnError):
        LMData.from_rows([{"text": "person1 city"}], tokenizer).with_completion("I don't know.")


def test_classifier_data_from_safetensors_dict(tmp_path):
    from safetensors.torch import load_file, save_file

    save_file({"pixel_values": torch.randn(5, 3, 4, 4), "labels": torch.arange(5)}, tmp_path / "f.safetensors")
    data = ClassifierData.from_tensors(load_file(tmp_path / "f.safetensors"))
    assert len(data) == 5 and set(data.collate([0, 2])) == {"pixel_values", "labels"}
    with pytest.raises(UnlearnError):
        ClassifierData.from_tensors({"pixel_values": torch.randn(5, 2)})
    with pytest.raises(UnlearnError):
        ClassifierData.from_tensors({"pixel_values": torch.randn(4, 2), "labels": torch.arange(5)})


def test_batch_stream_covers_every_row_each_pass():
    data = ClassifierData({"inputs": torch.arange(10).float()[:, None]}, torch.arange(10))
    stream = BatchStream(data, 5, torch.Generator().manual_seed(0))
    seen = sorted(stream.indices() + stream.indices())
    assert seen == list(range(10))


def test_mia_known_answer():
    retain = torch.full((50,), 0.99) + 0.005 * torch.rand(50)
    test = torch.full((50,), 0.3) + 0.1 * torch.rand(50)
    assert mia_efficacy(retain, test, torch.full((20,), 0.31)) == 100.0
    assert mia_efficacy(retain, test, torch.full((20,), 0.995)) == 0.0


def test_min_k_auc_known_answer():
    assert min_k_auc(torch.tensor([-0.1, -0.2]), torch.tensor([-3.0, -4.0])) == 1.0
    assert min_k_auc(torch.tensor([-3.0, -4.0]), torch.tensor([-0.1, -0.2])) == 0.0


def test_reports_of_trained_models(trained_lm, lm_data, trained_mlp, digits):
    lm = lm_report(trained_lm, lm_data["forget"], lm_data["retain"], lm_data["holdout"], trained_lm.device)
    assert lm["forget_sequence_exact_match"] == 100.0 and lm["forget_extraction_strength"] == 1.0
    assert lm["holdout_sequence_exact_match"] < 50.0 and lm["min_k_auc"] > 0.9
    assert 0.9 < lm["forget_probability"] <= 1.0
    cls = classifier_report(trained_mlp, digits["forget"], digits["retain"], digits["test"], torch.device("cpu"))
    assert cls["UA"] < 10 and cls["RA"] > 90 and 0 <= cls["MIA"] <= 100


def test_jsonl_and_safetensors_bytes(tokenizer):
    from safetensors.torch import save

    blob = (
        b'{"prompt": "person1 city ?", "completion": "value3"}\n\n{"prompt": "person2 pet ?", "completion": "value1"}\n'
    )
    data = LMData.from_jsonl(blob, tokenizer)
    assert len(data) == 2 and data.completions == ["value3", "value1"]
    assert len(LMData.from_jsonl('{"text": "person1 city value3"}', tokenizer)) == 1
    for bad in (b"not json\n", b'{"prompt": "a"}\n', b"[1, 2]\n", b'{"text": 3}\n', b"\n"):
        with pytest.raises(UnlearnError):
            LMData.from_jsonl(bad, tokenizer)
    tensors = ClassifierData.from_safetensors(
        save(
            {
                "input_ids": torch.ones(3, 4, dtype=torch.long),
                "attention_mask": torch.ones(3, 4, dtype=torch.long),
                "labels": torch.tensor([0, 1, 0]),
            }
        )
    )
    assert len(tensors) == 3 and set(tensors.inputs) == {"input_ids", "attention_mask"}
    with pytest.raises(UnlearnError):
        ClassifierData.from_safetensors(b"garbage")
