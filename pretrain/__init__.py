"""ALBEF-family pretraining: models, objectives, the task module, the training loop and checkpoints."""
