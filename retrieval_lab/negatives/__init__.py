"""Negative strategies, one per file (``base.NegativeStrategy``), each with its ``conf/negatives/*.yaml``: what a
training example's negatives are and everything that takes (dataset extras, a batch sampler, callbacks, the module).
"""
