"""Collect the metrics.json of every run under a folder into one Markdown table (one row per run).

    python experiments/table.py multirun/2026-11-23_19-00-00 [--keys pairs negatives loss] [--stage after]

Columns: the chosen config choices (from each run's .hydra/overrides.yaml), nDCG@10, Recall@100, MRR@10.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml

METRICS = ("ndcg@10", "recall@100", "mrr@10")


def rows(folder: Path, stage: str):
    for metrics_file in sorted(folder.rglob("metrics.json")):
        run = metrics_file.parent
        overrides_file = run / ".hydra" / "overrides.yaml"
        overrides = yaml.safe_load(overrides_file.read_text()) if overrides_file.is_file() else []
        choices = dict(o.split("=", 1) for o in overrides if "=" in o)
        metrics = json.loads(metrics_file.read_text())
        yield run, choices, metrics.get(stage, metrics.get("metrics", {}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path)
    parser.add_argument("--keys", nargs="*", default=None, help="override keys to show (default: all that vary)")
    parser.add_argument("--stage", default="after")
    args = parser.parse_args()
    found = list(rows(args.folder, args.stage))
    if not found:
        raise SystemExit(f"error: no metrics.json under {args.folder}.")
    keys = args.keys or sorted({k for _, c, _ in found for k in c if len({x.get(k) for _, x, _ in found}) > 1})
    print("| " + " | ".join([*keys, *METRICS]) + " |")
    print("|" + " --- |" * (len(keys) + len(METRICS)))
    for _, choices, scores in found:
        cells = [choices.get(k, "") for k in keys] + [f"{scores[m]:.4f}" if m in scores else "-" for m in METRICS]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
