"""Training batches: the DESIGN.md layout, the false-negative mask, reproducible sampling; the LR schedule."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer

from conftest import packaged_minilm
from retrieval_lab.data.beir import BeirDataset
from retrieval_lab.data.datamodule import GroupCollator
from retrieval_lab.data.pairs import SupervisedPairs
from retrieval_lab.errors import ConfigError
from retrieval_lab.models.biencoder import linear_warmup_decay


@pytest.fixture(scope="module")
def shared_positive_data(tmp_path_factory):
    """q1 and q2 share the positive d1; q1 also has d2."""
    folder = tmp_path_factory.mktemp("shared")
    (folder / "corpus.jsonl").write_text("".join(f'{{"_id": "d{i}", "title": "", "text": "doc {i}"}}\n' for i in range(4)))
    (folder / "queries.jsonl").write_text("".join(f'{{"_id": "q{i}", "text": "query {i}"}}\n' for i in range(1, 4)))
    (folder / "qrels").mkdir()
    (folder / "qrels" / "train.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\t1\nq1\td2\t1\nq2\td1\t1\nq3\td3\t1\nq3\td0\t0\n")
    return BeirDataset(folder)


def test_batch_layout_and_false_negative_mask(shared_positive_data):
    pairs = SupervisedPairs(shared_positive_data, shared_positive_data.qrels("train"))
    assert pairs.qids == ["q1", "q2", "q3"]
    collate = GroupCollator(AutoTokenizer.from_pretrained(packaged_minilm()), 16, 32)
    examples = [pairs[i] for i in range(3)]
    batch = collate(examples)
    assert batch["query"]["input_ids"].shape[0] == 3 and batch["docs"]["input_ids"].shape[0] == 3
    assert batch["qids"] == ["q1", "q2", "q3"]
    doc_ids = batch["doc_ids"]
    for i, ex in enumerate(examples):
        assert doc_ids[i] == ex["doc_ids"][0] and doc_ids[i] in pairs.positives[ex["qid"]]
    expected = torch.tensor([[j != i and doc_ids[j] in pairs.positives[q] for j in range(3)]
                             for i, q in enumerate(["q1", "q2", "q3"])])
    assert torch.equal(batch["mask"].dense(), expected)
    assert not batch["mask"].dense().diagonal().any()  # a query's own target is never masked


@pytest.mark.parametrize("queries,group", [(1, 1), (7, 1), (16, 3), (64, 4)])
def test_the_false_negative_mask_follows_its_definition_column_by_column(queries, group):
    """Random batches whose document columns repeat (one document in several groups) and whose queries judge
    several positives: column j is masked for query i when it holds one of i's positives, except i's own target."""
    import random

    from retrieval_lab.data.datamodule import false_negatives

    rng = random.Random(queries * 10 + group)
    doc_ids = [f"d{rng.randrange(queries * group)}" for _ in range(queries * group)]
    positives = [[doc_ids[i * group]] + [f"d{rng.randrange(queries * group)}" for _ in range(rng.randrange(4))]
                 for i in range(queries)]
    expected = torch.tensor([[doc_ids[j] in positives[i] and j != i * group for j in range(queries * group)]
                             for i in range(queries)], dtype=torch.bool)
    assert torch.equal(false_negatives(doc_ids, positives, group).dense(), expected)


def test_distillation_masks_every_judged_positive_not_only_the_scored_ones(shared_positive_data):
    """With teacher scores, positives are drawn only from those the file scores (d2 for q1), but a positive the
    file leaves unscored (d1, q2's positive) is still no negative of q1 in the batch."""
    from retrieval_lab.data.negatives import QueryNegatives

    scored = {"q1": "d2", "q2": "d1", "q3": "d3"}
    negatives = {q: QueryNegatives([p], ["d0"], {p: 9.0, "d0": 1.0}) for q, p in scored.items()}
    pairs = SupervisedPairs(shared_positive_data, shared_positive_data.qrels("train"), group_size=2,
                            negatives=negatives, teacher=True)
    assert pairs.positives["q1"] == ["d2"] and pairs.judged["q1"] == ["d1", "d2"]
    batch = GroupCollator(None, None, None)([pairs[i] for i in range(3)])
    assert batch["doc_ids"] == ["d2", "d0", "d1", "d0", "d3", "d0"]
    expected = torch.zeros(3, 6, dtype=torch.bool)
    expected[0, 2] = True  # q1 judges d1: not its negative, though the file scores only d2 for it (q2 judges no d2)
    assert torch.equal(batch["mask"].dense(), expected)


def test_no_negative_can_be_drawn_when_every_document_is_a_positive(tmp_path):
    from retrieval_lab.errors import DataError

    (tmp_path / "qrels").mkdir()
    (tmp_path / "corpus.jsonl").write_text('{"_id": "d0", "text": "a"}\n{"_id": "d1", "text": "b"}\n')
    (tmp_path / "queries.jsonl").write_text('{"_id": "q", "text": "a b"}\n')
    (tmp_path / "qrels" / "train.tsv").write_text("query-id\tcorpus-id\tscore\nq\td0\t1\nq\td1\t1\n")
    data = BeirDataset(tmp_path)
    pairs = SupervisedPairs(data, data.qrels("train"), group_size=2, negatives={})
    with pytest.raises(DataError, match="query q has every document of the corpus as a positive"):
        pairs[0]


def test_collated_inputs_are_the_tokenizers_own():
    """The collator tokenises through the Rust backend copy and pads in numpy: the input ids and attention mask
    are what the tokenizer's own call gives, for texts longer and shorter than the maximum length; a tokenizer that
    pads on the left keeps its own call."""
    import random

    tokenizer = AutoTokenizer.from_pretrained(packaged_minilm())
    rng = random.Random(0)
    words = ["protein", "immunohistochemistry", "cancer", "of", "the", "β-cell", "IL-6", ",", "(", "2019)"]
    texts = [" ".join(rng.choices(words, k=n)) for n in (0, 1, 3, 40, 200, 7)]
    examples = [{"qid": str(i), "query": t, "doc_ids": [f"d{i}"], "docs": [texts[-1 - i]], "positives": {f"d{i}"}}
                for i, t in enumerate(texts)]
    for side in ("right", "left"):
        tokenizer.padding_side = side
        batch = GroupCollator(tokenizer, 16, 48)(examples)
        for key, max_length, column in (("query", 16, [ex["query"] for ex in examples]),
                                        ("docs", 48, [ex["docs"][0] for ex in examples])):
            own = tokenizer(column, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
            for name in ("input_ids", "attention_mask"):
                assert torch.equal(batch[key][name], own[name]), (side, key, name)
        assert batch["query"]["input_ids"].shape == (6, 16) and hasattr(batch["query"], "to")


def test_positive_draw_is_reproducible_and_changes_with_epoch(shared_positive_data):
    pairs = SupervisedPairs(shared_positive_data, shared_positive_data.qrels("train"), seed=3)
    draws = []
    for epoch in range(20):
        pairs.set_epoch(epoch)
        draws.append(pairs[0]["doc_ids"][0])
    assert set(draws) == {"d1", "d2"}  # q1's two positives are both drawn over the epochs
    pairs.set_epoch(5)
    again = SupervisedPairs(shared_positive_data, shared_positive_data.qrels("train"), seed=3)
    again.set_epoch(5)
    assert [pairs[i]["doc_ids"] for i in range(3)] == [again[i]["doc_ids"] for i in range(3)]


def test_zero_score_judgements_are_not_positives(shared_positive_data):
    pairs = SupervisedPairs(shared_positive_data, shared_positive_data.qrels("train"))
    assert pairs.positives["q3"] == ["d3"]


def test_group_size_above_one_without_negatives_is_refused(shared_positive_data):
    with pytest.raises(ConfigError, match="group_size=1"):
        SupervisedPairs(shared_positive_data, shared_positive_data.qrels("train"), group_size=2)


def test_linear_warmup_then_linear_decay():
    f = linear_warmup_decay(warmup_steps=4, total_steps=12)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(4) == 1.0 and f(8) == pytest.approx(0.5) and f(12) == 0.0


def test_each_epoch_redraws_examples_under_lightning(tiny_model, shared_positive_data):
    """Lightning builds the dataloader once; the sampler must still pass every new epoch on to the dataset."""
    import lightning as L

    from retrieval_lab.data.datamodule import RetrievalDataModule
    from retrieval_lab.losses.infonce import InfoNCELoss
    from retrieval_lab.models.biencoder import BiEncoderModule
    from retrieval_lab.models.encoder import Encoder

    class Recording(SupervisedPairs):
        seen: list = []

        def __getitem__(self, index):
            self.seen.append(self.epoch)
            return super().__getitem__(index)

    pairs = Recording(shared_positive_data, shared_positive_data.qrels("train"), seed=0)
    encoder = Encoder(str(tiny_model))
    data = RetrievalDataModule(pairs, GroupCollator(encoder.tokenizer, 16, 16), batch_size=3, seed=5)
    trainer = L.Trainer(max_epochs=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(BiEncoderModule(encoder, InfoNCELoss()), datamodule=data)
    assert Recording.seen == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    orders = []
    for epoch in (0, 1, 0):
        data.sampler.set_epoch(epoch)
        orders.append(list(data.sampler))
    assert orders[0] == orders[2] and sorted(orders[1]) == sorted(orders[0]) == [0, 1, 2]


@pytest.mark.parametrize("queries,columns", [(1, 1), (6, 6), (9, 27), (32, 64)])
def test_false_negative_pairs_give_every_block_of_the_dense_mask(queries, columns):
    """The losses take blocks of the mask (their anchor rows against all columns, or against the positives'
    columns) from its pairs: each block equals the dense mask indexed by those rows and columns."""
    from retrieval_lab.losses.scores import FalseNegatives

    generator = torch.Generator().manual_seed(queries + columns)
    mask = torch.rand(queries, columns, generator=generator) < 0.15
    pairs = FalseNegatives.of(mask)
    assert len(pairs) == int(mask.sum()) and torch.equal(pairs.dense(), mask)
    for _ in range(5):
        rows = torch.randperm(queries, generator=generator)[: torch.randint(1, queries + 1, (1,), generator=generator)]
        cols = torch.randperm(columns, generator=generator)[: torch.randint(1, columns + 1, (1,), generator=generator)]
        assert torch.equal(pairs.block(rows), mask[rows])
        assert torch.equal(pairs.block(rows, cols), mask[rows][:, cols])


def test_lightning_moves_the_false_negative_pairs_with_the_batch():
    """A batch's ``mask`` is an object, not a tensor: Lightning moves it to the device because it has ``to``."""
    from lightning.fabric.utilities.apply_func import move_data_to_device

    from retrieval_lab.data.datamodule import false_negatives

    batch = {"mask": false_negatives(["d1", "d2", "d1"], [["d1"], ["d2"], ["d1", "d2"]], 1)}
    moved = move_data_to_device(batch, torch.device("meta"))["mask"]
    assert moved.query.device.type == moved.column.device.type == "meta" and moved.shape == (3, 3)
    assert torch.equal(batch["mask"].dense(), torch.tensor([[False, False, True], [False, False, False],
                                                            [True, True, False]]))
