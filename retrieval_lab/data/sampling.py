"""Topic-aware batch composition (TAS) and balanced margin sampling (TAS-B).

Hofstätter et al. (2021), "Efficiently Teaching an Effective Dense Retriever with Balanced Topic Aware
Sampling". TAS clusters the training queries (k-means over query embeddings) and draws every batch from a few
clusters, so in-batch negatives share a topic. TAS-B also balances the (positive, negative) pair of each
query over margin bins of teacher scores, so that easy (high-margin) pairs do not dominate.
"""
from __future__ import annotations

import random
from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import Sampler

from retrieval_lab.errors import ConfigError
from retrieval_lab.distributed import distributed_rank_world


def cluster_embeddings(embeddings: np.ndarray, k: int, seed: int = 0, min_size: int = 1) -> np.ndarray:
    """Spherical k-means (faiss) over L2-normalised embeddings; returns the cluster of each row.

    Members of clusters smaller than ``min_size`` move to the nearest centroid of a large enough cluster, so a
    batch can always take its share from any cluster (small data sets then end with fewer than k clusters).
    """
    import faiss

    if not 1 <= k <= len(embeddings):
        raise ConfigError(f"negatives.clusters={k} must lie between 1 and the number of training queries "
                          f"({len(embeddings)}).")
    if min_size > len(embeddings):
        raise ConfigError(f"a batch share of {min_size} queries exceeds the {len(embeddings)} training queries.")
    x = np.ascontiguousarray(embeddings, dtype=np.float32)
    faiss.normalize_L2(x)
    kmeans = faiss.Kmeans(x.shape[1], k, niter=25, seed=seed, spherical=True, min_points_per_centroid=1,
                          max_points_per_centroid=1 << 20, verbose=False)
    kmeans.train(x)
    similarity = x @ kmeans.centroids.T
    labels = similarity.argmax(1)
    while True:
        sizes = np.bincount(labels, minlength=k)
        small = [c for c in range(k) if 0 < sizes[c] < min_size]
        if not small:
            return labels
        smallest = min(small, key=lambda c: sizes[c])  # dissolve the smallest cluster, then look again
        similarity[:, smallest] = -np.inf
        labels = np.where(labels == smallest, similarity.argmax(1), labels)


class EpochSampler(Sampler[int]):
    """A shuffle fixed by (seed, epoch). Lightning calls ``set_epoch`` before every epoch; the dataset hears it
    too, so its per-example draws (positives, negatives, crops) change with the epoch and stay reproducible.
    Under torch.distributed every process draws the same shuffle and takes its share (every world-th example
    from its rank on, the same number in each process), so the Trainer must not add a DistributedSampler
    (``use_distributed_sampler=False``; ``RetrievalDataModule`` checks)."""

    def __init__(self, dataset, seed: int = 0):
        self.dataset, self.seed, self.epoch = dataset, seed, 0
        self.skip = 0  # examples of this process's share of the next epoch to leave out once (resuming mid-epoch)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.dataset) // distributed_rank_world()[1]

    def __iter__(self):
        rank, world = distributed_rank_world()
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(len(self.dataset), generator=generator).tolist()[rank::world][:len(self)]
        order, self.skip = order[self.skip:], 0
        return iter(order)


def share_of(batch_size: int, clusters_per_batch: int) -> int:
    """The most examples a batch takes from one cluster."""
    return -(-batch_size // clusters_per_batch)


class ClusterBatchSampler(Sampler[list[int]]):
    """Every batch takes its examples from ``clusters_per_batch`` distinct clusters, an equal share from each.

    Clusters are drawn with probability proportional to their size; each cluster hands out its members in a
    fresh seeded order and starts over when used up, so no example repeats within a batch. An epoch has
    ``len(dataset) // batch_size`` batches; under torch.distributed every process draws the same sequence and
    takes every world-th batch from its rank on. Every cluster must hold at least one share
    (``cluster_embeddings`` with ``min_size`` makes sure of it).
    """

    def __init__(self, dataset, clusters: Sequence[int], batch_size: int, clusters_per_batch: int = 1, seed: int = 0):
        self.sampler = EpochSampler(dataset, seed)  # what Lightning calls set_epoch on
        self.skip = 0  # batches of the next epoch to leave out once (resuming mid-epoch)
        self.batch_size, self.per_batch, self.seed = batch_size, clusters_per_batch, seed
        self.use_clusters(clusters)

    def use_clusters(self, clusters: Sequence[int]) -> None:
        self.clusters = np.asarray(clusters)
        members: dict[int, list[int]] = {}
        for index, cluster in enumerate(self.clusters.tolist()):
            members.setdefault(cluster, []).append(index)
        self.members = members
        if self.per_batch > len(members):
            raise ConfigError(f"negatives.clusters_per_batch={self.per_batch} exceeds the {len(members)} "
                              f"query clusters.")
        if any(len(m) < share_of(self.batch_size, self.per_batch) for m in members.values()):
            raise ConfigError(f"a query cluster has fewer than the {share_of(self.batch_size, self.per_batch)} "
                              f"members a batch takes from it; cluster with min_size set (see cluster_embeddings).")

    def take_first_process_clusters(self, first: Sequence[int]) -> int:
        """Under torch.distributed, use process 0's clusters (``first``); returns how many queries this process had
        put in another cluster. Every process clusters its own encodings before the process group exists, and the
        batches are only shared out right if all draw the same sequence: encodings that differ in their last bits
        (another GPU, another kernel) can move a query, and k-means amplifies it."""
        first = np.asarray(first)
        moved = len(first) if len(first) != len(self.clusters) else int((first != self.clusters).sum())
        if moved:
            print(f"TAS: process {distributed_rank_world()[0]} had {moved} of {len(first)} training queries in other "
                  f"clusters than process 0; every process uses process 0's clusters.")
            self.use_clusters(first)
        return moved

    def __len__(self) -> int:
        return len(self.clusters) // self.batch_size // distributed_rank_world()[1]  # this process's batches

    def __iter__(self):
        rank, world = distributed_rank_world()
        rng = random.Random(self.seed * 1_000_003 + self.sampler.epoch)  # the same in every process and run
        streams = {c: [] for c in self.members}
        ids = sorted(self.members)
        weights = [len(self.members[c]) for c in ids]
        skip, self.skip = self.skip, 0
        for number in range(len(self) * world):
            chosen: list[int] = []
            while len(chosen) < self.per_batch:  # distinct clusters, size-weighted
                c = rng.choices(ids, weights)[0]
                if c not in chosen:
                    chosen.append(c)
            batch = []
            for slot, c in enumerate(chosen):
                share = self.batch_size // self.per_batch + (slot < self.batch_size % self.per_batch)
                if len(streams[c]) < share:  # start the cluster over in a new order
                    fresh = self.members[c][:]
                    rng.shuffle(fresh)
                    streams[c] = [i for i in streams[c]] + [i for i in fresh if i not in streams[c]]
                batch.extend(streams[c][:share])
                streams[c] = streams[c][share:]
            # every batch is drawn in every process (the later ones then do not change), each yields its own
            if number % world == rank and number // world >= skip:
                yield batch


def balanced_pair(pairs: list[tuple[str, str, float]], bins: int, rng: random.Random) -> tuple[str, str]:
    """TAS-B: pick a (positive, negative) pair so that every margin bin is equally likely.

    ``pairs`` holds (positive, negative, teacher margin); the margins' range is cut into ``bins`` equal-width
    bins, a non-empty bin is drawn uniformly, then a pair uniformly inside it.
    """
    margins = [m for _, _, m in pairs]
    low, high = min(margins), max(margins)
    width = (high - low) / bins or 1.0
    by_bin: dict[int, list[tuple[str, str]]] = {}
    for pos, neg, margin in pairs:
        by_bin.setdefault(min(bins - 1, int((margin - low) / width)), []).append((pos, neg))
    chosen = by_bin[rng.choice(sorted(by_bin))]
    return rng.choice(chosen)
