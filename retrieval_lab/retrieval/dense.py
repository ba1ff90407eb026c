"""Dense retrieval: encode texts (tokenised once, cached, in length-sorted batches), then search a faiss
inner-product index."""
from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch
from tqdm.auto import tqdm

from retrieval_lab.data.beir import Document
from retrieval_lab.errors import ConfigError


def pick_device(device: str | None) -> str | None:
    """``auto``: the GPU when there is one, else the CPU; anything else as given."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


class TokenCache:
    """Tokenised texts kept between encodings, so tokenisation leaves the critical path: a corpus is tokenised
    once, in one batched call of the fast tokenizer (which uses every core), and every later encoding of the
    same texts (each validation, each ANCE refresh, the final evaluation) only pads and runs the model.
    Keyed by the tokenizer, the maximum length and the texts themselves; holds the ``size`` newest entries."""

    def __init__(self, size: int = 4):
        self.size, self.entries, self.misses = size, OrderedDict(), 0

    def get(self, tokenizer, texts: list[str], max_length: int) -> list[list[int]]:
        key = (id(tokenizer), max_length, len(texts), hash(tuple(texts)))
        if key in self.entries:
            self.entries.move_to_end(key)
            return self.entries[key]
        self.misses += 1
        ids = tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
        self.entries[key] = ids
        while len(self.entries) > self.size:
            self.entries.popitem(last=False)
        return ids


TOKEN_CACHE = TokenCache()


def token_batches(lengths: list[int], batch_size: int, token_budget: int | None) -> list[np.ndarray]:
    """Indices grouped longest first: ``batch_size`` texts a batch or, with ``token_budget``, as many as fit in
    that many tokens once padded (short texts travel in larger batches)."""
    order = np.argsort(lengths, kind="stable")[::-1]
    batches, start = [], 0
    while start < len(order):  # sorted: the first text of a batch is its longest
        size = max(1, token_budget // max(1, lengths[order[start]])) if token_budget else batch_size
        batches.append(order[start:start + size])
        start += size
    return batches


@torch.inference_mode()
def encode_texts(encoder, texts: list[str], side: str, batch_size: int = 128, device: str | torch.device | None = None,
                 progress: bool = True, desc: str | None = None, token_budget: int | None = None,
                 cache: TokenCache | None = TOKEN_CACHE) -> np.ndarray:
    """Embed ``texts`` (float32, in input order). Texts are tokenised once (``cache``), sorted by token length
    and batched so that padding is small (``token_budget``: tokens per batch instead of a fixed count)."""
    device = torch.device(device) if device else next(encoder.parameters()).device
    max_length = encoder.query_max_length if side == "query" else encoder.doc_max_length
    ids = (cache or TokenCache()).get(encoder.tokenizer, texts, max_length)
    out = np.zeros((len(texts), encoder.dim), dtype=np.float32)
    use_bf16 = device.type == "cuda"
    was_training = encoder.training
    encoder.eval()
    try:
        for idx in tqdm(token_batches([len(x) for x in ids], batch_size, token_budget), desc=desc or f"encode {side}s",
                        unit="batch", disable=not progress, leave=False):
            inputs = encoder.tokenizer.pad({"input_ids": [ids[i] for i in idx]}, return_tensors="pt").to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                emb = encoder.encode_queries(inputs) if side == "query" else encoder.encode_docs(inputs)
            out[idx] = emb.float().cpu().numpy()
    finally:
        encoder.train(was_training)
    return out


def build_index(embeddings: np.ndarray, index: str = "flat"):
    """``flat``: exact inner product; ``hnsw``: approximate (HNSW graph, 32 links) for large corpora."""
    import faiss

    dim = embeddings.shape[1]
    if index == "flat":
        faiss_index = faiss.IndexFlatIP(dim)
    elif index == "hnsw":
        faiss_index = faiss.IndexHNSWFlat(dim, 32, faiss.METRIC_INNER_PRODUCT)
        faiss_index.hnsw.efSearch = 256
    else:
        raise ConfigError(f"retriever.index must be 'flat' or 'hnsw', got '{index}'.")
    faiss_index.add(np.ascontiguousarray(embeddings, dtype=np.float32))
    return faiss_index


class DenseRetriever:
    """Encode the corpus and the queries with ``encoder``; ``device='auto'`` takes the GPU when there is one."""

    def __init__(self, encoder, batch_size: int = 128, index: str = "flat", device: str | None = None,
                 progress: bool = True, token_budget: int | None = None):
        self.encoder, self.batch_size, self.index, self.progress = encoder, batch_size, index, progress
        self.token_budget = token_budget
        device = pick_device(device)
        if device is not None:
            self.encoder.to(device)
        self.device = device

    def retrieve(self, corpus: dict[str, Document], queries: dict[str, str], k: int = 100) -> dict[str, dict[str, float]]:
        doc_ids, qids = list(corpus), list(queries)
        doc_emb = encode_texts(self.encoder, [corpus[d].full_text for d in doc_ids], "doc", self.batch_size,
                               self.device, self.progress, desc="encode corpus", token_budget=self.token_budget)
        query_emb = encode_texts(self.encoder, [queries[q] for q in qids], "query", self.batch_size, self.device,
                                 self.progress, desc="encode queries", token_budget=self.token_budget)
        index = build_index(doc_emb, self.index)
        scores, ids = index.search(query_emb, min(k, len(doc_ids)))
        return {qid: {doc_ids[j]: float(s) for j, s in zip(ids[row], scores[row]) if j >= 0}
                for row, qid in enumerate(qids)}
