"""Losses, one per file (``base.Loss``): each declares the score blocks it reads and what it needs, and applies its
formula to the :class:`~retrieval_lab.losses.scores.Scores` the model family computed for a batch."""
