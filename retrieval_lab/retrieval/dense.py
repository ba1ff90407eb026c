"""Dense retrieval: encode texts in length-sorted batches, then search a faiss inner-product index."""
from __future__ import annotations

import numpy as np
import torch
from tqdm.auto import tqdm

from retrieval_lab.data.beir import Document
from retrieval_lab.errors import ConfigError


@torch.inference_mode()
def encode_texts(encoder, texts: list[str], side: str, batch_size: int = 128, device: str | torch.device | None = None,
                 progress: bool = True, desc: str | None = None) -> np.ndarray:
    """Embed ``texts`` (float32, in input order). Batches hold texts of similar length, so padding is small."""
    device = torch.device(device) if device else next(encoder.parameters()).device
    lengths = [len(t) for t in texts]
    order = np.argsort(lengths, kind="stable")[::-1]  # longest first: a memory problem shows up at once
    out = np.zeros((len(texts), encoder.dim), dtype=np.float32)
    use_bf16 = device.type == "cuda"
    was_training = encoder.training
    encoder.eval()
    try:
        for start in tqdm(range(0, len(texts), batch_size), desc=desc or f"encode {side}s", unit="batch",
                          disable=not progress, leave=False):
            idx = order[start:start + batch_size]
            inputs = encoder.tokenize([texts[i] for i in idx], side).to(device)
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
                 progress: bool = True):
        self.encoder, self.batch_size, self.index, self.progress = encoder, batch_size, index, progress
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device is not None:
            self.encoder.to(device)
        self.device = device

    def retrieve(self, corpus: dict[str, Document], queries: dict[str, str], k: int = 100) -> dict[str, dict[str, float]]:
        doc_ids, qids = list(corpus), list(queries)
        doc_emb = encode_texts(self.encoder, [corpus[d].full_text for d in doc_ids], "doc", self.batch_size,
                               self.device, self.progress, desc="encode corpus")
        query_emb = encode_texts(self.encoder, [queries[q] for q in qids], "query", self.batch_size, self.device,
                                 self.progress, desc="encode queries")
        index = build_index(doc_emb, self.index)
        scores, ids = index.search(query_emb, min(k, len(doc_ids)))
        return {qid: {doc_ids[j]: float(s) for j, s in zip(ids[row], scores[row]) if j >= 0}
                for row, qid in enumerate(qids)}
