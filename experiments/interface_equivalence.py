"""Every loss, through the model-family interface, against the code before it (losses on embeddings).

    python experiments/interface_equivalence.py --old 864bee7

checks out ``--old`` into a temporary git worktree, computes each loss's value and its gradients with respect to
the query, document and queue embeddings there (a subprocess importing the old package), computes them here
through ``ModelFamily.score_blocks`` + the loss, and prints the largest absolute difference of each. Fixed
batches: B=8 queries, groups of G=3, D=16, a random false-negative mask, a queue of 5 keys with its own mask,
teacher scores, and a DDP-style subset of anchor rows.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

CASES = [  # (loss class, its settings, inputs the batch carries)
    ("infonce.InfoNCELoss", {"temperature": 0.05}, ["mask"]),
    ("infonce.InfoNCELoss", {"temperature": 0.1, "bidirectional": True}, ["mask", "rows"]),
    ("infonce.InfoNCELoss", {"temperature": 0.05}, ["mask", "queue", "queue_mask"]),
    ("samtone.SamToNeLoss", {"temperature": 0.05, "side": "query"}, ["mask"]),
    ("samtone.SamToNeLoss", {"temperature": 0.05, "side": "document"}, ["mask", "rows"]),
    ("samtone.SamToNeLoss", {"temperature": 0.1, "side": "both", "bidirectional": True}, ["mask"]),
    ("samtone.SamToNeLoss", {"temperature": 0.05, "side": "query"}, ["mask", "queue", "queue_mask"]),
    ("margin_mse.MarginMSELoss", {"scale": 2.0}, ["teacher"]),
    ("margin_mse.MarginMSELoss", {"alpha": 0.3, "temperature": 0.1}, ["mask", "teacher", "rows"]),
    ("listwise_kl.ListwiseKLLoss", {"temperature": 0.05, "teacher_temperature": 2.0}, ["teacher"]),
    ("listwise_kl.ListwiseKLLoss", {"temperature": 0.1}, ["teacher", "rows"]),
]
B, G, D, K = 8, 3, 16, 5


def inputs(case: int):
    import torch

    gen = torch.Generator().manual_seed(100 + case)
    q = torch.nn.functional.normalize(torch.randn(B, D, generator=gen), dim=-1).requires_grad_()
    d = torch.nn.functional.normalize(torch.randn(B * G, D, generator=gen), dim=-1).requires_grad_()
    queue = torch.nn.functional.normalize(torch.randn(K, D, generator=gen), dim=-1).requires_grad_()
    mask = torch.rand(B, B * G, generator=gen) < 0.08
    mask[torch.arange(B), torch.arange(B) * G] = False  # a query's own target is never masked
    return {"q": q, "d": d, "queue": queue, "mask": mask, "queue_mask": torch.rand(B, K, generator=gen) < 0.3,
            "teacher": torch.randn(B, G, generator=gen) * 3, "rows": torch.tensor([1, 4, 6])}


def compute(side: str) -> list[dict]:
    """Each case's loss and gradients, by the old API (``side='old'``) or the new one."""
    import importlib

    out = []
    for number, (target, settings, carried) in enumerate(CASES):
        module, name = target.split(".")
        loss = getattr(importlib.import_module(f"retrieval_lab.losses.{module}"), name)(**settings)
        x = inputs(number)
        kwargs = {k: x[k] for k in carried}
        if side == "old":
            value = loss(x["q"], x["d"], group_size=G, **kwargs)
        else:
            from retrieval_lab.models.family import loss_on_vectors

            value = loss_on_vectors(loss, x["q"], x["d"], group_size=G, **kwargs)
        value.backward()
        grads = {k: x[k].grad.tolist() for k in ("q", "d", "queue") if x[k].grad is not None}
        out.append({"case": f"{name} {settings} {carried}", "value": value.item(), "grads": grads})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old", default="864bee7", help="the commit before the interface (default: 864bee7)")
    parser.add_argument("--side", choices=["old", "new"], help=argparse.SUPPRESS)  # the subprocess's part
    args = parser.parse_args()
    if args.side:
        import retrieval_lab

        print(json.dumps({"package": retrieval_lab.__file__, "cases": compute(args.side)}))
        return
    root = Path(__file__).resolve().parent.parent
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp) / "old"
        subprocess.run(["git", "-C", str(root), "worktree", "add", "--detach", "-q", str(tree), args.old], check=True)
        try:
            env = {**os.environ, "PYTHONPATH": str(tree)}
            result = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--side", "old"],
                                    cwd=tree, env=env, capture_output=True, text=True, check=True)
            old = json.loads(result.stdout.strip().splitlines()[-1])
            assert old["package"].startswith(str(tree)), old["package"]  # the old code, not this checkout
            old = old["cases"]
        finally:
            subprocess.run(["git", "-C", str(root), "worktree", "remove", "--force", str(tree)], check=True)
    new = compute("new")
    import numpy as np

    worst = 0.0
    print(f"{'case':<100} {'old value':>12} {'|value diff|':>13} {'max |grad diff|':>16}")
    for o, n in zip(old, new):
        assert o["case"] == n["case"] and set(o["grads"]) == set(n["grads"]), (o["case"], n["case"])
        value = abs(o["value"] - n["value"])
        grad = max(float(np.abs(np.subtract(o["grads"][k], n["grads"][k])).max()) for k in o["grads"])
        worst = max(worst, value, grad)
        print(f"{n['case']:<100} {o['value']:>12.6f} {value:>13.2e} {grad:>16.2e}")
    print(f"largest difference: {worst:.2e} ({'within' if worst <= 1e-6 else 'BEYOND'} 1e-6)")
    sys.exit(0 if worst <= 1e-6 else 1)


if __name__ == "__main__":
    main()
