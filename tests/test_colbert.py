"""ColBERT: its inputs (markers, [MASK] augmentation, punctuation dropped) and MaxSim against a hand computation from
the transformer's hidden states; every score block the formula's; gradient caching equal to the plain step; exact
search equal to scoring every document; a saved folder loads back the same; the entry point trains it."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from retrieval_lab.data.beir import BeirDataset
from retrieval_lab.errors import ConfigError
from retrieval_lab.losses.colbertv2 import ColBERTv2Loss
from retrieval_lab.losses.infonce import InfoNCELoss
from retrieval_lab.losses.samtone import SamToNeLoss
from retrieval_lab.models.biencoder import BiEncoderModule
from retrieval_lab.models.colbert import ColBERT
from retrieval_lab.models.representation import MultiVector
from retrieval_lab.retrieval.dense import DenseRetriever
from retrieval_lab.train import train
from test_combinations import FAST, compose_train
from test_grad_cache import assert_same, make_batch, plain_and_cached


@pytest.fixture(scope="module")
def colbert(tiny_model):
    return ColBERT(str(tiny_model), projection_dim=8, query_max_length=8, doc_max_length=16).eval()


def hand_vectors(model, ids: list[int], attend: list[int]) -> torch.Tensor:
    """The projected, normalised last hidden states of one text's token ids, run on their own."""
    hidden = model.query_model(input_ids=torch.tensor([ids]), attention_mask=torch.tensor([attend]),
                               token_type_ids=torch.zeros(1, len(ids), dtype=torch.long)).last_hidden_state[0]
    return F.normalize(model.projection(hidden), dim=-1)


def test_maxsim_of_marked_augmented_queries_against_documents_without_punctuation(colbert):
    tok = colbert.tokenizer
    cls, sep, mask = tok.cls_token_id, tok.sep_token_id, tok.mask_token_id
    q_marker, d_marker = tok.convert_tokens_to_ids("[unused0]"), tok.convert_tokens_to_ids("[unused1]")
    queries, docs = ["gene cancer", "virus in the brain"], ["protein, gene. cell", "a"]
    with torch.no_grad():
        q = colbert.encode_queries(colbert.tokenize(queries, "query"))
        d = colbert.encode_docs(colbert.tokenize(docs, "doc"))
        scores = colbert.score(q, d)
        assert q.vectors.shape[1] == 9 and q.mask.all()  # query_max_length + the marker, every position kept
        expected = torch.zeros(2, 2)
        for i, query in enumerate(queries):
            words = tok(query, add_special_tokens=False)["input_ids"]
            ids = [cls, q_marker, *words, sep] + [mask] * (9 - len(words) - 3)
            qv = hand_vectors(colbert, ids, [1] * (len(words) + 3) + [0] * (9 - len(words) - 3))
            assert torch.allclose(q.vectors[i], qv, atol=1e-5)
            for j, doc in enumerate(docs):
                words = tok(doc, add_special_tokens=False)["input_ids"]
                ids = [cls, d_marker, *words, sep]
                dv = hand_vectors(colbert, ids, [1] * len(ids))
                kept = [t for t, token in enumerate(ids) if tok.convert_ids_to_tokens(token) not in ",."]
                assert d.mask[j].nonzero().flatten().tolist() == kept  # padding and punctuation dropped
                expected[i, j] = sum(max(float(qv[a] @ dv[b]) for b in kept) for a in range(9))
        assert torch.allclose(scores, expected, atol=1e-4)
        assert d.mask[1].tolist() == [True, True, True, True] + [False] * (d.vectors.shape[1] - 4)  # padding


def test_a_long_query_is_cut_to_its_length_and_keeps_its_sep(colbert):
    """A query of more than query_max_length tokens: [CLS] [Q], its first 6 words, [SEP]; no [MASK]."""
    tok = colbert.tokenizer
    inputs, keep = colbert.query_inputs(colbert.tokenize(["gene cancer virus brain heart liver lung kidney"], "query"))
    words = tok("gene cancer virus brain heart liver", add_special_tokens=False)["input_ids"]
    assert inputs["input_ids"][0].tolist() == [tok.cls_token_id, tok.convert_tokens_to_ids("[unused0]"), *words,
                                               tok.sep_token_id]
    assert inputs["attention_mask"][0].tolist() == [1] * 9 and keep.all()


def test_augmentation_settings_change_what_the_query_keeps(tiny_model):
    plain = ColBERT(str(tiny_model), projection_dim=8, query_max_length=8, doc_max_length=16, augment=False).eval()
    attend = ColBERT(str(tiny_model), projection_dim=8, query_max_length=8, doc_max_length=16,
                     attend_to_expansion=True).eval()
    default = ColBERT(str(tiny_model), projection_dim=8, query_max_length=8, doc_max_length=16).eval()
    attend.load_state_dict(default.state_dict())
    plain.load_state_dict(default.state_dict())
    inputs = default.tokenize(["gene"], "query")  # [CLS] gene [SEP]
    with torch.no_grad():
        short = plain.encode_queries(inputs)
        assert short.vectors.shape[1] == 4 and short.mask.all()  # [CLS] [Q] gene [SEP], no [MASK]
        masked, attended = default.encode_queries(inputs), attend.encode_queries(inputs)
        assert masked.vectors.shape[1] == attended.vectors.shape[1] == 9
        assert torch.allclose(masked.vectors[:, :4], short.vectors, atol=1e-5)  # unattended masks change nothing
        assert not torch.allclose(attended.vectors[:, :4], short.vectors, atol=1e-3)


def test_every_score_block_is_maxsim_of_its_texts(colbert):
    batch = make_batch(colbert, 3, n=4)
    with torch.no_grad():
        q, d = colbert.encode_queries(batch["query"]), colbert.encode_docs(batch["docs"])
        rows = torch.tensor([1, 3])
        s = colbert.score_blocks(q, d, 3, {"query_doc", "groups", "query_query", "doc_doc", "doc_query"}, rows=rows)
        positives = d[torch.arange(4) * 3]

        def pair(a: MultiVector, i: int, b: MultiVector, j: int) -> float:  # one pair, by a loop over vectors
            width = b.vectors.shape[1]
            return sum(max(float(a.vectors[i, x] @ b.vectors[j, y]) for y in range(width) if b.mask[j, y])
                       for x in range(a.vectors.shape[1]) if a.mask[i, x])

        backwards = colbert.score_groups(q, d, 3, rows=torch.tensor([3, 1]))  # rows in any order
        assert torch.equal(backwards, s.groups.flip(0))
        for r, i in enumerate(rows.tolist()):
            assert s.query_doc[r].tolist() == pytest.approx([pair(q, i, d, j) for j in range(12)], abs=1e-4)
            assert s.groups[r].tolist() == pytest.approx([pair(q, i, d, i * 3 + g) for g in range(3)], abs=1e-4)
            assert s.query_query[r].tolist() == pytest.approx([pair(q, i, q, j) for j in range(4)], abs=1e-4)
            assert s.doc_doc[r].tolist() == pytest.approx([pair(positives, i, positives, j) for j in range(4)], abs=1e-4)
            assert s.doc_query[r].tolist() == pytest.approx([pair(positives, i, q, j) for j in range(4)], abs=1e-4)


@pytest.mark.parametrize("loss,group,chunk", [(InfoNCELoss(1.0), 2, 3), (SamToNeLoss(0.5, side="both"), 2, 1),
                                              (ColBERTv2Loss(), 3, 4)])
def test_gradient_caching_equals_the_plain_step(tiny_model, loss, group, chunk):
    torch.manual_seed(0)
    model = ColBERT(str(tiny_model), projection_dim=8, query_max_length=16, doc_max_length=32).eval()
    module = BiEncoderModule(model, loss, group_size=group)
    assert_same(*plain_and_cached(module, make_batch(model, group, teacher="teacher" in loss.needs), chunk))


def test_exact_search_ranks_as_scoring_every_document(colbert, beir_folder):
    test = BeirDataset(beir_folder).split("test")
    retriever = DenseRetriever(colbert, batch_size=8, progress=False)
    run = retriever.retrieve(test.corpus, test.queries, k=10)
    doc_ids, qids = list(test.corpus), list(test.queries)
    with torch.no_grad():
        d = colbert.encode_docs(colbert.tokenize([test.corpus[i].full_text for i in doc_ids], "doc"))
        q = colbert.encode_queries(colbert.tokenize([test.queries[i] for i in qids], "query"))
        every = colbert.score(q, d)
    info = retriever.index_info  # what evaluate writes to metrics.json: float32 vectors padded to 17, and masks
    assert info["index"] == "exact" and info["bytes"] == len(doc_ids) * 17 * (8 * 4 + 1)
    assert info["fp16_vectors_bytes"] == int(d.mask.sum()) * 8 * 2
    for row, qid in enumerate(qids):
        top = every[row].topk(10)
        assert list(run[qid]) == [doc_ids[j] for j in top.indices.tolist()]
        assert list(run[qid].values()) == pytest.approx(top.values.tolist(), abs=1e-4)


def test_a_saved_colbert_loads_back_the_same(colbert, tmp_path):
    colbert.save(tmp_path / "model")
    saved = json.loads((tmp_path / "model" / "retrieval_lab.json").read_text())
    assert saved["colbert"] == {"query_marker": "[unused0]", "doc_marker": "[unused1]", "augment": True,
                                "attend_to_expansion": False, "skip_punctuation": True}
    back = ColBERT(str(tmp_path / "model")).eval()
    assert (back.dim, back.query_max_length, back.doc_max_length) == (8, 8, 16)
    inputs = colbert.tokenize(["protein, gene."], "doc")
    with torch.no_grad():
        assert torch.equal(back.encode_docs(inputs).vectors, colbert.encode_docs(inputs).vectors)
    with pytest.raises(ConfigError, match="holds a model saved by model=colbert .* load it with model=colbert"):
        from retrieval_lab.models.encoder import Encoder

        Encoder(str(tmp_path / "model"))  # a mean-pooled single vector of ColBERT's weights would mean nothing
    with pytest.raises(ConfigError, match="was saved as another model family than ColBERT"):
        from retrieval_lab.models.encoder import Encoder

        Encoder(str(colbert.name_or_path)).save(tmp_path / "plain")
        ColBERT(str(tmp_path / "plain"))


def test_settings_are_checked(tiny_model):
    with pytest.raises(ConfigError, match=r"model.query_marker '\[Q\]' is not a token of the tokenizer"):
        ColBERT(str(tiny_model), doc_max_length=16, query_marker="[Q]")
    with pytest.raises(ConfigError, match="model.augment must be true or false"):
        ColBERT(str(tiny_model), doc_max_length=16, augment="yes")
    with pytest.raises(ConfigError, match="model.projection_dim must be a positive whole number"):
        ColBERT(str(tiny_model), doc_max_length=16, projection_dim=0)
    with pytest.raises(ConfigError, match="model.doc_max_length=128 and ColBERT's marker token are longer than the 128 "
                                          "positions .* set model.doc_max_length to 127 or less"):
        ColBERT(str(tiny_model), doc_max_length=128)
    from retrieval_lab import config

    with pytest.raises(ConfigError, match="eval.index must be 'exact', 'ann' or 'plaid' for ColBERT models"):
        config.check_train_config(compose_train(["model=colbert", "eval.index=flat"]))
    with pytest.raises(ConfigError, match="eval.index_settings.nbits must be 1 or 2, got '3'"):  # before training
        config.check_train_config(compose_train(["model=colbert", "eval.index=plaid", "+eval.index_settings.nbits=3"]))
    with pytest.raises(ConfigError, match="eval.index_settings.nbit is not a setting of the 'plaid' index"):
        config.check_train_config(compose_train(["model=colbert", "eval.index=plaid", "+eval.index_settings.nbit=2"]))


def test_moco_is_refused_and_samtone_trains(tiny_model, beir_folder, bm25_negatives, tmp_path):
    """MoCo's queue holds one key vector per document: refused in a sentence. SamToNe's query-query and
    document-document blocks are MaxSim too; the run saves and evaluates with exact MaxSim."""
    from retrieval_lab import config

    with pytest.raises(ConfigError, match=r"negatives=moco cannot be used with model=ColBERT"):
        config.check_train_config(compose_train(["model=colbert", "negatives=moco"]))
    overrides = ["model=colbert", f"model.name_or_path={tiny_model}", "model.doc_max_length=32", "loss=samtone",
                 "loss.side=both", "loss.temperature=1", "negatives=bm25", f"negatives.file={bm25_negatives}",
                 "data=beir", f"data.path={beir_folder}",
                 *[o for o in FAST if o not in ("eval.after=false", "save_model=false") and "queue_size" not in o]]
    train(compose_train(overrides), tmp_path / "run")
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["steps"] == 2 and 0 < metrics["after"]["ndcg@10"] <= 1
    assert ColBERT(str(tmp_path / "run" / "model")).doc_max_length == 32


def test_reranking_a_first_stage_gives_maxsim_scores(colbert, beir_folder):
    """``reranker=model``: any family re-scores a first stage's candidates (``score_texts``): re-ranking every
    document gives exact search's run."""
    from retrieval_lab.retrieval.rerank import Reranker

    test = BeirDataset(beir_folder).split("test")

    class Everything:  # a first stage that returns the whole corpus in corpus order
        def retrieve(self, corpus, queries, k):
            return {q: {d: -float(i) for i, d in enumerate(corpus)} for q in queries}

    reranked = Reranker(Everything(), colbert, depth=len(test.corpus), device="cpu", progress=False).retrieve(
        test.corpus, test.queries, k=10)
    exact = DenseRetriever(colbert, batch_size=8, progress=False).retrieve(test.corpus, test.queries, k=10)
    for qid in test.queries:
        assert list(reranked[qid]) == list(exact[qid])
        assert list(reranked[qid].values()) == pytest.approx(list(exact[qid].values()), abs=1e-4)


def test_rocketqa_trains_colbert_with_its_ranker(tiny_model, beir_folder, bm25_negatives, tmp_path):
    """module=rocketqa: the ranker's scores over each group teach ColBERT (listwise KL at temperature 1), the ranker
    learns from the labels."""
    overrides = ["model=colbert", f"model.name_or_path={tiny_model}", "model.doc_max_length=32", "module=rocketqa",
                 f"module.cross_encoder.name_or_path={tiny_model}", "module.cross_encoder.max_length=48",
                 "loss.temperature=1", "negatives=bm25", f"negatives.file={bm25_negatives}", "negatives.group_size=3",
                 "data=beir", f"data.path={beir_folder}", *[o for o in FAST if "queue_size" not in o]]
    train(compose_train(overrides), tmp_path / "run")
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["steps"] == 2


def test_a_temperature_far_below_colberts_is_warned_of(capsys):
    from retrieval_lab import config

    config.check_train_config(compose_train(["model=colbert"]))
    assert "model=ColBERT's scores want loss.temperature=1" in capsys.readouterr().err
    config.check_train_config(compose_train(["model=colbert", "loss.temperature=1"]))
    assert "temperature" not in capsys.readouterr().err
