"""Under DDP (2 CPU processes, gloo): MoCo enqueues the keys of every process, so all queues agree; the
bi-encoder scores against every process's documents, with the loss and gradients of one process; validation
shares the corpus out; the train entry point writes one set of outputs."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
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


def test_train_entry_point_under_ddp_writes_one_set_of_outputs(tiny_model, beir_folder, tmp_path):
    """`python -m retrieval_lab.train trainer.devices=2 trainer.strategy=ddp` (two CPU processes): each process
    takes half of every epoch's queries, and only the first one evaluates, saves and writes the outputs."""
    import json

    from conftest import run_module

    result = run_module("retrieval_lab.train", "data=beir", f"data.path={beir_folder}",
                        f"model.name_or_path={tiny_model}", "batch_size=8", "trainer.max_epochs=1",
                        "trainer.accelerator=cpu", "trainer.devices=2", "trainer.strategy=ddp",
                        "eval.batch_size=16", "validation.corpus_sample=30", "logger.wandb.enabled=false",
                        f"hydra.run.dir={tmp_path}", env={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("outputs in") == 1 and result.stdout.count("before training") == 1
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["steps"] == (36 // 2) // 8  # 36 training queries (10% carved for dev) split over 2 processes
    assert {"before", "after"} <= metrics.keys() and (tmp_path / "model" / "config.json").is_file()


@pytest.mark.parametrize("env, first", [({}, True), ({"LOCAL_RANK": "1"}, False), ({"NODE_RANK": "1"}, False),
                                        ({"RANK": "0", "LOCAL_RANK": "0"}, True), ({"RANK": "3"}, False),
                                        ({"SLURM_PROCID": "2"}, False), ({"SLURM_PROCID": "0"}, True)])
def test_first_process_is_known_from_the_launchers_environment(env, first, monkeypatch):
    from retrieval_lab.train import is_first_process

    for name in ("RANK", "SLURM_PROCID", "LOCAL_RANK", "NODE_RANK"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert is_first_process() is first


def test_validation_retrieval_shares_the_corpus_out_and_ranks_like_one_process(tiny_model, beir_folder, tmp_path):
    """Under DDP each process encodes half of the corpus and the halves are all-gathered: every process gets the
    ranking (documents and scores) of one process encoding everything."""
    import json
    import socket

    from retrieval_lab.data.beir import BeirDataset
    from retrieval_lab.retrieval.dense import DenseRetriever

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    script = Path(__file__).with_name("ddp_retrieval_script.py")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, str(script), str(tiny_model), str(beir_folder), str(tmp_path), port],
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    split = BeirDataset(beir_folder).split("test")
    corpus = dict(list(split.corpus.items())[:59])
    expected = DenseRetriever(Encoder(tiny_model), batch_size=8, progress=False, shard=True).retrieve(
        corpus, split.queries, 10)  # no process group: the whole corpus here
    for rank, share in ((0, 30), (1, 29)):
        saved = json.loads((tmp_path / f"rank{rank}.json").read_text())
        run = saved["run"]
        assert saved["docs_encoded"] == [share] and run.keys() == expected.keys()
        for qid, ranking in expected.items():
            assert list(run[qid]) == list(ranking)
            assert np.allclose(list(run[qid].values()), list(ranking.values()), atol=1e-5)
