"""Data: BEIR loading and validation, training pairs, the DataModule."""
