"""The cross-encoder (BERT_CAT, Nogueira & Cho, 2019; the teacher of Hofstätter et al., 2020):
``[CLS] query [SEP] document [SEP]`` through one transformer, a linear head on [CLS] gives the score.

``CrossEncoder`` is the model (a Hugging Face sequence-classification model with one label, so a saved folder
also loads in transformers and in sentence-transformers' CrossEncoder). ``CrossEncoderModule`` trains it on the
DataModule's groups: softmax cross-entropy over (positive, negatives) of each query, the positive first.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from retrieval_lab.errors import ConfigError, warn
from retrieval_lab.losses.infonce import InfoNCELoss
from retrieval_lab.models.biencoder import BiEncoderModule
from retrieval_lab.models.encoder import (_from_pretrained, is_pooler, load_tokenizer, load_weights,
                                          refuse_longer_than_positions, refuse_new_weights, require_whole)
from retrieval_lab.models.family import ModelFamily


def require_trained_head(cross_encoder: "CrossEncoder", key: str) -> None:
    """Refuse to score with a cross-encoder whose score head starts at random (a base or bi-encoder model): its
    re-ranking, teacher scores or denoising would be noise reported as results. ``key`` names the setting."""
    if getattr(cross_encoder, "random_head", False):
        raise ConfigError(f"{key}={cross_encoder.name_or_path} has no trained score head (a new one would start at "
                          f"random), so its scores would mean nothing; give a cross-encoder trained with "
                          f"module=cross_encoder (its <run dir>/model).")


class CrossEncoder(ModelFamily):
    """The family that scores (query, document) pairs jointly: ``forward`` gives one score per pair,
    ``score_groups`` arranges them by query; it retrieves by re-ranking BM25's top documents."""

    doc_representation = "pairs"
    blocks = frozenset({"groups"})

    def __init__(self, name_or_path: str = "packaged:minilm", max_length: int = 320, random_init: dict | None = None):
        """A saved cross-encoder, or any encoder (a bi-encoder, a base model) whose score head then starts at random
        (``random_head``, told in one warning); a model any of whose encoder weights would start at random is
        refused. ``max_length`` is a positive whole number."""
        super().__init__()
        from transformers import AutoConfig, AutoModelForSequenceClassification

        require_whole("the cross-encoder's max_length", max_length)
        self.name_or_path, self.max_length = str(name_or_path), max_length
        self.tokenizer = load_tokenizer(self.name_or_path)
        config = _from_pretrained(AutoConfig, self.name_or_path, "the config of model")
        config.num_labels = 1
        self.random_head = True
        if random_init is None:
            self.model, new = load_weights(AutoModelForSequenceClassification, self.name_or_path, config=config)
            # the encoder's weights lie under base_model_prefix; the rest (and a BERT pooler) are the score head
            prefix = f"{self.model.base_model_prefix}." if self.model.base_model is not self.model else ""
            refuse_new_weights(self.name_or_path, [k for k in new if k.startswith(prefix) and not is_pooler(k)],
                               "encoder")
            self.random_head = bool(new)
            if new:
                warn(f"model '{self.name_or_path}' has no score head that fits a cross-encoder: a new one starts at "
                     f"random ({', '.join(new)}), so its scores mean nothing until it is trained.")
        else:
            for key, value in dict(random_init).items():
                if not hasattr(config, key):
                    raise ConfigError(f"random_init.{key} is not a field of the {config.model_type} config.")
                setattr(config, key, value)
            self.model = AutoModelForSequenceClassification.from_config(config)
        self.train()

    def tokenize(self, queries: list[str], docs: list[str]):
        return self.tokenizer(queries, docs, padding=True, truncation="only_second", max_length=self.max_length,
                              return_tensors="pt")

    def forward(self, inputs) -> torch.Tensor:
        """One score per (query, document) pair."""
        inputs = {k: v for k, v in inputs.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        refuse_longer_than_positions(self.model, self.name_or_path, {"the cross-encoder's max_length":
                                                                     inputs["input_ids"].shape[1]}, tokens="batch")
        return self.model(**inputs).logits.squeeze(-1)

    def score_groups(self, q, d, group_size: int, rows: torch.Tensor | None = None) -> torch.Tensor:
        """R x G: the pair scores ``q`` (one per group entry, as ``forward`` gives them; ``d`` unused) by query."""
        groups = q.view(-1, group_size).float()
        return groups if rows is None else groups[rows]

    def retriever(self, batch_size: int = 128, index: str | None = None, device: str | None = None,
                  progress: bool = True, shard: bool = False, index_settings: dict | None = None, depth: int = 100):
        """Re-rank BM25's top ``depth`` (whole on every process: ``shard`` and the index are ignored)."""
        from retrieval_lab.retrieval.bm25 import BM25Retriever
        from retrieval_lab.retrieval.rerank import Reranker

        return Reranker(BM25Retriever(k1=1.5), self, depth, batch_size, device, progress)

    @torch.inference_mode()
    def score_texts(self, queries: list[str], docs: list[str], batch_size: int = 64, device=None,
                    progress: bool = True) -> list[float]:
        """Scores of many pairs, in input order (batches of similar length, no graph, bf16 on GPU)."""
        device = torch.device(device) if device else next(self.parameters()).device
        order = sorted(range(len(docs)), key=lambda i: -len(docs[i]) - len(queries[i]))
        out = [0.0] * len(docs)
        was_training = self.training
        self.eval()
        try:
            for start in tqdm(range(0, len(order), batch_size), desc="cross-encoder", unit="batch",
                              disable=not progress, leave=False):
                idx = order[start:start + batch_size]
                inputs = self.tokenize([queries[i] for i in idx], [docs[i] for i in idx]).to(device)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                    scores = self(inputs).float().cpu().tolist()
                for i, s in zip(idx, scores):
                    out[i] = s
        finally:
            self.train(was_training)
        return out

    def save(self, folder: str | Path) -> Path:
        folder = Path(folder)
        self.model.save_pretrained(folder)
        self.tokenizer.save_pretrained(folder)
        return folder


class CrossEncoderModule(BiEncoderModule):
    """Trains a CrossEncoder: each query's group (positive first) scored jointly, cross-entropy on the positive.
    Shares the optimiser and schedule of the bi-encoder; ``loss`` is not used (the objective is fixed)."""

    uses_towers = False
    gather_negatives = False
    needs = frozenset({"hard_negatives"})
    families = frozenset({"pairs"})
    option = "cross_encoder"
    # the objective is fixed: the loss is not used, and only the config's default loss (InfoNCE), which nobody
    # chose, is taken without a word
    takes_loss = False
    ignored_loss = InfoNCELoss
    fixed_negatives = True

    def __init__(self, encoder: CrossEncoder, loss=None, group_size: int = 2, rerank_depth: int = 100, **kwargs):
        if not isinstance(encoder, CrossEncoder):
            raise ConfigError("module=cross_encoder trains a cross-encoder: set model=cross_encoder.")
        if group_size < 2:
            raise ConfigError("module=cross_encoder needs negatives: negatives.group_size >= 2 and a negatives file.")
        super().__init__(encoder, None, group_size, **kwargs)
        self.rerank_depth = rerank_depth

    @property
    def pair_tokenizer(self):
        return self.encoder.tokenizer, self.encoder.max_length

    def retriever(self, batch_size: int = 128, index: str | None = None, device: str | None = None,
                  progress: bool = True, shard: bool = False, index_settings: dict | None = None):
        """Validation and test evaluation re-rank BM25's top ``rerank_depth``."""
        return self.encoder.retriever(batch_size, index, device, progress, shard, depth=self.rerank_depth)

    def forward(self, batch: dict) -> torch.Tensor:
        return self.encoder(batch["pairs"]).view(-1, self.group_size)

    def towers(self, batch: dict) -> list[tuple]:
        return [(self.encoder, batch["pairs"])]

    def loss_from_embeddings(self, embeddings: list[torch.Tensor], batch: dict) -> torch.Tensor:
        logits = self.encoder.score_groups(embeddings[0], None, self.group_size)
        return F.cross_entropy(logits, torch.zeros(logits.size(0), dtype=torch.long, device=logits.device))
