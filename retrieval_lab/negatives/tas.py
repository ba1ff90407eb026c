"""TAS (Hofstätter et al., 2021): every batch draws its queries from a few query clusters (k-means over the
embeddings of the model about to be trained, ``Tas.batch_sampler``); groups = positive + mined
negatives, as in DPR. TAS-B adds each query's (positive, negative) pair drawn uniformly over margin bins of the
file's teacher scores."""
from __future__ import annotations

from retrieval_lab.errors import ConfigError
from retrieval_lab.negatives.ance import BINS_WHY
from retrieval_lab.negatives.base import refuse
from retrieval_lab.negatives.mined import MinedFile


class Tas(MinedFile):
    option = "tas"
    needs = frozenset({"vector", "vectors"})  # k-means over query embeddings (several vectors per query: their mean)
    why = {"vector": "TAS clustering needs a bi-encoder's embeddings."}

    def __init__(self, group_size: int = 2, file: str | None = None, clusters: int = 8, clusters_per_batch: int = 2,
                 module=None):
        super().__init__(group_size, file, module)
        self.clusters, self.clusters_per_batch = clusters, clusters_per_batch

    def check(self, cfg, loss, module_class, family_class) -> None:
        if self.clusters is None or self.clusters < 1:
            refuse("negatives.clusters", self.clusters, "must be at least 1.")
        if self.clusters_per_batch is None or not 1 <= self.clusters_per_batch <= cfg.batch_size:
            refuse("negatives.clusters_per_batch", self.clusters_per_batch, "must lie between 1 and batch_size.")

    def batch_sampler(self, train_set, encoder, batch_size: int, seed: int):
        """Cluster the training queries with ``encoder`` (the model about to be trained) and compose batches by
        cluster."""
        import numpy as np

        from retrieval_lab.data.sampling import ClusterBatchSampler, cluster_embeddings, share_of
        from retrieval_lab.models import representation
        from retrieval_lab.retrieval.encoding import encode_texts

        texts = [train_set.dataset.queries[q] for q in train_set.qids]
        # several vectors per query (ColBERT's tokens, a Poly-encoder's codes): their mean, 8,192 queries at a time
        embeddings = np.concatenate([
            representation.pooled(encode_texts(encoder, texts[start:start + 8192], "query",
                                               desc=f"encode queries for TAS clusters ({start}/{len(texts)})"))
            for start in range(0, len(texts), 8192)])
        labels = cluster_embeddings(embeddings, self.clusters, seed,
                                    min_size=share_of(batch_size, self.clusters_per_batch))
        sizes = np.bincount(labels)
        print(f"TAS: {len(texts)} training queries in {(sizes > 0).sum()} clusters "
              f"(sizes {sizes[sizes > 0].min()}-{sizes.max()}), {self.clusters_per_batch} per batch")
        return ClusterBatchSampler(train_set, labels, batch_size, self.clusters_per_batch, seed)


class TasB(Tas):
    option = "tasb"

    def __init__(self, group_size: int = 2, file: str | None = None, clusters: int = 8, clusters_per_batch: int = 2,
                 balanced_bins: int | None = 10, module=None, refresh: dict | None = None):
        super().__init__(group_size, file, clusters, clusters_per_batch, module)
        self.balanced_bins, self.refresh = balanced_bins, refresh

    def check(self, cfg, loss, module_class, family_class) -> None:
        super().check(cfg, loss, module_class, family_class)
        if self.refresh and self.balanced_bins:  # ANCE's re-mining cannot be added to TAS-B
            refuse("negatives.balanced_bins", self.balanced_bins, BINS_WHY)
        if self.refresh:
            raise ConfigError("negatives.refresh re-mines negatives under negatives=ance only: negatives=tasb would "
                              "ignore it.")

    def dataset_extras(self, dataset, qrels) -> dict:
        extras = super().dataset_extras(dataset, qrels)
        return {**extras, "balanced_bins": self.balanced_bins} if self.balanced_bins else extras
