"""The benchmarks: bench_train's model FLOPs against torch's FLOP counter, and each script runs on toy data."""
from __future__ import annotations

import functools
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from conftest import ROOT
from retrieval_lab.models.encoder import Encoder

sys.path.insert(0, str(ROOT / "experiments"))
from bench_train import model_flops  # noqa: E402


def test_model_flops_equal_what_torch_counts(tiny_model):
    """One forward of queries and documents of different lengths (each batch unpadded), with attention computed
    eagerly so that the counter sees its matrix products."""
    encoder = Encoder(tiny_model).eval()
    encoder.query_model.set_attn_implementation("eager")
    batch = {side: {"input_ids": torch.randint(1000, 2000, (3, n)), "attention_mask": torch.ones(3, n, dtype=torch.long)}
             for side, n in (("query", 9), ("docs", 40))}
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        encoder.encode_queries(batch["query"])
        encoder.encode_docs(batch["docs"])
    assert model_flops(encoder, batch, 1) == counter.get_total_flops()
    assert model_flops(encoder, batch, 3) == 3 * counter.get_total_flops()


# the GPU machines' image has torch, lightning and transformers but none of these (experiments/bench_gpu.sh runs there)
NOT_ON_THE_GPU_IMAGE = ("hydra", "omegaconf", "faiss", "bm25s", "wandb")


@functools.cache
def _gpu_image_blocker() -> str:
    """A folder whose sitecustomize.py (run at interpreter start-up when on PYTHONPATH) makes those imports fail."""
    folder = Path(tempfile.mkdtemp())
    (folder / "sitecustomize.py").write_text("import sys\n" + "".join(f"sys.modules[{m!r}] = None\n"
                                                                      for m in NOT_ON_THE_GPU_IMAGE))
    return str(folder)


def _run_script(name: str, *args: str) -> str:
    """Run experiments/<name> as on the GPU image: importing a package it lacks fails."""
    path = os.pathsep.join(filter(None, [_gpu_image_blocker(), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": path}
    result = subprocess.run([sys.executable, str(ROOT / "experiments" / name), *args], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_bench_encode_runs_and_both_paths_rank_alike(tiny_model, beir_folder):
    """The encoding benchmark on the toy corpus: ratios printed, and (float32 on a CPU) our embeddings and nDCG@10
    are the plain loop's."""
    import re

    out = _run_script("bench_encode.py", "--data", str(beir_folder), "--model", str(tiny_model), "--docs", "0",
                      "--repeat", "1", "--max-length", "32", "--token-budget", "256", "--profile",
                      "--tokenize-processes", "1")
    assert "end to end" in out and "tokenised cache" in out and out.count("ratio") == 2
    assert "tokenizer worker processes 1 (1)" in out
    assert "Self CPU time total" in out  # --profile: the profiler's table
    assert float(re.search(r"min cosine .*: ([\d.]+)", out).group(1)) >= 0.9999
    plain, ours = map(float, re.search(r"plain ([\d.]+), ours ([\d.]+)", out).groups())
    assert abs(plain - ours) < 1e-4


def test_bench_train_runs_with_and_without_caching(tiny_model, beir_folder):
    out = _run_script("bench_train.py", "--data", str(beir_folder), "--model", str(tiny_model), "--sizes", "4", "8",
                      "--chunk", "2", "--steps", "1", "--max-length", "16")
    rows = [line for line in out.splitlines() if line.startswith("| 4 |") or line.startswith("| 8 |")]
    assert len(rows) == 4 and all("out of memory" not in row for row in rows)
    assert sum("(plain at 8)" in row for row in rows) == 2  # cached rows compared with the largest plain batch
    loaders = [line for line in out.splitlines() if line.startswith("data pipeline at batch 4")]
    assert len(loaders) == 2 and "0 workers" in loaders[0] and "2 workers" in loaders[1]
    assert "taking turns" in loaders[0]


def test_bench_tokenize_runs_and_its_paths_agree(tiny_model, beir_folder):
    """The tokenisation benchmark on the toy corpus: five paths timed, two of them streamed in a thread and in
    worker processes (it stops if their ids differ)."""
    out = _run_script("bench_tokenize.py", "--data", str(beir_folder), "--model", str(tiny_model), "--repeat", "1",
                      "--max-length", "8", "--processes", "0", "2")
    assert out.count("ratio") == 5 and "60 texts (100% ASCII)" in out
    assert "streamed, thread" in out and "streamed, 2 proc" in out


def test_bench_overlap_runs(tiny_model, beir_folder):
    """The overlap benchmark on the toy corpus: end to end with tokenisation in a thread and in 2 worker processes."""
    out = _run_script("bench_overlap.py", "--data", str(beir_folder), "--model", str(tiny_model), "--repeat", "1",
                      "--max-length", "16", "--token-budget", "256", "--processes", "0", "2")
    assert "end to end, 0 proc" in out and "end to end, 2 proc" in out and out.count("against no overlap") == 2


def test_dtype_ranking_runs_against_float32(tiny_model, beir_folder):
    """The dtype check on the toy corpus: float32 is its own reference; a bf16 copy is close to it."""
    import re

    out = _run_script("dtype_ranking.py", "--data", str(beir_folder), "--model", str(tiny_model), "--max-length",
                      "32", "--dtypes", "bfloat16")
    cosines = dict(re.findall(r"^(\w+) +nDCG@10 [\d.]+ +min cosine to float32 ([\d.]+)", out, re.M))
    assert list(cosines) == ["float32", "bfloat16"] and float(cosines["float32"]) > 0.99999
    assert 0.99 < float(cosines["bfloat16"]) < 1


def test_bench_gil_runs(tiny_model, beir_folder):
    """The GIL benchmark on the toy corpus: launches counted with tokenisation in a thread and in a worker, each as
    a fraction of launching alone."""
    import re

    out = _run_script("bench_gil.py", "--data", str(beir_folder), "--model", str(tiny_model), "--repeat", "1",
                      "--max-length", "16")
    ratios = re.findall(r"tokenising in a (thread|worker process) +launches +([\d.]+)x of alone", out)
    assert [name for name, _ in ratios] == ["thread", "worker process"] and all(float(r) > 0 for _, r in ratios)


def test_bench_ddp_loss_runs_and_prints_a_ratio_per_loss():
    import re

    out = _run_script("bench_ddp_loss.py", "--batch", "16", "--world", "4", "--dim", "8", "--repeat", "1")
    ratios = re.findall(r"^(.+?) +every query .* ratio +([\d.]+)x$", out, re.M)
    assert [name for name, _ in ratios] == ["infonce", "infonce, bidirectional", "samtone, both sides"]
    assert all(float(r) > 0 for _, r in ratios)
    assert re.search(r"^false-negative mask \(\d+ pairs, same blocks: True\) .* ratio +[\d.]+x$", out, re.M)
