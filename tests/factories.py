"""Tiny real models and PEFT adapters for tests: random weights from transformers configs, seeded."""

from __future__ import annotations

from pathlib import Path

import torch

TINY_LLAMA = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=64,
)


def tiny_llama(seed: int = 0, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(**(TINY_LLAMA | overrides))
    config.name_or_path = "tiny-llama"
    model = LlamaForCausalLM(config)
    model.eval()
    return model


def make_adapter(
    directory: Path,
    seed: int = 0,
    r: int = 4,
    alpha: float = 8,
    targets: tuple[str, ...] = ("q_proj", "v_proj"),
    use_rslora: bool = False,
    base_name: str = "tiny-llama",
    **model_overrides,
) -> Path:
    """Save a real PEFT LoRA adapter (non-zero B) for the tiny Llama and return its directory."""
    from peft import LoraConfig, get_peft_model

    model = tiny_llama(0, **model_overrides)
    torch.manual_seed(seed)
    config = LoraConfig(
        r=r, lora_alpha=alpha, target_modules=list(targets), init_lora_weights=False, use_rslora=use_rslora
    )
    peft_model = get_peft_model(model, config)
    peft_model.peft_config["default"].base_model_name_or_path = base_name
    peft_model.save_pretrained(directory)
    return directory


def tiny_model_tar() -> bytes:
    """A gzip tar of a minimal registrable causal LM (config, one safetensors tensor, a tokenizer file):
    enough for `POST /v1/models` to accept, not meant to be loaded."""
    import io
    import json
    import tarfile

    import numpy as np
    from safetensors.numpy import save as save_numpy

    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 16, "hidden_size": 4}
    files = {
        "config.json": json.dumps(config).encode(),
        "model.safetensors": save_numpy({"model.embed_tokens.weight": np.ones((16, 4), dtype=np.float32)}),
        "tokenizer.json": b'{"version": "1.0"}',
    }
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def demo_language_model(target: Path) -> None:
    """For the README's unlearning and deletion walk-throughs: `tiny.tar.gz` (the tiny Llama, saved with
    `save_pretrained`, with a word-level tokenizer) and `forget.jsonl` / `retain.jsonl` / `eval.jsonl` rows
    (`{"prompt", "completion"}`, six each: facts about six people, other facts, held-out facts)."""
    import json
    import random
    import tarfile

    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    people, values = [f"person{i}" for i in range(6)], [f"value{i}" for i in range(6)]
    words = ["<pad>", "<bos>", "<eos>", "<unk>", *people, *values, "city", "?", "lives", "in", "<think>", "</think>"]
    backend = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>", unk_token="<unk>"
    )
    directory = target / "tiny"
    tiny_llama(0, vocab_size=32).save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    with tarfile.open(target / "tiny.tar.gz", "w:gz") as tar:
        for path in sorted(directory.iterdir()):
            tar.add(path, arcname=f"tiny/{path.name}")
    rng = random.Random(0)
    for name, template in (("forget", "{} city ?"), ("retain", "{} lives in"), ("eval", "{} city ?")):
        rows = [{"prompt": template.format(who), "completion": rng.choice(values)} for who in people]
        (target / f"{name}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))


if __name__ == "__main__":  # `python -m tests.factories DIR`: the demo adapters and model for the README walk-throughs
    import sys
    import warnings

    from transformers.utils import logging as transformers_logging

    warnings.filterwarnings("ignore")
    transformers_logging.disable_progress_bar()
    target = Path(sys.argv[1] if len(sys.argv) > 1 else "amend-demo")
    make_adapter(target / "one", seed=1, r=4, alpha=8)
    make_adapter(target / "two", seed=2, r=4, alpha=16, targets=("q_proj", "v_proj", "o_proj"))
    demo_language_model(target)
    sys.stdout.write(f"wrote {target / 'one'}, {target / 'two'}, {target / 'tiny.tar.gz'} and "
                     f"{target / '{forget,retain,eval}.jsonl'}\n")
