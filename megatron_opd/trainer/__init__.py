"""The training loop shared by every algorithm (`trainer.Trainer`), its optimizer, checkpoints and metrics."""
