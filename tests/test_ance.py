"""ANCE: refreshed negatives exclude positives, and a swap never exposes a half-built table to training."""
from __future__ import annotations

import sys
import threading
import time

import lightning as L
import torch

from retrieval_lab.data.beir import BeirDataset
from retrieval_lab.data.datamodule import GroupCollator, RetrievalDataModule
from retrieval_lab.data.negatives import QueryNegatives
from retrieval_lab.data.pairs import SupervisedPairs
from retrieval_lab.losses.infonce import InfoNCELoss
from retrieval_lab.mining.ance import AnceRefresh
from retrieval_lab.models.biencoder import BiEncoderModule
from retrieval_lab.models.encoder import Encoder


def pairs_with(data, negatives):
    qrels = data.qrels("train")
    return SupervisedPairs(data, qrels, group_size=3,
                           negatives={q: QueryNegatives([], negatives) for q in qrels})


def test_refresh_mines_negatives_with_the_current_model(tiny_model, beir_folder, monkeypatch):
    data = BeirDataset(beir_folder)
    train_set = pairs_with(data, ["d59"])
    encoder = Encoder(str(tiny_model)).eval()
    table = AnceRefresh(train_set, depth=20, n_neg=5).build_table(encoder)
    assert set(table) == set(train_set.qids)
    for qid, negs in table.items():
        assert len(negs) == 5 and not set(negs) & set(train_set.positives[qid])
    # eval.index=torch (a GPU machine without faiss): the same exact search, without importing faiss
    monkeypatch.setitem(sys.modules, "faiss", None)
    assert AnceRefresh(train_set, depth=20, n_neg=5, index="torch").build_table(encoder) == table


class SlowVersions(AnceRefresh):
    """Builds version k's table entry by entry, slowly: version k uses only documents d{40+2k}, d{41+2k}."""

    version = 0

    def build_table(self, encoder):
        SlowVersions.version += 1
        docs = [f"d{40 + 2 * (self.version % 10)}", f"d{41 + 2 * (self.version % 10)}"]
        table = {}
        for qid in self.train_set.qids:
            table[qid] = docs
            time.sleep(0.002)
        return table


def test_training_never_sees_a_half_built_table(tiny_model, beir_folder, capsys):
    data = BeirDataset(beir_folder)
    train_set = pairs_with(data, ["d58", "d59"])
    seen_versions = []
    original = train_set.__class__.__getitem__

    class Checking(train_set.__class__):
        def __getitem__(self, index):
            ex = original(self, index)
            seen_versions.append(frozenset(ex["doc_ids"][1:]))
            return ex

    train_set.__class__ = Checking
    encoder = Encoder(str(tiny_model))
    refresh = SlowVersions(train_set, every_n_steps=1, background=True)
    data_module = RetrievalDataModule(train_set, GroupCollator(encoder.tokenizer, 16, 16), batch_size=4)
    trainer = L.Trainer(max_epochs=4, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[refresh])
    trainer.fit(BiEncoderModule(encoder, InfoNCELoss()), datamodule=data_module)
    assert len(refresh.history) >= 2, "refreshes were swapped in during training"
    out = capsys.readouterr()
    assert "ANCE" not in out.err and "no refresh was swapped in" not in out.out
    assert threading.active_count() < 10
    legal = {frozenset({"d58", "d59"})} | {frozenset({f"d{40 + 2 * k}", f"d{41 + 2 * k}"}) for k in range(10)}
    assert set(seen_versions) <= legal  # every example drew from exactly one complete table
    assert len(set(seen_versions)) >= 3


class FailingRefresh(AnceRefresh):
    def build_table(self, encoder):
        raise MemoryError("CUDA out of memory while encoding the corpus")


def test_a_failed_refresh_stops_training_with_its_cause(tiny_model, beir_folder):
    """A refresh that fails in the background stops training at the next step with the error, instead of leaving
    training to go on with negatives that would never be refreshed again."""
    import pytest

    data = BeirDataset(beir_folder)
    train_set = pairs_with(data, ["d58", "d59"])
    encoder = Encoder(str(tiny_model))
    data_module = RetrievalDataModule(train_set, GroupCollator(encoder.tokenizer, 16, 16), batch_size=4)
    trainer = L.Trainer(max_epochs=20, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[FailingRefresh(train_set, every_n_steps=2)])
    with pytest.raises(RuntimeError, match="ANCE refresh begun at step 2 failed .*MemoryError: CUDA out of memory"):
        trainer.fit(BiEncoderModule(encoder, InfoNCELoss()), datamodule=data_module)
    assert trainer.global_step < 20 * len(data_module.train_dataloader())


def test_a_refresh_that_fails_after_the_last_step_is_reported(tiny_model, beir_folder):
    """The last refresh, begun at the last step, finishes after training: its table would not be used, but its
    failure is still reported (a warning) rather than lost."""
    import pytest

    data = BeirDataset(beir_folder)
    train_set = pairs_with(data, ["d58", "d59"])
    encoder = Encoder(str(tiny_model))
    trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[FailingRefresh(train_set, every_n_steps=2)])
    with pytest.warns(UserWarning, match="refresh begun at step 2 failed after training ended: MemoryError"):
        trainer.fit(BiEncoderModule(encoder, InfoNCELoss()),
                    datamodule=RetrievalDataModule(train_set, GroupCollator(encoder.tokenizer, 16, 16), batch_size=4))
    assert trainer.global_step == 2


def test_the_table_in_use_travels_with_the_checkpoint(beir_folder, bm25_negatives, tmp_path):
    """AnceRefresh's state (saved in every Lightning checkpoint) holds the current negatives; loading it (with
    torch.load's weights_only, as Lightning does) puts that table back into a fresh training set."""
    from retrieval_lab.data.negatives import read_negatives

    dataset = BeirDataset(beir_folder)
    qrels = dataset.qrels("train")

    def fresh():
        return SupervisedPairs(dataset, qrels, group_size=2, negatives=read_negatives(bm25_negatives, dataset, qrels))

    trained = fresh()
    refreshed = {q: sorted(trained.negatives[q])[::-1][:3] for q in trained.qids}  # a table unlike the file's
    trained.negatives = refreshed
    torch.save(AnceRefresh(trained).state_dict(), tmp_path / "state.pt")
    resumed = fresh()
    assert resumed.negatives != refreshed
    AnceRefresh(resumed).load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    assert resumed.negatives == refreshed


def test_every_refresh_after_the_first_reuses_the_tokenised_corpus(tiny_model, beir_folder):
    """The refresh's snapshot of the encoder shares its tokenizer, so the token cache (keyed by the tokenizer)
    tokenises the corpus and the queries once, not at every refresh, and holds one copy of each."""
    from retrieval_lab.tokenization import TOKEN_CACHE

    misses = TOKEN_CACHE.misses
    data = BeirDataset(beir_folder)
    train_set = pairs_with(data, ["d58", "d59"])
    encoder = Encoder(str(tiny_model))
    refresh = AnceRefresh(train_set, every_n_steps=1, depth=20, n_neg=3, background=False)
    trainer = L.Trainer(max_steps=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[refresh])
    trainer.fit(BiEncoderModule(encoder, InfoNCELoss()),
                datamodule=RetrievalDataModule(train_set, GroupCollator(encoder.tokenizer, 16, 16), batch_size=4))
    assert len(refresh.history) == 3  # three refreshes, each encoding the corpus and the training queries
    assert TOKEN_CACHE.misses - misses == 2
    assert sum(entry[0] is encoder.tokenizer for entry in TOKEN_CACHE.entries.values()) == 2


def test_a_run_that_ends_before_its_first_refresh_says_so(tiny_model, beir_folder, capsys):
    """Warned at the start (the run's 2 steps are fewer than the 5 before the first refresh) and told at the end."""
    data = BeirDataset(beir_folder)
    train_set = pairs_with(data, ["d58", "d59"])
    encoder = Encoder(str(tiny_model))
    refresh = AnceRefresh(train_set, every_n_steps=5, depth=20, n_neg=2, background=False)
    data_module = RetrievalDataModule(train_set, GroupCollator(encoder.tokenizer, 16, 16), batch_size=4)
    trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[refresh])
    trainer.fit(BiEncoderModule(encoder, InfoNCELoss()), datamodule=data_module)
    out = capsys.readouterr()
    assert "warning: ANCE: the run has 2 steps and its first refresh begins after step 5" in out.err
    assert "no refresh was swapped in during the run's 2 steps" in out.out
    assert refresh.history == []
