#!/usr/bin/env bash
# Issue 4 on SciFact: DPR (BM25 negatives), ANCE (refreshed dense negatives), TAS (query clusters) and TAS-B
# (TAS + margin-balanced pairs), each the scifact_infonce fine-tune of MiniLM with one hard negative per query.
# Then the table. Run from the repository root after `make data`.
set -euo pipefail
python -m retrieval_lab.mine retriever=bm25
python -m retrieval_lab.train -m experiment=scifact_infonce negatives=bm25,ance,tas,tasb eval.before=false \
    hydra.sweep.dir=multirun/hard_negatives
python experiments/table.py multirun/hard_negatives
