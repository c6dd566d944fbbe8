"""File formats: PEFT LoRA adapters, Hugging Face model folders, safetensors reading and writing. No job logic."""
