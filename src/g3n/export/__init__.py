"""Exports of a (fine-tuned) model: merged HF checkpoints, GGUF files for llama.cpp, Ollama Modelfiles."""
