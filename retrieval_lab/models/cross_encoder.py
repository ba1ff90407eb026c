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
from torch import nn
from tqdm.auto import tqdm

from retrieval_lab.errors import ConfigError
from retrieval_lab.models.biencoder import BiEncoderModule
from retrieval_lab.models.encoder import _from_pretrained, load_tokenizer


class CrossEncoder(nn.Module):
    def __init__(self, name_or_path: str = "packaged:minilm", max_length: int = 320, random_init: dict | None = None):
        super().__init__()
        from transformers import AutoConfig, AutoModelForSequenceClassification

        self.name_or_path, self.max_length = str(name_or_path), max_length
        config = _from_pretrained(AutoConfig, self.name_or_path, "the config of model")
        config.num_labels = 1
        if random_init is None:
            from transformers.utils import logging as hf_logging

            level = hf_logging.get_verbosity()
            hf_logging.set_verbosity_error()  # a bi-encoder checkpoint has no classifier head: it starts random
            try:
                self.model = _from_pretrained(AutoModelForSequenceClassification, self.name_or_path, "model",
                                              config=config)
            finally:
                hf_logging.set_verbosity(level)
        else:
            for key, value in dict(random_init).items():
                if not hasattr(config, key):
                    raise ConfigError(f"random_init.{key} is not a field of the {config.model_type} config.")
                setattr(config, key, value)
            self.model = AutoModelForSequenceClassification.from_config(config)
        self.tokenizer = load_tokenizer(self.name_or_path)
        self.train()

    def tokenize(self, queries: list[str], docs: list[str]):
        return self.tokenizer(queries, docs, padding=True, truncation="only_second", max_length=self.max_length,
                              return_tensors="pt")

    def forward(self, inputs) -> torch.Tensor:
        """One score per (query, document) pair."""
        inputs = {k: v for k, v in inputs.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        return self.model(**inputs).logits.squeeze(-1)

    @torch.inference_mode()
    def score(self, queries: list[str], docs: list[str], batch_size: int = 64, device=None,
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

    def retriever(self, batch_size: int = 128, index: str = "flat", device: str | None = None, progress: bool = True,
                  shard: bool = False):
        """Validation and test evaluation re-rank BM25's top ``rerank_depth`` (whole on every process: ``shard``
        is ignored)."""
        from retrieval_lab.retrieval.bm25 import BM25Retriever
        from retrieval_lab.retrieval.rerank import Reranker

        return Reranker(BM25Retriever(k1=1.5), self.encoder, self.rerank_depth, batch_size, device, progress)

    def forward(self, batch: dict) -> torch.Tensor:
        return self.encoder(batch["pairs"]).view(-1, self.group_size)

    def towers(self, batch: dict) -> list[tuple]:
        return [(self.encoder, batch["pairs"])]

    def loss_from_embeddings(self, embeddings: list[torch.Tensor], batch: dict) -> torch.Tensor:
        logits = embeddings[0].view(-1, self.group_size).float()
        return F.cross_entropy(logits, torch.zeros(logits.size(0), dtype=torch.long, device=logits.device))
