"""RocketQA-v2 dynamic listwise distillation (Ren et al., 2021, "RocketQAv2: A Joint Training Method for Dense
Passage Retrieval and Passage Re-ranking").

The retriever (bi-encoder) and the re-ranker (cross-encoder) are trained together on the same groups (positive
first, then hard negatives). For query i the ranker's scores R_i over its group define the target distribution;
the retriever learns from the configured teacher loss (``loss=listwise_kl``: KL(softmax(R_i) || softmax(S_i / tau))
with S_ig = q_i . d_{i,g}), and the ranker from supervised cross-entropy on the positive:

    L = L_KL(R.detach(), S) + L_CE(R, positive)

so the teacher moves with the training ("dynamic") but is taught by labels only. This differs from the paper in
two ways. There the KL term also trains the re-ranker (both models learn from L_KL + L_sup, "joint training");
detaching the ranker keeps it from drifting towards an untrained retriever's scores. And the paper's KL runs the
other way, KL(retriever || ranker) = sum_g s_ig log(s_ig / r_ig); with the ranker a fixed target in each step, the
distillation direction KL(ranker || retriever) is used here (the retriever must cover every document the ranker
finds relevant, rather than pick one of them).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from retrieval_lab.errors import ConfigError
from retrieval_lab.models.biencoder import BiEncoderModule
from retrieval_lab.models.cross_encoder import CrossEncoder


class RocketQAModule(BiEncoderModule):
    provides = frozenset({"teacher"})  # the teacher scores are the ranker's, computed in each step
    needs = frozenset({"hard_negatives"})
    loss_needs = frozenset({"teacher"})  # the loss distils the ranker's scores
    option = "rocketqa"
    loss_refusal = ("module=rocketqa distils the ranker into the retriever: use loss=listwise_kl (or another teacher "
                    "loss such as margin_mse).")
    gather_negatives = False

    def __init__(self, encoder, loss, cross_encoder: CrossEncoder, group_size: int = 2, **kwargs):
        if group_size < 2:
            raise ConfigError("module=rocketqa needs hard negatives: negatives.group_size >= 2 and a negatives file.")
        if "teacher" not in loss.needs:
            raise ConfigError(self.loss_refusal)
        super().__init__(encoder, loss, group_size, **kwargs)
        self.cross_encoder = cross_encoder

    @property
    def pair_tokenizer(self):
        return self.cross_encoder.tokenizer, self.cross_encoder.max_length

    def towers(self, batch: dict) -> list[tuple]:
        return [*super().towers(batch), (self.cross_encoder, batch["pairs"])]

    def loss_from_embeddings(self, embeddings: list[torch.Tensor], batch: dict) -> torch.Tensor:
        q, d, scores = embeddings
        ranker = self.cross_encoder.score_groups(scores, None, self.group_size)
        retriever_loss = self.loss(self.encoder.score_blocks(q, d, self.group_size, self.loss.blocks,
                                                             mask=batch.get("mask"), teacher=ranker.detach()))
        ranker_loss = F.cross_entropy(ranker, torch.zeros(len(q), dtype=torch.long, device=ranker.device))
        self.log_dict({"train/retriever_loss": retriever_loss.detach(), "train/ranker_loss": ranker_loss.detach()},
                      batch_size=len(q))
        return retriever_loss + ranker_loss
