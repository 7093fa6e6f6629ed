"""Fine-tuning of pretrained checkpoints on the downstream tasks, one entry point per task."""
