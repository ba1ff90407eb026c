"""Lightning callbacks: retrieval validation on the dev split during training."""
from __future__ import annotations

import random

import lightning as L

from retrieval_lab.data.beir import BeirSplit
from retrieval_lab.retrieval.metrics import evaluate_run


def dev_corpus(split: BeirSplit, sample: int | None, seed: int) -> dict:
    """The dev corpus: everything, or ``sample`` random documents plus every judged document of the dev queries."""
    if not sample or sample >= len(split.corpus):
        return split.corpus
    judged = {d for docs in split.qrels.values() for d in docs}
    others = sorted(set(split.corpus) - judged)
    keep = judged | set(random.Random(seed).sample(others, max(0, sample - len(judged))))
    return {d: split.corpus[d] for d in split.corpus if d in keep}


class RetrievalValidation(L.Callback):
    """Every ``every_n_epochs`` epochs, retrieve for the dev queries and log ``val/<metric>``."""

    def __init__(self, dev: BeirSplit, corpus_sample: int | None = None, every_n_epochs: int = 1,
                 batch_size: int = 128, k: int = 100, metrics=("ndcg@10", "recall@100", "mrr@10"), seed: int = 0):
        self.dev = BeirSplit(dev_corpus(dev, corpus_sample, seed), dev.queries, dev.qrels)
        self.every_n_epochs, self.batch_size, self.k, self.metrics = every_n_epochs, batch_size, k, tuple(metrics)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        retriever = pl_module.retriever(self.batch_size, progress=False)
        run = retriever.retrieve(self.dev.corpus, self.dev.queries, self.k)
        scores = evaluate_run(self.dev.qrels, run, self.metrics)
        pl_module.log_dict({f"val/{name}": value for name, value in scores.items()}, rank_zero_only=True)
