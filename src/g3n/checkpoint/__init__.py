"""Checkpoints on disk: what --model names, reading tensors by name, writing HF checkpoints, atomic writes, inspection."""
