"""MoCo: the momentum update by hand, FIFO order and wrap-around of the queue, checkpoint save and resume."""
from __future__ import annotations

import lightning as L
import pytest
import torch

from retrieval_lab.data.beir import BeirDataset
from retrieval_lab.data.datamodule import GroupCollator, RetrievalDataModule
from retrieval_lab.data.pairs import CroppingPairs
from retrieval_lab.losses.infonce import InfoNCELoss
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
    with_queue = module.loss(q, k, queue=module.current_queue())
    assert with_queue > module.loss(q, k)


def fit(module, beir_folder, root, max_steps, ckpt_path=None):
    dataset = BeirDataset(beir_folder)
    data = RetrievalDataModule(CroppingPairs(dataset, seed=1), GroupCollator(module.encoder.tokenizer, 32, 32),
                               batch_size=4)
    trainer = L.Trainer(max_steps=max_steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=root)
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
    for a, b in zip(fresh.key_encoder.state_dict().values(), first.key_encoder.state_dict().values()):
        assert torch.equal(a, b)
    moved = fit(fresh, beir_folder, tmp_path, max_steps=4, ckpt_path=ckpt)  # and training goes on from there
    assert moved.global_step == 4 and int(fresh.queue_ptr) == 6
