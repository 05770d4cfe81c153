"""LoRA adapters in PEFT's format: added, saved, loaded and merged. Inference, export and training all use them."""
