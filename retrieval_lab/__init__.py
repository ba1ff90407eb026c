"""retrieval_lab: train and evaluate dense retrievers."""
__version__ = "0.1.0"
