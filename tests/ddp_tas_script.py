"""Run by tests/test_ddp.py: TAS batches on 2 CPU processes (gloo) whose own clusters differ, as encodings that
differ in their last bits can make them; each rank saves the query ids of its batches. Arguments: model folder,
data folder, output folder."""
import os
import sys

import lightning as L
import numpy as np
import torch

from retrieval_lab.data.beir import BeirDataset
from retrieval_lab.data.datamodule import GroupCollator, RetrievalDataModule
from retrieval_lab.data.pairs import SupervisedPairs
from retrieval_lab.data.sampling import ClusterBatchSampler
from retrieval_lab.losses.infonce import InfoNCELoss
from retrieval_lab.models.biencoder import BiEncoderModule
from retrieval_lab.models.encoder import Encoder

model_dir, data_dir, out_dir = sys.argv[1:4]
rank = int(os.environ.get("LOCAL_RANK", 0))  # set by Lightning for the process it starts
L.seed_everything(0)
encoder = Encoder(model_dir, query_max_length=16, doc_max_length=32)
dataset = BeirDataset(data_dir)
pairs = SupervisedPairs(dataset, dataset.qrels("train"))
index = np.arange(len(pairs))
clusters = index % 3 if rank == 0 else index * 3 // len(pairs)  # two different partitions into 3 clusters


class Recording(BiEncoderModule):
    qids = []

    def training_step(self, batch, batch_idx):
        self.qids.append(list(batch["qids"]))
        return super().training_step(batch, batch_idx)


module = Recording(encoder, InfoNCELoss(0.1))
sampler = ClusterBatchSampler(pairs, clusters, batch_size=4, clusters_per_batch=2, seed=5)
data = RetrievalDataModule(pairs, GroupCollator(encoder.tokenizer, 16, 32), batch_size=4, batch_sampler=sampler)
trainer = L.Trainer(max_steps=4, accelerator="cpu", devices=2, strategy="ddp", use_distributed_sampler=False,
                    logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
trainer.fit(module, datamodule=data)
torch.save({"qids": module.qids, "clusters": sampler.clusters.tolist(), "first": (index % 3).tolist()},
           f"{out_dir}/rank{trainer.global_rank}.pt")
