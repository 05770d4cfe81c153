"""Fine-tuning: configs, chat datasets, the loss, the loop (LoRA and full, one or several GPUs), and how training runs the layers (checkpointing, offloading, compiling)."""
