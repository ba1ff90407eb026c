"""TAS batches come from the configured number of clusters; TAS-B pair choice is uniform over margin bins."""
from __future__ import annotations

import random
from collections import Counter

import numpy as np
import pytest
from scipy.stats import chisquare

from retrieval_lab.data.sampling import ClusterBatchSampler, balanced_pair, cluster_embeddings
from retrieval_lab.errors import ConfigError


class Dummy:
    def __init__(self, n):
        self.n, self.epoch = n, 0

    def __len__(self):
        return self.n

    def set_epoch(self, epoch):
        self.epoch = epoch


@pytest.mark.parametrize("per_batch", [1, 2, 3])
def test_every_batch_draws_from_the_configured_number_of_clusters(per_batch):
    rng = np.random.default_rng(0)
    clusters = rng.integers(0, 6, size=300)
    sampler = ClusterBatchSampler(Dummy(300), clusters, batch_size=12, clusters_per_batch=per_batch, seed=1)
    batches = list(sampler)
    assert len(batches) == 300 // 12
    for batch in batches:
        assert len(batch) == 12 and len(set(batch)) == 12
        counts = Counter(clusters[batch].tolist())
        assert len(counts) == per_batch and set(counts.values()) <= {12 // per_batch, -(-12 // per_batch)}
    sampler.sampler.set_epoch(1)
    assert list(sampler) != batches  # a new epoch, a new order
    sampler.sampler.set_epoch(0)
    assert list(sampler) == batches  # and the same seed and epoch give the same batches


def test_taking_the_first_processs_clusters_counts_the_queries_moved_and_draws_its_batches(capsys):
    first = np.arange(60) % 3
    own = first.copy()
    own[[4, 7]] = 2  # two queries in another cluster here (moved from 1 and 1)
    sampler = ClusterBatchSampler(Dummy(60), own, batch_size=6, clusters_per_batch=2, seed=3)
    assert sampler.take_first_process_clusters(first.tolist()) == 2
    assert "process 0 had 2 of 60 training queries in other clusters than process 0" in capsys.readouterr().out
    assert list(sampler) == list(ClusterBatchSampler(Dummy(60), first, batch_size=6, clusters_per_batch=2, seed=3))
    assert sampler.take_first_process_clusters(first.tolist()) == 0 and capsys.readouterr().out == ""


def test_clusters_below_one_share_are_merged_into_their_neighbours():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(5, 8))
    sizes = [40, 40, 40, 3, 2]
    x = np.concatenate([c + 0.05 * rng.normal(size=(n, 8)) for c, n in zip(centres, sizes)])
    for min_size, most_clusters in ((10, 5), (30, 4), (60, 2)):
        labels = cluster_embeddings(x, k=5, seed=0, min_size=min_size)
        sizes = np.bincount(labels)
        assert sizes[sizes > 0].min() >= min_size and (sizes > 0).sum() <= most_clusters
    with pytest.raises(ConfigError, match="negatives.clusters=500"):
        cluster_embeddings(x, k=500)


def test_balanced_pair_is_uniform_over_margin_bins():
    rng = random.Random(1234)
    # margins crowd into the easy end: 90 pairs in bin 0-ish, few elsewhere; 4 bins over [0, 4)
    pairs = [("p", f"easy{i}", 0.1 + 0.001 * i) for i in range(90)]
    pairs += [("p", "m1", 1.5), ("p", "m2", 2.2), ("p", "m3", 2.9), ("p", "hard", 4.0)]
    edges = {"easy": 0, "m1": 1, "m2": 2, "m3": 2, "hard": 3}
    counts = Counter()
    for _ in range(8000):
        _, neg = balanced_pair(pairs, bins=4, rng=rng)
        counts[edges["easy" if neg.startswith("easy") else neg]] += 1
    observed = [counts[b] for b in range(4)]
    assert chisquare(observed).pvalue > 0.01  # uniform over the 4 bins
    assert counts[0] < 8000 * 0.3  # while uniform over pairs would give bin 0 over 95%


def test_tas_batches_are_the_same_in_every_process():
    """The batch sequence follows the seed and epoch alone, not Python's per-process string hashing: two
    interpreters with different hash seeds (as two runs, or two DDP processes) draw the same batches."""
    import os
    import subprocess
    import sys

    code = ("import numpy as np; from retrieval_lab.data.sampling import ClusterBatchSampler\n"
            "class D:\n    def __len__(self): return 60\n"
            "print(list(ClusterBatchSampler(D(), np.arange(60) % 3, batch_size=6, clusters_per_batch=2, seed=1))[:3])")
    outputs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                              env={**os.environ, "PYTHONHASHSEED": seed}).stdout for seed in ("1", "2", "3")}
    assert len(outputs) == 1 and outputs.pop().startswith("[[")


@pytest.mark.parametrize("tas", [False, True])
def test_processes_take_disjoint_equal_shares_and_skip_their_own_batches(tas, monkeypatch):
    """Under DDP (2 processes, mocked) each process takes its share of one shuffle (or of one TAS batch sequence):
    the shares interleave the one-process order, do not overlap and have the same length; resuming mid-epoch skips
    a process's own first batches."""
    from retrieval_lab.data import sampling
    from retrieval_lab.data.sampling import EpochSampler

    def make():
        if tas:  # 61 queries in 4 clusters, batches of 4 from 2 clusters
            return ClusterBatchSampler(Dummy(61), np.arange(61) % 4, batch_size=4, clusters_per_batch=2, seed=3)
        return EpochSampler(Dummy(61), seed=3)

    whole = list(make())  # one process: 15 TAS batches, or a shuffle of the 61 examples
    shares = []
    for rank in (0, 1):
        monkeypatch.setattr(sampling, "distributed_rank_world", lambda rank=rank: (rank, 2))
        sampler = make()
        share = list(sampler)
        assert len(sampler) == len(share) == (7 if tas else 30)  # 15 // 2 batches, 61 // 2 examples
        assert share == whole[rank::2][:len(share)]
        sampler.skip = 2 if tas else 2 * 4  # two batches (of 4 examples) done before the resume
        assert list(sampler) == share[2 if tas else 8:]
        shares.append(share)
    if not tas:  # a shuffle: no example in both shares
        assert not set(shares[0]) & set(shares[1])


def test_a_trainer_that_would_shard_the_examples_again_is_refused():
    """Our samplers share the examples out under DDP; a Trainer that also adds a DistributedSampler would give
    each process a quarter of them (with 2 processes), so the data module refuses it."""
    from types import SimpleNamespace

    from retrieval_lab.data.datamodule import RetrievalDataModule

    def trainer(world_size, use_distributed_sampler):
        return SimpleNamespace(world_size=world_size,
                               _accelerator_connector=SimpleNamespace(use_distributed_sampler=use_distributed_sampler))

    data = RetrievalDataModule(Dummy(8), collator=None, batch_size=2)
    for world_size, flag in ((1, True), (2, False)):  # one process, or a Trainer that leaves sampling to us
        data.trainer = trainer(world_size, flag)
        assert len(data.train_dataloader()) == 4
    data.trainer = trainer(2, True)
    with pytest.raises(ConfigError, match="use_distributed_sampler=false"):
        data.train_dataloader()
