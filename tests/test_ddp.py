"""Under DDP (2 CPU processes, gloo), MoCo enqueues the keys of every process, so all queues agree."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch


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
