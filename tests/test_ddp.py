"""Under DDP (2 CPU processes, gloo): MoCo enqueues the keys of every process, so all queues agree; the
bi-encoder scores against every process's documents, with the loss and gradients of one process; validation and
ANCE's refresh share the corpus out; the train entry point writes one set of outputs, and two "machines" (on this
host) started by Lightning's launcher, torchrun or SLURM train exactly like two processes on one."""
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
from retrieval_lab.models.colbert import ColBERT
from retrieval_lab.models.encoder import Encoder


def run_script(name: str, *args) -> None:
    """Run tests/<name>, which starts its own 2 processes, offline with one thread each."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, str(Path(__file__).with_name(name)), *map(str, args)], env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


def test_moco_gathers_keys_from_all_processes(tiny_model, beir_folder, tmp_path):
    run_script("ddp_moco_script.py", tiny_model, beir_folder, tmp_path)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    assert ranks[0]["len"] == ranks[1]["len"] == 2 * 4 * 2  # 2 steps x 4 keys x 2 processes
    assert torch.allclose(ranks[0]["queue"], ranks[1]["queue"])
    first_step = ranks[0]["queue"][:8]
    assert not torch.allclose(first_step[:4], first_step[4:])  # the two processes' keys differ


def test_tas_batches_follow_the_first_processs_clusters(tiny_model, beir_folder, tmp_path):
    """Each process clusters the queries before the process group exists; when their clusters differ (here two
    different partitions), every process takes process 0's, so the processes' batches are the one sequence of
    batches that a single process draws from process 0's clusters, shared out in turn, none drawn twice."""
    from retrieval_lab.data.pairs import SupervisedPairs
    from retrieval_lab.data.sampling import ClusterBatchSampler

    run_script("ddp_tas_script.py", tiny_model, beir_folder, tmp_path)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    assert ranks[1]["clusters"] == ranks[0]["clusters"] == ranks[0]["first"]
    dataset = BeirDataset(beir_folder)
    pairs = SupervisedPairs(dataset, dataset.qrels("train"))
    single = [[pairs.qids[i] for i in batch]
              for batch in ClusterBatchSampler(pairs, ranks[0]["first"], batch_size=4, clusters_per_batch=2, seed=5)]
    assert len(single) >= 8
    assert [ranks[number % 2]["qids"][number // 2] for number in range(8)] == single[:8]


@pytest.mark.parametrize("chunk,towers,family", [(0, "shared", "encoder"), (2, "shared", "encoder"),
                                                 (2, "separate", "encoder"), (2, "shared", "colbert")])
def test_gathered_negatives_equal_the_single_process_batch(chunk, towers, family, tiny_model, beir_folder,
                                                           bm25_negatives, tmp_path):
    """Two processes with 3 queries each, scoring against each other's documents (SamToNe, both sides,
    bidirectional: every cross-process interaction counts), each taking its own queries' terms (the mean of their
    losses) give the loss and gradients of one process on the 6 queries, at each of 3 steps; with gradient caching (chunk 2) too, whose backward of a query chunk leaves the
    document tower without gradient when the towers are separate; and for ColBERT, whose token vectors are
    gathered padded to the longest document of either process."""
    run_script("ddp_gather_script.py", tiny_model, beir_folder, bm25_negatives, tmp_path, chunk, towers, family)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 3
    encoder = {"encoder": Encoder, "colbert": ColBERT}[family](tiny_model, query_max_length=16, doc_max_length=32,
                                                               shared_towers=towers == "shared")
    for m in encoder.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    dataset = BeirDataset(beir_folder)
    qrels = dataset.qrels("train")
    module = BiEncoderModule(encoder, SamToNeLoss(0.1, side="both", bidirectional=True), group_size=2)
    for step in range(3):
        steps = [rank[step] for rank in ranks]
        assert not set(steps[0]["qids"]) & set(steps[1]["qids"])
        for name, weight in steps[0]["weights"].items():
            assert torch.equal(weight, steps[1]["weights"][name]), (step, name)  # the processes stay in step
        assert not module.load_state_dict(steps[0]["weights"], strict=False).unexpected_keys
        module.zero_grad(set_to_none=True)
        examples = []
        for rank in steps:
            docs = iter(rank["doc_ids"])
            for qid in rank["qids"]:
                ids = [next(docs), next(docs)]
                examples.append({"qid": qid, "query": dataset.queries[qid], "doc_ids": ids,
                                 "docs": [dataset.corpus[d].full_text for d in ids],
                                 "positives": {d for d, s in qrels[qid].items() if s > 0}})
        batch = GroupCollator(encoder.tokenizer, 16, 32)(examples)
        loss = module.loss_from_embeddings([embed(inputs) for embed, inputs in module.towers(batch)], batch)
        loss.backward()
        assert (steps[0]["loss"] + steps[1]["loss"]) / 2 == pytest.approx(loss.item(), rel=1e-5), step
        assert steps[0]["loss"] != pytest.approx(steps[1]["loss"], rel=1e-3)  # each: its own queries' terms
        for rank in steps:
            for name, param in module.named_parameters():
                assert torch.allclose(rank["grads"][name], param.grad, atol=1e-6, rtol=1e-4), (step, name)


TRAIN_ARGS = ("data=beir", "batch_size=8", "trainer.max_epochs=1", "trainer.accelerator=cpu", "trainer.strategy=ddp",
              "eval.batch_size=16", "validation.corpus_sample=30", "logger.wandb.enabled=false")
LAUNCHER_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK")


def free_port() -> str:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


@pytest.fixture(scope="module")
def one_machine_run(tiny_model, beir_folder, tmp_path_factory):
    """`python -m retrieval_lab.train trainer.devices=2 trainer.strategy=ddp`: two CPU processes on one machine."""
    from conftest import run_module

    run_dir = tmp_path_factory.mktemp("one_machine")
    result = run_module("retrieval_lab.train", *TRAIN_ARGS, f"data.path={beir_folder}",
                        f"model.name_or_path={tiny_model}", "trainer.devices=2", f"hydra.run.dir={run_dir}",
                        env={"OMP_NUM_THREADS": "1"})
    return result, run_dir


def test_train_entry_point_under_ddp_writes_one_set_of_outputs(one_machine_run):
    """Each process takes half of every epoch's queries, and only the first one evaluates, saves and writes the
    outputs."""
    import json

    result, run_dir = one_machine_run
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("outputs in") == 1 and result.stdout.count("before training") == 1
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["steps"] == (36 // 2) // 8  # 36 training queries (10% carved for dev) split over 2 processes
    assert {"before", "after"} <= metrics.keys() and (run_dir / "model" / "config.json").is_file()


@pytest.mark.parametrize("launcher", ["lightning", "torchrun", "slurm"])
def test_two_machines_train_like_two_processes_on_one(launcher, one_machine_run, tiny_model, beir_folder, tmp_path):
    """The README's two-machine commands, with both "machines" on this one (one CPU process each, gloo, a shared
    run folder): Lightning's own launcher (MASTER_ADDR / NODE_RANK), torchrun, and a SLURM job's environment as
    srun sets it (what a submitit task sees). The trained weights equal those of two processes on one machine,
    and only node 0 writes the outputs."""
    from safetensors.torch import load_file

    train = ["-m", "retrieval_lab.train", *TRAIN_ARGS, f"data.path={beir_folder}", f"model.name_or_path={tiny_model}",
             "trainer.devices=1", "trainer.num_nodes=2", f"hydra.run.dir={tmp_path}"]
    port = free_port()
    base = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARIABLES and not k.startswith("SLURM_")}
    base.update(HF_HUB_OFFLINE="1", WANDB_SILENT="true", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    commands = []
    for node in (0, 1):
        env = dict(base)
        if launcher == "lightning":
            env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, NODE_RANK=str(node))
            command = [sys.executable, *train]
        elif launcher == "torchrun":
            command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
                       "--node-rank", str(node), "--master-addr", "127.0.0.1", "--master-port", port, *train]
        else:
            env.update(SLURM_JOB_ID="4321", SLURM_JOB_NAME="train", SLURM_NNODES="2", SLURM_NTASKS="2",
                       SLURM_NTASKS_PER_NODE="1", SLURM_NODELIST="127.0.0.1", SLURM_PROCID=str(node),
                       SLURM_LOCALID="0", SLURM_NODEID=str(node), MASTER_PORT=port)
            command = [sys.executable, *train]
        commands.append((command, env))
    nodes = [subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for command, env in commands]
    outputs = [node.communicate(timeout=600) for node in nodes]
    for node, (stdout, stderr) in zip(nodes, outputs):
        assert node.returncode == 0, stderr[-3000:]
    for text in ("before training", "outputs in"):  # the evaluation before training, and the outputs
        assert [text in stdout for stdout, _ in outputs] == [True, False], text

    _, one_machine = one_machine_run
    expected = load_file(one_machine / "model" / "model.safetensors")
    trained = load_file(tmp_path / "model" / "model.safetensors")
    assert trained.keys() == expected.keys()
    for name, weights in expected.items():
        assert torch.equal(trained[name], weights), name
    initial = load_file(tiny_model / "model.safetensors")
    assert any(not torch.equal(initial[name], trained[name]) for name in initial if name in trained)


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


@pytest.mark.parametrize("family", ["encoder", "colbert"])
def test_validation_retrieval_shares_the_corpus_out_and_ranks_like_one_process(family, tiny_model, beir_folder,
                                                                                 tmp_path):
    """Under DDP each process encodes half of the corpus and the halves are all-gathered: every process gets the
    ranking (documents and scores) of one process encoding everything (ColBERT: token vectors and masks, padded)."""
    import json

    from retrieval_lab.data.beir import BeirDataset
    from retrieval_lab.retrieval.dense import DenseRetriever

    run_script("ddp_retrieval_script.py", tiny_model, beir_folder, tmp_path, free_port(), family)
    split = BeirDataset(beir_folder).split("test")
    corpus = dict(list(split.corpus.items())[:59])
    torch.manual_seed(0)  # as the script: ColBERT's projection starts at random
    model = Encoder(tiny_model) if family == "encoder" else ColBERT(tiny_model, doc_max_length=32)
    expected = DenseRetriever(model, batch_size=8, progress=False, shard=True).retrieve(
        corpus, split.queries, 10)  # no process group: the whole corpus here
    for rank, share in ((0, 30), (1, 29)):
        saved = json.loads((tmp_path / f"rank{rank}.json").read_text())
        run = saved["run"]
        assert saved["docs_encoded"] == [share] and run.keys() == expected.keys()
        for qid, ranking in expected.items():
            assert list(run[qid]) == list(ranking)
            assert np.allclose(list(run[qid].values()), list(ranking.values()), atol=1e-5)


def test_ance_refresh_is_shared_out_and_swapped_in_at_the_same_step(tiny_model, beir_folder, bm25_negatives,
                                                                    tmp_path):
    """Under DDP each process encodes half of the corpus for an ANCE refresh, every process gets the table that
    one process mines with the same weights, and the processes swap it in at the same step, though one of them
    finishes 1.5 s later."""
    from retrieval_lab.data.negatives import read_negatives
    from retrieval_lab.data.pairs import SupervisedPairs
    from retrieval_lab.mining.ance import AnceRefresh

    run_script("ddp_ance_script.py", tiny_model, beir_folder, bm25_negatives, tmp_path)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    swaps = [[(h["ance/mined_at_step"], h["ance/swapped_at_step"]) for h in rank["history"]] for rank in ranks]
    assert len(swaps[0]) >= 2 and swaps[0] == swaps[1]
    assert all(swapped > mined for mined, swapped in swaps[0])
    corpus = ranks[0]["corpus"]
    assert ranks[0]["docs_encoded"][0] + ranks[1]["docs_encoded"][0] == corpus  # each process its half
    assert {ranks[0]["docs_encoded"][0], ranks[1]["docs_encoded"][0]} == {corpus // 2, corpus - corpus // 2}

    dataset = BeirDataset(beir_folder)
    qrels = dataset.qrels("train")
    pairs = SupervisedPairs(dataset, qrels, group_size=2, negatives=read_negatives(bm25_negatives, dataset, qrels))
    encoder = Encoder(tiny_model, query_max_length=16, doc_max_length=32)
    for refresh in range(2):
        assert ranks[0]["built"][refresh]["table"] == ranks[1]["built"][refresh]["table"]
        encoder.load_state_dict(ranks[0]["built"][refresh]["weights"])
        expected = AnceRefresh(pairs, depth=20, n_neg=3, batch_size=16).build_table(encoder.eval())
        assert ranks[0]["built"][refresh]["table"] == expected
    assert ranks[0]["built"][0]["table"] != ranks[0]["built"][1]["table"]  # training moved the negatives


@pytest.mark.parametrize("where", ["encode", "setup"])
def test_a_refresh_that_fails_on_one_process_stops_every_process_at_once(where, tiny_model, beir_folder,
                                                                        bm25_negatives, tmp_path):
    """Process 1 runs out of memory in an ANCE refresh: while encoding its share of the corpus, or while setting up
    its retriever, before the first collective. Process 0 learns it at its next all-gather instead of waiting there
    for gloo's timeout (30 minutes): both stop at the same step, soon after the refresh began, each with an error
    that names process 1's."""
    run_script("ddp_ance_failure_script.py", tiny_model, beir_folder, bm25_negatives, tmp_path, where)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    assert ranks[0]["step"] == ranks[1]["step"] < 20  # 200 steps of at least 0.1 s each, had training gone on
    for rank in ranks:
        assert rank["error"].startswith("the ANCE refresh begun at step 2 failed after")
    assert "process 1 of 2 failed: MemoryError: CUDA out of memory" in ranks[0]["error"]
    doing = {"encode": "encoding the corpus", "setup": "setting up the retriever"}[where]
    assert ranks[1]["error"].endswith(f"caused by MemoryError: CUDA out of memory while {doing}")


def test_a_non_finite_loss_in_one_process_stops_every_process(tiny_model, beir_folder, tmp_path):
    """Process 1's loss is NaN at step 2 (its third): both processes stop there with NumericFault, instead of
    process 0 waiting in the gradient all-reduce for a process that stopped, and the last good state is saved."""
    run_script("ddp_nan_script.py", tiny_model, beir_folder, tmp_path)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    assert ranks[0]["step"] == ranks[1]["step"] == 2
    assert ranks[1]["error"].startswith("step 2: the loss is nan on the batch of queries q")
    assert ranks[0]["error"].startswith("step 2: the loss is not finite in another process")
    assert torch.load(tmp_path / "checkpoints" / "last-good.ckpt", weights_only=False)["global_step"] == 2
