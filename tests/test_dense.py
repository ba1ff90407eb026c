"""Dense retrieval: exact search against brute force, the torch index against faiss, the approximate index."""
from __future__ import annotations

import numpy as np
import pytest

from retrieval_lab.data.beir import BeirDataset
from retrieval_lab.errors import ConfigError
from retrieval_lab.models.encoder import Encoder
from retrieval_lab.retrieval.dense import DenseRetriever, build_index
from retrieval_lab.retrieval.encoding import encode_texts


@pytest.fixture(scope="module")
def encoder(tiny_model):
    return Encoder(str(tiny_model))


def test_flat_search_equals_brute_force_and_hnsw_agrees(encoder, beir_folder):
    split = BeirDataset(beir_folder).split("test")
    run = DenseRetriever(encoder, batch_size=16, progress=False).retrieve(split.corpus, split.queries, k=5)
    doc_ids = list(split.corpus)
    docs = encode_texts(encoder, [split.corpus[d].full_text for d in doc_ids], "doc", progress=False)
    for qid, text in split.queries.items():
        q = encode_texts(encoder, [text], "query", progress=False)[0]
        best = np.argsort(-(docs @ q))[:5]
        assert list(run[qid]) == [doc_ids[i] for i in best]
        assert np.allclose(list(run[qid].values()), (docs @ q)[best], atol=1e-5)
    approx = DenseRetriever(encoder, batch_size=16, index="hnsw", progress=False).retrieve(split.corpus, split.queries, 5)
    overlap = np.mean([len(set(run[q]) & set(approx[q])) / 5 for q in run])
    assert overlap >= 0.9


def test_torch_index_returns_what_faiss_flat_returns(encoder, beir_folder):
    split = BeirDataset(beir_folder).split("test")
    flat = DenseRetriever(encoder, batch_size=16, progress=False).retrieve(split.corpus, split.queries, k=5)
    exact = DenseRetriever(encoder, batch_size=16, index="torch", progress=False).retrieve(split.corpus, split.queries, 5)
    assert flat.keys() == exact.keys()
    for qid in flat:
        assert list(flat[qid]) == list(exact[qid])
        assert np.allclose(list(flat[qid].values()), list(exact[qid].values()), atol=1e-5)
    scores, ids = build_index(np.eye(3, dtype=np.float32), "torch").search(np.array([[0.1, 0.9, 0.5]], "float32"), 2)
    assert ids.tolist() == [[1, 2]] and np.allclose(scores, [[0.9, 0.5]])


def test_unknown_index_is_refused():
    """The family names its index kinds: an unknown one is refused before anything is encoded."""
    from retrieval_lab.models.encoder import Encoder

    with pytest.raises(ConfigError, match="retriever.index must be 'flat', 'hnsw' or 'torch' for Encoder models, "
                                          "got 'ivf-magic'"):
        Encoder.check_index("ivf-magic")
    with pytest.raises(ConfigError, match="retriever.index_settings.nbits is not a setting of the 'flat' index of "
                                          "Encoder models"):
        Encoder.check_index("flat", {"nbits": 2})
