"""ME-BERT: m = 1 is the [CLS] bi-encoder exactly; m > 1 scores the best of a document's first m token vectors
(against a hand computation from the transformer's hidden states); its index search equals brute force; gradient
caching and the entry point train it."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from retrieval_lab.data.beir import BeirDataset
from retrieval_lab.errors import ConfigError
from retrieval_lab.losses.infonce import InfoNCELoss
from retrieval_lab.losses.margin_mse import MarginMSELoss
from retrieval_lab.models.biencoder import BiEncoderModule
from retrieval_lab.models.encoder import Encoder
from retrieval_lab.models.mebert import MEBERT, BestVectorIndex
from retrieval_lab.retrieval.dense import DenseRetriever
from test_combinations import FAST, compose_train
from test_grad_cache import assert_same, make_batch, plain_and_cached
from retrieval_lab.train import train


def test_one_vector_gives_the_cls_bi_encoders_scores_and_rankings_exactly(beir_folder):
    """MiniLM (a random tiny model's [CLS] vectors are all alike: every score ties)."""
    bi = Encoder("packaged:minilm", pooling="cls", query_max_length=16, doc_max_length=32).eval()
    me = MEBERT(1, name_or_path="packaged:minilm", query_max_length=16, doc_max_length=32).eval()
    batch = make_batch(bi, 3)
    with torch.no_grad():
        q, d = bi.encode_queries(batch["query"]), bi.encode_docs(batch["docs"])
        mq, md = me.encode_queries(batch["query"]), me.encode_docs(batch["docs"])
    blocks = {"query_doc", "groups", "query_query", "doc_query"}
    plain, multi = bi.score_blocks(q, d, 3, blocks), me.score_blocks(mq, md, 3, blocks)
    for block in blocks:
        assert torch.equal(getattr(plain, block), getattr(multi, block)), block
    assert plain.query_doc.std() > 0.05  # scores that differ
    data = BeirDataset(beir_folder)
    test = data.split("test")
    runs = [DenseRetriever(model, batch_size=8, progress=False).retrieve(test.corpus, test.queries, k=20)
            for model in (bi, me)]
    assert runs[0] == runs[1]  # the same documents, order and scores


def test_several_vectors_score_the_best_of_a_documents_first_tokens(tiny_model):
    """s(q, d) = max_j q . d_j over the first m token vectors, each L2-normalised, from the hidden states by hand;
    a document shorter than m tokens scores over its real tokens only."""
    me = MEBERT(3, name_or_path=str(tiny_model), query_max_length=16, doc_max_length=32).eval()
    tokenizer = me.tokenizer
    queries = tokenizer(["gene cancer", "virus"], padding=True, return_tensors="pt")
    docs = tokenizer(["protein gene cell brain heart", "a"], padding=True, return_tensors="pt")  # "a": 3 tokens
    docs_short = tokenizer(["b", "protein gene cell brain heart"], padding=True, return_tensors="pt")
    with torch.no_grad():
        q = me.encode_queries(queries)
        d = me.encode_docs(docs)
        scores = me.score(q, d)
        hidden = me.query_model(**docs).last_hidden_state
        expected_q = torch.nn.functional.normalize(me.query_model(**queries).last_hidden_state[:, 0], dim=-1)
        for j in range(2):
            real = int(docs["attention_mask"][j, :3].sum())
            vectors = torch.nn.functional.normalize(hidden[j, :real], dim=-1)
            assert torch.allclose(scores[:, j], (expected_q @ vectors.T).max(1).values, atol=1e-6)
        assert d.mask.tolist() == [[True, True, True], [True, True, True]]
        # fewer tokens than m: [CLS] b [SEP] is 3 tokens, so m = 5 leaves two padded vectors, which never win
        wide = MEBERT(5, name_or_path=str(tiny_model)).eval()
        short = wide.encode_docs(docs_short)
        assert short.mask.tolist() == [[True, True, True, False, False], [True] * 5]
        first = torch.nn.functional.normalize(wide.query_model(**docs_short).last_hidden_state[0, :3], dim=-1)
        assert torch.allclose(wide.score(wide.encode_queries(queries), short)[:, 0],
                              (wide.encode_queries(queries) @ first.T).max(1).values, atol=1e-6)


def test_best_vector_index_equals_brute_force_and_looks_deeper_when_needed():
    """Documents whose vectors crowd the top: the first k*m vectors cover fewer than k documents."""
    rng = np.random.default_rng(0)
    docs, m, dim, k = 40, 4, 8, 10
    vectors = rng.standard_normal((docs, m, dim)).astype(np.float32)
    vectors[:3] += 5 * rng.standard_normal(dim).astype(np.float32)  # three documents far ahead along one direction
    mask = np.ones((docs, m), dtype=bool)
    mask[5, 2:] = False  # a short document
    queries = rng.standard_normal((6, dim)).astype(np.float32)
    queries[0] = vectors[:3].mean(axis=(0, 1))
    import faiss

    flat = faiss.IndexFlatIP(dim)
    flat.add(vectors.reshape(-1, dim)[mask.reshape(-1)])
    index = BestVectorIndex(flat, np.repeat(np.arange(docs), m)[mask.reshape(-1)], docs)
    scores, ids = index.search(queries, k)
    best = np.where(mask[None], np.einsum("qh,dmh->qdm", queries, vectors), -np.inf).max(-1)
    for row in range(len(queries)):
        assert ids[row].tolist() == np.argsort(-best[row], kind="stable")[:k].tolist()
        assert np.allclose(scores[row], np.sort(best[row])[::-1][:k], atol=1e-5)


@pytest.mark.parametrize("loss,group,chunk", [(InfoNCELoss(0.05), 2, 3), (MarginMSELoss(alpha=0.5), 3, 4)])
def test_gradient_caching_of_several_vectors_equals_the_plain_step(tiny_model, loss, group, chunk):
    """Chunks of documents cut to their longest row hold different numbers of vectors: padded and masked."""
    torch.manual_seed(0)
    me = MEBERT(6, name_or_path=str(tiny_model), query_max_length=16, doc_max_length=32).eval()
    module = BiEncoderModule(me, loss, group_size=group)
    batch = make_batch(me, group, teacher="teacher" in loss.needs)
    assert_same(*plain_and_cached(module, batch, chunk))


def test_settings_are_checked(tiny_model):
    with pytest.raises(ConfigError, match="model.vectors must be a positive whole number"):
        MEBERT(0, name_or_path=str(tiny_model))
    with pytest.raises(ConfigError, match="model.pooling must be cls"):
        MEBERT(2, name_or_path=str(tiny_model), pooling="mean")


def test_trains_with_the_dpr_recipe_and_saves_its_vectors(tiny_model, beir_folder, bm25_negatives, tmp_path):
    overrides = ["model=mebert", "model.vectors=4", f"model.name_or_path={tiny_model}", "negatives=bm25",
                 f"negatives.file={bm25_negatives}", "data=beir", f"data.path={beir_folder}",
                 *[o for o in FAST if o not in ("eval.after=false", "save_model=false") and "queue_size" not in o]]
    train(compose_train(overrides), tmp_path / "run")
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["steps"] == 2 and 0 <= metrics["after"]["ndcg@10"] <= 1
    assert json.loads((tmp_path / "run" / "model" / "retrieval_lab.json").read_text())["vectors"] == 4
    assert MEBERT(name_or_path=str(tmp_path / "run" / "model")).vectors == 4  # m comes back with the folder


def test_moco_is_refused_and_ance_re_mines_with_its_index(tiny_model, beir_folder, bm25_negatives, tmp_path):
    """MoCo's queue holds one key vector per document: refused in a sentence. ANCE re-mines with the family's own
    index (each document's best vector)."""
    from retrieval_lab import config

    with pytest.raises(ConfigError, match=r"negatives=moco cannot be used with model=MEBERT \(doc_representation "
                                          r"'vectors'\): its queue holds one key vector per document"):
        config.check_train_config(compose_train(["model=mebert", "negatives=moco"]))
    overrides = ["model=mebert", "model.vectors=3", f"model.name_or_path={tiny_model}", "negatives=ance",
                 f"negatives.file={bm25_negatives}", "negatives.refresh.every_n_steps=1", "negatives.refresh.depth=10",
                 "negatives.refresh.background=false", "data=beir", f"data.path={beir_folder}",
                 *[o for o in FAST if "queue_size" not in o]]
    train(compose_train(overrides), tmp_path / "run")
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["steps"] == 2
