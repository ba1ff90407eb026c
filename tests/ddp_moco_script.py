"""Run by tests/test_ddp.py: MoCo training on 2 CPU processes (gloo); each rank saves its queue, and checks that
its queue's document identities are every process's, step by step in rank order (as the keys are)."""
import sys

import lightning as L
import torch
import torch.distributed as dist

from retrieval_lab.data.beir import BeirDataset
from retrieval_lab.data.datamodule import GroupCollator, RetrievalDataModule
from retrieval_lab.data.pairs import CroppingPairs
from retrieval_lab.losses.infonce import InfoNCELoss
from retrieval_lab.models.encoder import Encoder
from retrieval_lab.models.moco import MoCoModule

model_dir, data_dir, out_dir = sys.argv[1:4]
L.seed_everything(0)
encoder = Encoder(model_dir)
module = MoCoModule(encoder, InfoNCELoss(0.05), queue_size=64, momentum=0.9, lr=1e-3)
data = RetrievalDataModule(CroppingPairs(BeirDataset(data_dir), seed=1, augmentation=None),
                           GroupCollator(encoder.tokenizer, 32, 32), batch_size=4)
steps = []  # this process's document identities, one list per step


wrapped = []  # DDP's broadcast_buffers while training


class Record(L.Callback):
    def on_train_start(self, trainer, pl_module):
        wrapped.append(trainer.model.broadcast_buffers)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        steps.append(batch["doc_keys"].tolist())


trainer = L.Trainer(max_steps=2, accelerator="cpu", devices=2, strategy="ddp", use_distributed_sampler=False,
                    logger=False, callbacks=[Record()],
                    enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
trainer.fit(module, datamodule=data)
assert wrapped == [False]  # the queues agree without DDP's broadcast of buffers before each forward
every = [None, None]
dist.all_gather_object(every, steps)
expected = [k for step in range(2) for rank in every for k in rank[step]]
assert module.queue_ids[: int(module.queue_len)].tolist() == expected and len(set(expected)) == 16, expected
torch.save({"queue": module.current_queue().clone(), "len": int(module.queue_len)},
           f"{out_dir}/rank{trainer.global_rank}.pt")
