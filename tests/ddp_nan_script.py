"""Run by tests/test_ddp.py: 2 CPU processes (gloo), where process 1's loss is NaN at its third step. Each process
saves the error that stopped it and its step."""
import sys

import lightning as L
import torch

from retrieval_lab.callbacks import NumericFault, NumericGuard
from retrieval_lab.data.beir import BeirDataset
from retrieval_lab.data.datamodule import GroupCollator, RetrievalDataModule
from retrieval_lab.data.pairs import SupervisedPairs
from retrieval_lab.losses.infonce import InfoNCELoss
from retrieval_lab.models.biencoder import BiEncoderModule
from retrieval_lab.models.encoder import Encoder

model_dir, data_dir, out_dir = sys.argv[1:4]


class NaNOnProcess1(InfoNCELoss):
    calls = 0

    def forward(self, *args, **kwargs):
        type(self).calls += 1
        loss = super().forward(*args, **kwargs)
        nan = type(self).calls == 3 and torch.distributed.get_rank() == 1
        return loss * float("nan") if nan else loss


L.seed_everything(0)
encoder = Encoder(model_dir, query_max_length=16, doc_max_length=32)
dataset = BeirDataset(data_dir)
trainer = L.Trainer(max_steps=6, accelerator="cpu", devices=2, strategy="ddp", use_distributed_sampler=False,
                    logger=False, callbacks=[NumericGuard(f"{out_dir}/checkpoints")], enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False)
try:
    trainer.fit(BiEncoderModule(encoder, NaNOnProcess1(0.05)),
                datamodule=RetrievalDataModule(SupervisedPairs(dataset, dataset.qrels("train")),
                                               GroupCollator(encoder.tokenizer, 16, 32), batch_size=4))
    error = None
except NumericFault as err:
    error = str(err)
torch.save({"error": error, "step": trainer.global_step}, f"{out_dir}/rank{trainer.global_rank}.pt")
