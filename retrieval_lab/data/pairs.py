"""Training examples: a query and a group of documents (the positive first, then negatives).

``SupervisedPairs`` takes its queries and positives from a qrels split; ``CroppingPairs`` and ``ICTPairs`` make
both sides from one document, without labels. Every random draw depends only on (seed, epoch, index), so a
run is reproducible and can be resumed at any step.
"""
from __future__ import annotations

import random
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from torch.utils.data import Dataset

from retrieval_lab.data.beir import BeirDataset, Document, Qrels, load_corpus, read_lines
from retrieval_lab.data.negatives import QueryNegatives
from retrieval_lab.data.sampling import balanced_pair
from retrieval_lab.errors import ConfigError, DataError


class SupervisedPairs(Dataset):
    """One example per judged query: a positive drawn from its qrels, then ``group_size - 1`` hard negatives
    drawn (without replacement while there are enough) from its mined list; a query with no mined negative
    gets random corpus documents that are not its positives. With ``balanced_bins`` (TAS-B) the pair is drawn
    uniformly over margin bins of the file's teacher scores instead. With ``teacher`` (distillation losses)
    only documents the file scores are drawn, each example carries their teacher scores, and queries without a
    scored positive and a scored negative are left out (``skipped`` counts them). ``judged`` holds every judged
    positive of a query (none is ever a negative of it, in its group or in the batch's other groups); ``positives``
    those a positive is drawn from (with ``teacher``: those the file scores)."""

    needs_qrels = True  # its queries and positives are the training judgements
    takes_negatives = True  # draws its negatives from a mined negatives file (negatives.file)

    def __init__(self, dataset: BeirDataset, qrels: Qrels, group_size: int = 1, seed: int = 0,
                 negatives: dict[str, QueryNegatives] | None = None, balanced_bins: int | None = None,
                 teacher: bool = False):
        self.dataset, self.group_size, self.seed, self.epoch = dataset, group_size, seed, 0
        self.qids = [q for q in sorted(qrels) if any(s > 0 for s in qrels[q].values())]
        self.judged = {q: sorted(d for d, s in qrels[q].items() if s > 0) for q in self.qids}
        self.positives = dict(self.judged)
        if not self.qids:
            raise DataError(f"the training qrels of {dataset.path} hold no positive judgement (score > 0).")
        if group_size != 1 and negatives is None:
            raise ConfigError("supervised pairs without a negatives file need negatives.group_size=1.")
        if (balanced_bins or teacher) and (group_size < 2 or negatives is None):
            raise ConfigError("teacher scores (TAS-B bins, distillation losses) come with the negatives file: they "
                              "need negatives.group_size >= 2 and a negatives file with scores.")
        if balanced_bins and group_size != 2:
            raise ConfigError("TAS-B balanced sampling picks one (positive, negative) pair per query: it needs "
                              "negatives.group_size=2.")
        self.negatives = {q: [d for d in negatives[q].neg if d not in self.judged[q]] if q in negatives else []
                          for q in self.qids} if negatives is not None else {}
        self._doc_ids = list(dataset.corpus)
        self.balanced_bins, self.teacher = balanced_bins, teacher
        self.scores = {q: negatives[q].scores for q in self.qids if q in negatives} if balanced_bins or teacher else {}
        self.skipped = 0
        if teacher:
            for q in self.qids:
                scored = self.scores.get(q, {})
                self.positives[q] = [d for d in self.judged[q] if d in scored]
                self.negatives[q] = [d for d in self.negatives[q] if d in scored]
            kept = [q for q in self.qids if self.positives[q] and self.negatives[q]]
            self.skipped = len(self.qids) - len(kept)
            if not kept:
                raise DataError("the negatives file scores no (positive, negative) pair of any training query: "
                                "score it with `python -m retrieval_lab.score`.")
            self.qids = kept

    def margin_pairs(self, qid: str) -> list[tuple[str, str, float]]:
        """Every (positive, negative, teacher margin) of a query whose two teacher scores are known."""
        scores = self.scores.get(qid, {})
        return [(p, n, scores[p] - scores[n]) for p in self.positives[qid] if p in scores
                for n in self.negatives[qid] if n in scores]

    def draw_negatives(self, qid: str, rng: random.Random) -> list[str]:
        need = self.group_size - 1
        pool = self.negatives.get(qid, [])
        if len(pool) >= need:
            return rng.sample(pool, need)
        if pool:
            return [rng.choice(pool) for _ in range(need)]
        judged = set(self.judged[qid])
        if len(judged) >= len(self._doc_ids) and not set(self._doc_ids) - judged:
            raise DataError(f"query {qid} has every document of the corpus as a positive: no negative can be drawn.")
        drawn = []
        while len(drawn) < need:
            doc_id = rng.choice(self._doc_ids)
            if doc_id not in judged:
                drawn.append(doc_id)
        return drawn

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.qids)

    def __getitem__(self, index: int) -> dict:
        rng = random.Random(hash((self.seed, self.epoch, index)))
        qid = self.qids[index]
        pairs = self.margin_pairs(qid) if self.balanced_bins else None
        if pairs:
            doc_ids = list(balanced_pair(pairs, self.balanced_bins, rng))
        else:
            doc_ids = [rng.choice(self.positives[qid])] + (self.draw_negatives(qid, rng) if self.group_size > 1 else [])
        example = {"qid": qid, "query": self.dataset.queries[qid], "doc_ids": doc_ids,
                   "docs": [self.dataset.corpus[d].full_text for d in doc_ids], "positives": set(self.judged[qid])}
        if self.teacher:
            example["teacher"] = [self.scores[qid][d] for d in doc_ids]
        return example


# ---------------------------------------------------------------------------------------------------------------
# Positive pairs without labels: two views of one document.


@dataclass
class Augmentation:
    """Word-level noise applied to each view independently (Contriever's token deletion / replacement / masking).

    Each word is deleted with probability ``deletion``; a surviving word is replaced by a random corpus word with
    probability ``replacement``, else by ``mask_token`` with probability ``masking``.
    """

    deletion: float = 0.0
    replacement: float = 0.0
    masking: float = 0.0
    mask_token: str = "[MASK]"

    def __post_init__(self):
        for name in ("deletion", "replacement", "masking"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ConfigError(f"pairs.augmentation.{name} must lie in [0, 1), got {value}.")

    def __call__(self, words: list[str], rng: random.Random, vocabulary: list[str]) -> list[str]:
        out = []
        for word in words:
            if self.deletion and rng.random() < self.deletion:
                continue
            if self.replacement and rng.random() < self.replacement:
                word = rng.choice(vocabulary)
            elif self.masking and rng.random() < self.masking:
                word = self.mask_token
            out.append(word)
        return out or words[:1]  # never an empty view


class _DocumentViews(Dataset):
    """One training example per document of a corpus (the BEIR corpus, or a plain text/JSONL file)."""

    needs_qrels = False  # label-free: a data set without training judgements will do
    takes_negatives = False  # both sides come from one document: a mined negatives file has no place

    def __init__(self, dataset: BeirDataset, qrels: Qrels | None = None, group_size: int = 1, seed: int = 0,
                 corpus: str | None = None, augmentation: Augmentation | dict | None = None, min_words: int = 8):
        if group_size != 1:
            raise ConfigError("pairs made from documents need negatives.group_size=1 (in-batch or MoCo negatives).")
        docs = load_plain_corpus(corpus) if corpus else dataset.corpus
        self.doc_ids = [d for d in docs if len(docs[d].full_text.split()) >= min_words]
        if not self.doc_ids:
            raise DataError(f"no document of {corpus or dataset.path} has the {min_words} words a pair needs.")
        self.docs, self.seed, self.epoch = docs, seed, 0
        self.augmentation = Augmentation(**augmentation) if isinstance(augmentation, Mapping) else augmentation
        self._vocabulary: list[str] | None = None

    def vocabulary(self) -> list[str]:
        if self._vocabulary is None:  # built on first use: only replacement needs it
            self._vocabulary = sorted({w for d in self.doc_ids[:2000] for w in self.docs[d].full_text.split()})
        return self._vocabulary

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.doc_ids)

    def views(self, doc: Document, rng: random.Random) -> tuple[list[str], list[str]]:
        raise NotImplementedError

    def __getitem__(self, index: int) -> dict:
        rng = random.Random(hash((self.seed, self.epoch, index)))
        doc_id = self.doc_ids[index]
        query, key = self.views(self.docs[doc_id], rng)
        if self.augmentation is not None:
            query = self.augmentation(query, rng, self.vocabulary())
            key = self.augmentation(key, rng, self.vocabulary())
        return {"qid": doc_id, "query": " ".join(query), "doc_ids": [doc_id], "docs": [" ".join(key)],
                "positives": {doc_id}}


def random_span(words: list[str], min_ratio: float, max_ratio: float, rng: random.Random) -> list[str]:
    """A contiguous span whose length is a uniform random fraction in [min_ratio, max_ratio] of the words."""
    length = min(len(words), max(1, round(len(words) * rng.uniform(min_ratio, max_ratio))))
    start = rng.randint(0, len(words) - length)
    return words[start:start + length]


class CroppingPairs(_DocumentViews):
    """Independent cropping (Izacard et al., 2021, Contriever): two spans drawn independently from one document,
    each of a random fraction of its words; they may overlap."""

    def __init__(self, dataset, qrels=None, group_size: int = 1, seed: int = 0, min_ratio: float = 0.1,
                 max_ratio: float = 0.5, **kwargs):
        if not 0.0 < min_ratio <= max_ratio <= 1.0:
            raise ConfigError(f"pairs.min_ratio and pairs.max_ratio need 0 < min_ratio <= max_ratio <= 1, "
                              f"got {min_ratio} and {max_ratio}.")
        super().__init__(dataset, qrels, group_size, seed, **kwargs)
        self.min_ratio, self.max_ratio = min_ratio, max_ratio

    def views(self, doc, rng):
        words = doc.full_text.split()
        return (random_span(words, self.min_ratio, self.max_ratio, rng),
                random_span(words, self.min_ratio, self.max_ratio, rng))


SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


class ICTPairs(_DocumentViews):
    """Inverse cloze task (Lee et al., 2019): one sentence is the query, the rest of the passage (with its title)
    the key; with probability ``keep_query`` the sentence stays in the key."""

    def __init__(self, dataset, qrels=None, group_size: int = 1, seed: int = 0, keep_query: float = 0.1, **kwargs):
        if not 0.0 <= keep_query <= 1.0:
            raise ConfigError(f"pairs.keep_query must lie in [0, 1], got {keep_query}.")
        super().__init__(dataset, qrels, group_size, seed, **kwargs)
        self.keep_query = keep_query

    def views(self, doc, rng):
        sentences = [s for s in SENTENCE_END.split(doc.text.strip()) if s]
        pick = rng.randrange(len(sentences)) if sentences else 0
        query = sentences[pick] if sentences else doc.title
        keep = rng.random() < self.keep_query or len(sentences) < 2
        rest = sentences if keep else sentences[:pick] + sentences[pick + 1:]
        key = " ".join(([doc.title] if doc.title else []) + rest)
        return query.split(), key.split()


def load_plain_corpus(path: str | Path) -> dict[str, Document]:
    """A corpus for unsupervised pairs: BEIR-style ``.jsonl`` or plain text with one document per line."""
    path = Path(path)
    if path.suffix == ".jsonl":
        return load_corpus(path)
    if not path.is_file():
        raise DataError(f"corpus file {path} not found.")
    docs = {f"line{lineno}": Document("", line.strip()) for lineno, line in read_lines(path) if line.strip()}
    if not docs:
        raise DataError(f"{path} holds no documents.")
    return docs
