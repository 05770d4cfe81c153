"""Fine-tuning: data (this package's first part); the training loop arrives with the fine-tuning issue."""
