#!/usr/bin/env bash
# Issue 7 on one GPU, in one go: tokenisation on the machine's cores (in one call, streamed in a thread and in
# worker processes; how much each holds up a thread launching work), corpus encoding (token budget or fixed
# batches, autocast or a bf16 / fp16 copy of the weights, tokenised in worker processes or a thread), the ranking
# each weight dtype gives, training with and without gradient caching, whether the training data pipeline keeps up
# with the GPU (0 to 8 DataLoader workers), how much GPU memory BM25's JAX import leaves free, and (issue 26) MaxSim
# scoring and token-vector search (exact, ANN, PLAID) at 1x, 10x and 100x SciFact's size.
# Every benchmark prints its ratio against a plain baseline measured in the same run. Run from the repository
# root after `make data`. MODEL: the encoder (default: the packaged MiniLM); REPEAT: timings per path (median);
# DOCS, SIZES and DDP_BATCH: fewer documents and smaller batches for a dry run on a CPU (DOCS=64 SIZES="8 16"
# DDP_BATCH=64).
set -uo pipefail
MODEL=${MODEL:-packaged:minilm}
REPEAT=${REPEAT:-5}
DOCS=${DOCS:-0}
SIZES=${SIZES:-512 2048 8192}
DDP_BATCH=${DDP_BATCH:-2048}  # queries per process in bench_ddp_loss.py (8 processes)
encode() {
    echo "== python experiments/bench_encode.py --docs $DOCS --repeat $REPEAT $*"
    python experiments/bench_encode.py --model "$MODEL" --docs "$DOCS" --repeat "$REPEAT" "$@" 2>&1 | grep -v "Loading weights"
}
echo "== python experiments/bench_tokenize.py --processes 0 1 2 4 (every core of this machine)"
python experiments/bench_tokenize.py --model "$MODEL" --repeat "$REPEAT" --processes 0 1 2 4
for threads in 1 "$(nproc)"; do  # does tokenisation in a thread hold up the thread that launches the kernels?
    echo "== python experiments/bench_gil.py --rust-threads $threads"
    python experiments/bench_gil.py --model "$MODEL" --repeat "$REPEAT" --rust-threads "$threads" 2>&1 \
        | grep -v "Loading weights"
done
encode --token-budget 262144 --profile                # and the top GPU kernels of one cached encoding
encode --token-budget 262144 --tokenize-processes 0   # tokenised in a thread instead of worker processes
echo "== python experiments/bench_overlap.py --processes 0 1 2 4 (does tokenisation overlap with the GPU?)"
python experiments/bench_overlap.py --model "$MODEL" --repeat "$REPEAT" --docs "$DOCS" --processes 0 1 2 4 2>&1 \
    | grep -v "Loading weights"
encode --token-budget 262144 --plain-batch-size 128   # the plain baseline of the first H100 figures
encode --token-budget 262144 --dtype bfloat16
encode --token-budget 262144 --dtype float16          # fp16 keeps 3 more mantissa bits than bf16
echo "== python experiments/dtype_ranking.py (nDCG@10 of float32, autocast, bf16 and fp16 weights)"
python experiments/dtype_ranking.py --model "$MODEL" --docs "$DOCS" 2>&1 | grep -v "Loading weights"
encode --token-budget 262144 --compile                # torch.compile (compiled in the untimed warm-up)
encode
encode --dtype bfloat16
echo "== python experiments/bench_train.py --sizes $SIZES --chunk 1024 --steps 2 --loader-workers 0 2 4 8"
python experiments/bench_train.py --model "$MODEL" --sizes $SIZES --chunk 1024 --steps 2 --loader-workers 0 2 4 8 2>&1 \
    | grep -v "Loading weights"
echo "== python experiments/bench_ddp_loss.py --batch $DDP_BATCH --world 8 (one DDP process's loss: every query or its own)"
python experiments/bench_ddp_loss.py --batch "$DDP_BATCH" --world 8 --repeat "$REPEAT"
echo "== GPU memory free before and after a BM25 search (bm25s imports JAX, which must stay on the CPU)"
python - <<'PY'
import importlib.util
import sys

import torch

if importlib.util.find_spec("bm25s") is None:
    sys.exit("skipped: bm25s is not installed here")

from retrieval_lab.data.beir import BeirDataset
from retrieval_lab.retrieval.bm25 import BM25Retriever

def free() -> float:
    return torch.cuda.mem_get_info()[0] / 2**30 if torch.cuda.is_available() else float("nan")


before = free()
test = BeirDataset("data/scifact").split("test")
BM25Retriever().retrieve(test.corpus, test.queries, 100)
print(f"free GiB: {before:.1f} before, {free():.1f} after")
PY
echo "== python experiments/late_interaction/bench_maxsim.py --device cuda (MaxSim against one einsum per pair)"
python experiments/late_interaction/bench_maxsim.py --device cuda
echo "== python experiments/late_interaction/bench_search.py --scales 1 10 100 --dim 128 --doc-tokens 64 --device cuda"
python experiments/late_interaction/bench_search.py --scales 1 10 100 --dim 128 --doc-tokens 64 --device cuda
