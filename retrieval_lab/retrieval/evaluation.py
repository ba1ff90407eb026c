"""Run a retriever on a split, score it, write the TREC run file; print metric tables."""
from __future__ import annotations

import time
from pathlib import Path

from retrieval_lab.data.beir import BeirSplit
from retrieval_lab.retrieval.metrics import evaluate_run
from retrieval_lab.retrieval.runfile import write_trec_run


def evaluate_retriever(retriever, split: BeirSplit, run_file: str | Path, k: int = 100,
                       metrics=("ndcg@10", "recall@100", "mrr@10"), tag: str = "retrieval_lab") -> dict[str, float]:
    start = time.perf_counter()
    run = retriever.retrieve(split.corpus, split.queries, k)
    write_trec_run(run, run_file, tag)  # first: the retrieval's work is kept even if scoring fails
    scores = evaluate_run(split.qrels, run, metrics)
    scores["seconds"] = round(time.perf_counter() - start, 2)
    return scores


def print_table(rows: dict[str, dict[str, float]], metrics, title: str | None = None) -> None:
    """A small table, one row per system (e.g. before/after training), one column per metric."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    table.add_column("")
    for metric in metrics:
        table.add_column(metric, justify="right")
    for name, scores in rows.items():
        table.add_row(name, *(f"{scores[m]:.4f}" if m in scores else "-" for m in metrics))
    Console().print(table)
