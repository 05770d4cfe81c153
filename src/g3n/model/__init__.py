"""The Gemma 3n model as PyTorch modules (text decoder, towers, 4-bit layers) and building it from a checkpoint."""
