"""The CPU quickstart: a synthetic addition task, its character tokenizer and tiny random models."""
