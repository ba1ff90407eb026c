"""Under DDP (2 CPU processes, gloo): MoCo enqueues the keys of every process, so all queues agree; the
bi-encoder scores against every process's documents, with the loss and gradients of one process."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from retrieval_lab.data.beir import BeirDataset
from retrieval_lab.data.datamodule import GroupCollator
from retrieval_lab.losses.samtone import SamToNeLoss
from retrieval_lab.models.biencoder import BiEncoderModule
from retrieval_lab.models.encoder import Encoder


def test_moco_gathers_keys_from_all_processes(tiny_model, beir_folder, tmp_path):
    script = Path(__file__).with_name("ddp_moco_script.py")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, str(script), str(tiny_model), str(beir_folder), str(tmp_path)],
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    assert ranks[0]["len"] == ranks[1]["len"] == 2 * 4 * 2  # 2 steps x 4 keys x 2 processes
    assert torch.allclose(ranks[0]["queue"], ranks[1]["queue"])
    first_step = ranks[0]["queue"][:8]
    assert not torch.allclose(first_step[:4], first_step[4:])  # the two processes' keys differ


@pytest.mark.parametrize("chunk", [0, 2])
def test_gathered_negatives_equal_the_single_process_batch(chunk, tiny_model, beir_folder, bm25_negatives, tmp_path):
    """Two processes with 3 queries each, scoring against each other's documents (SamToNe, both sides,
    bidirectional: every cross-process interaction counts), give the loss and gradients of one process on the
    6 queries; with gradient caching (chunk 2) too."""
    script = Path(__file__).with_name("ddp_gather_script.py")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, str(script), str(tiny_model), str(beir_folder), str(bm25_negatives),
                             str(tmp_path), str(chunk)], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    assert not set(ranks[0]["qids"]) & set(ranks[1]["qids"])

    encoder = Encoder(tiny_model, query_max_length=16, doc_max_length=32)
    for m in encoder.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    dataset = BeirDataset(beir_folder)
    qrels = dataset.qrels("train")
    examples = []
    for rank in ranks:
        docs = iter(rank["doc_ids"])
        for qid in rank["qids"]:
            ids = [next(docs), next(docs)]
            examples.append({"qid": qid, "query": dataset.queries[qid], "doc_ids": ids,
                             "docs": [dataset.corpus[d].full_text for d in ids],
                             "positives": {d for d, s in qrels[qid].items() if s > 0}})
    module = BiEncoderModule(encoder, SamToNeLoss(0.1, side="both", bidirectional=True), group_size=2)
    batch = GroupCollator(encoder.tokenizer, 16, 32)(examples)
    loss = module.loss_from_embeddings([embed(inputs) for embed, inputs in module.towers(batch)], batch)
    loss.backward()
    for rank in ranks:
        assert rank["loss"] == pytest.approx(loss.item(), rel=1e-5)
        for name, param in module.named_parameters():
            assert torch.allclose(rank["grads"][name], param.grad, atol=1e-6, rtol=1e-4), name
