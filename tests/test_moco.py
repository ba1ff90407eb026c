"""MoCo: the momentum update by hand, FIFO order and wrap-around of the queue, checkpoint save and resume, and
the masking of queue keys that hold a query's own judged positives."""
from __future__ import annotations

import hashlib
import math
import shutil

import lightning as L
import pytest
import torch

from retrieval_lab.models.family import loss_on_vectors
from retrieval_lab.data.beir import BeirDataset
from retrieval_lab.data.datamodule import GroupCollator, RetrievalDataModule
from retrieval_lab.data.pairs import CroppingPairs, SupervisedPairs
from retrieval_lab.losses import infonce
from retrieval_lab.losses.infonce import InfoNCELoss
from retrieval_lab.losses.samtone import SamToNeLoss
from retrieval_lab.models.encoder import Encoder
from retrieval_lab.models.moco import MoCoModule


@pytest.fixture()
def module(tiny_model):
    return MoCoModule(Encoder(str(tiny_model)), InfoNCELoss(0.05), queue_size=5, momentum=0.9, lr=1e-3)


def test_momentum_update_matches_formula(module):
    with torch.no_grad():
        for p in module.encoder.parameters():
            p.add_(torch.randn_like(p))
    before_k = [p.clone() for p in module.key_encoder.parameters()]
    q = [p.clone() for p in module.encoder.parameters()]
    module.momentum_update()
    for k_old, q_p, k_new in zip(before_k, q, module.key_encoder.parameters()):
        assert torch.allclose(k_new, 0.9 * k_old + 0.1 * q_p, atol=1e-6)
    assert not any(p.requires_grad for p in module.key_encoder.parameters())


def test_queue_is_fifo_and_wraps_around(module):
    dim = module.queue.size(1)
    rows = lambda start, n: torch.arange(start, start + n, dtype=torch.float32)[:, None].repeat(1, dim)  # noqa: E731
    module.enqueue(rows(0, 3))                        # 0 1 2 . .
    assert int(module.queue_len) == 3 and int(module.queue_ptr) == 3
    assert module.current_queue()[:, 0].tolist() == [0, 1, 2]
    module.enqueue(rows(3, 4))                        # 5 6 2 3 4: 5 and 6 overwrite the oldest (0 and 1)
    assert module.queue[:, 0].tolist() == [5, 6, 2, 3, 4]
    assert int(module.queue_len) == 5 and int(module.queue_ptr) == 2
    module.enqueue(rows(7, 7))                        # more keys than slots: the last 5 stay
    assert sorted(module.queue[:, 0].tolist()) == [9, 10, 11, 12, 13]
    oldest_first = torch.roll(module.queue[:, 0], -int(module.queue_ptr)).tolist()
    assert oldest_first == [9, 10, 11, 12, 13]


def test_queue_enters_the_loss_as_extra_negatives(module):
    q = torch.nn.functional.normalize(torch.randn(2, 32), dim=-1)
    k = torch.nn.functional.normalize(torch.randn(2, 32), dim=-1)
    module.enqueue(torch.nn.functional.normalize(torch.randn(3, 32), dim=-1))
    with_queue = loss_on_vectors(module.loss, q, k, queue=module.current_queue())
    assert with_queue > loss_on_vectors(module.loss, q, k)


def fit(module, beir_folder, root, max_steps, ckpt_path=None, pairs=None, callbacks=None, max_epochs=None):
    pairs = pairs if pairs is not None else CroppingPairs(BeirDataset(beir_folder), seed=1)
    data = RetrievalDataModule(pairs, GroupCollator(module.encoder.tokenizer, 32, 32), batch_size=4)
    trainer = L.Trainer(max_steps=max_steps, max_epochs=max_epochs, accelerator="cpu", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=root, callbacks=callbacks)
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    return trainer


def test_checkpoint_restores_queue_and_key_encoder(tiny_model, beir_folder, tmp_path):
    L.seed_everything(0)
    first = MoCoModule(Encoder(str(tiny_model)), InfoNCELoss(0.05), queue_size=10, momentum=0.9, lr=1e-3)
    trainer = fit(first, beir_folder, tmp_path, max_steps=3)
    assert int(first.queue_len) == 10 and int(first.queue_ptr) == 2  # 3 steps x 4 keys in 10 slots
    ckpt = tmp_path / "mid.ckpt"
    trainer.save_checkpoint(ckpt)

    fresh = MoCoModule(Encoder(str(tiny_model)), InfoNCELoss(0.05), queue_size=10, momentum=0.9, lr=1e-3)
    assert not torch.equal(fresh.queue, first.queue)
    resumed = fit(fresh, beir_folder, tmp_path, max_steps=3, ckpt_path=ckpt)  # restores, nothing left to train
    assert resumed.global_step == 3
    assert torch.equal(fresh.queue, first.queue) and int(fresh.queue_ptr) == int(first.queue_ptr)
    assert torch.equal(fresh.queue_ids, first.queue_ids) and bool((first.queue_ids >= 0).all())
    for a, b in zip(fresh.key_encoder.state_dict().values(), first.key_encoder.state_dict().values()):
        assert torch.equal(a, b)
    moved = fit(fresh, beir_folder, tmp_path, max_steps=4, ckpt_path=ckpt)  # and training goes on from there
    assert moved.global_step == 4 and int(fresh.queue_ptr) == 6


# ---- queue keys of a query's own judged positives are no negatives of it ----

def blake2b_id(doc_id: str) -> int:
    return int.from_bytes(hashlib.blake2b(doc_id.encode(), digest_size=8).digest(), "big") >> 1


def test_collator_gives_stable_document_identities():
    examples = [{"qid": "q0", "query": "a", "doc_ids": ["d0", "d5"], "docs": ["x", "y"], "positives": {"d0", "d9"}},
                {"qid": "q1", "query": "b", "doc_ids": ["d1", "d0"], "docs": ["z", "x"], "positives": {"d1"}}]
    batch = GroupCollator(None, None, None)(examples)
    assert batch["doc_keys"].tolist() == [blake2b_id(d) for d in ("d0", "d5", "d1", "d0")]
    assert batch["positive_keys"].tolist() == [[blake2b_id("d0"), blake2b_id("d9")], [blake2b_id("d1"), -1]]


def test_queue_mask_enters_infonce_and_samtone_as_by_hand():
    torch.manual_seed(0)
    unit = lambda n: torch.nn.functional.normalize(torch.randn(n, 6, dtype=torch.float64), dim=-1)  # noqa: E731
    q, d, queue, tau = unit(2), unit(2), unit(3), 0.1
    queue_mask = torch.tensor([[False, True, False], [True, False, True]])
    expected = 0.0
    for i in range(2):  # log-softmax over the unmasked columns: the batch's documents, then the kept queue keys
        logits = [float(q[i] @ d[j]) / tau for j in range(2)]
        logits += [float(q[i] @ queue[m]) / tau for m in range(3) if not queue_mask[i, m]]
        expected += -(logits[i] - math.log(sum(math.exp(x) for x in logits))) / 2
    loss = loss_on_vectors(InfoNCELoss(tau), q, d, queue=queue, queue_mask=queue_mask)
    assert loss.item() == pytest.approx(expected, rel=1e-9)
    assert loss_on_vectors(InfoNCELoss(tau), q, d, queue=queue).item() != pytest.approx(expected, rel=1e-6)
    # SamToNe: masking queue column 1 for every query equals leaving it out of the queue
    every_row = torch.tensor([[False, True, False]] * 2)
    for bidirectional in (False, True):
        samtone = SamToNeLoss(tau, bidirectional=bidirectional)
        assert loss_on_vectors(samtone, q, d, queue=queue, queue_mask=every_row).item() == pytest.approx(
            loss_on_vectors(samtone, q, d, queue=queue[[0, 2]]).item(), rel=1e-9)


def test_queue_ids_survive_a_state_dict_round_trip_and_old_checkpoints_load(module, tiny_model):
    dim = module.queue.size(1)
    module.enqueue(torch.randn(3, dim), torch.tensor([blake2b_id(d) for d in ("d1", "d2", "d3")]))
    module.enqueue(torch.randn(1, dim))  # a key of an unknown document
    fresh = MoCoModule(Encoder(str(tiny_model)), InfoNCELoss(0.05), queue_size=5, momentum=0.9)
    fresh.load_state_dict(module.state_dict())
    assert fresh.queue_ids.tolist() == [blake2b_id("d1"), blake2b_id("d2"), blake2b_id("d3"), -1, -1]
    positives = {"positive_keys": torch.tensor([[blake2b_id("d2"), -1], [-1, -1]])}
    assert fresh.queue_mask(positives).tolist() == [[False, True, False, False], [False] * 4]

    older = {k: v for k, v in module.state_dict().items() if k != "queue_ids"}  # written before queue_ids existed
    fresh = MoCoModule(Encoder(str(tiny_model)), InfoNCELoss(0.05), queue_size=5, momentum=0.9)
    fresh.load_state_dict(older)
    assert torch.equal(fresh.queue, module.queue) and fresh.queue_ids.tolist() == [-1] * 5
    assert not fresh.queue_mask(positives).any()


def test_queue_never_holds_a_negative_copy_of_the_querys_positive(tiny_model, beir_folder, tmp_path, monkeypatch):
    """Two epochs of supervised pairs (40 queries, two with a second judged positive) with a queue of 100: every
    positive is enqueued in epoch 1, so in epoch 2 each query meets older keys of its positives in the queue.
    In the scores the loss takes, those queue columns (and only those) must be -inf."""
    folder = tmp_path / "data"
    shutil.copytree(beir_folder, folder)
    with open(folder / "qrels" / "train.tsv", "a") as qrels:
        qrels.write("q0\td1\t1\nq2\td3\t1\n")
    dataset = BeirDataset(folder)
    pairs = SupervisedPairs(dataset, dataset.qrels("train"), seed=3)
    by_id = {blake2b_id(d): d for d in dataset.corpus}

    seen, scored = [], []
    record = infonce.contrastive_logits

    def recording(*args, **kwargs):
        scores, targets = record(*args, **kwargs)
        scored.append(scores.detach())
        return scores, targets

    monkeypatch.setattr(infonce, "contrastive_logits", recording)

    class Before(L.Callback):  # the batch's judged positives and the queue the step scores against
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append((batch["positives"], pl_module.queue_ids[: int(pl_module.queue_len)].tolist()))

    L.seed_everything(0)
    module = MoCoModule(Encoder(str(tiny_model)), InfoNCELoss(0.05), queue_size=100, momentum=0.9, lr=1e-3)
    fit(module, folder, tmp_path, max_steps=-1, max_epochs=2, pairs=pairs, callbacks=[Before()])
    assert len(seen) == len(scored) == 20 and int(module.queue_len) == 80

    masked_rows = 0
    for step, ((positives, queue_ids), scores) in enumerate(zip(seen, scored)):
        batch = len(positives)
        queue_docs = [by_id[k] for k in queue_ids]
        assert scores.shape == (batch, batch + len(queue_docs))
        for i, pos in enumerate(positives):
            own = torch.tensor([doc in pos for doc in queue_docs], dtype=torch.bool)
            row = scores[i, batch:]
            assert torch.isneginf(row[own]).all() and torch.isfinite(row[~own]).all(), (step, i)
            masked_rows += bool(own.any())
            if step >= 10:  # epoch 2: every positive was enqueued in epoch 1
                assert own.any(), (step, i)
    assert masked_rows >= 40
