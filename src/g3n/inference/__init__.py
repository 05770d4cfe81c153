"""Generation: sampling, the decode engine (static cache, CUDA graph, compiled step), batching and streaming, and the
backends g3n chat/generate/serve talk to (g3n's engine, llama.cpp for GGUF files)."""
