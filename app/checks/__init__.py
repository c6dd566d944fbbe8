"""Upload validators: adapters, models, datasets (and the safetensors header and PEFT pattern rules)."""
