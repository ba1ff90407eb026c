"""Training examples: a query and a group of documents (the positive first, then negatives).

``SupervisedPairs`` takes its queries and positives from a qrels split. Each epoch draws one positive per
query (uniformly among its judged-relevant documents); the draw depends only on (seed, epoch, index), so a
run is reproducible and can be resumed at any step.
"""
from __future__ import annotations

import random

from torch.utils.data import Dataset

from retrieval_lab.data.beir import BeirDataset, Qrels
from retrieval_lab.errors import DataError


class SupervisedPairs(Dataset):
    def __init__(self, dataset: BeirDataset, qrels: Qrels, group_size: int = 1, seed: int = 0):
        self.dataset, self.group_size, self.seed, self.epoch = dataset, group_size, seed, 0
        self.qids = [q for q in sorted(qrels) if any(s > 0 for s in qrels[q].values())]
        self.positives = {q: sorted(d for d, s in qrels[q].items() if s > 0) for q in self.qids}
        if not self.qids:
            raise DataError(f"the training qrels of {dataset.path} hold no positive judgement (score > 0).")
        if group_size != 1:
            raise DataError("supervised pairs without a negatives file need group_size 1 (in-batch negatives only).")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.qids)

    def __getitem__(self, index: int) -> dict:
        rng = random.Random(hash((self.seed, self.epoch, index)))
        qid = self.qids[index]
        pos = rng.choice(self.positives[qid])
        return {"qid": qid, "query": self.dataset.queries[qid], "doc_ids": [pos],
                "docs": [self.dataset.corpus[pos].full_text], "positives": set(self.positives[qid])}
