#!/usr/bin/env bash
# ME-BERT against DPR in one run of this script: each the dpr_scifact recipe (MiniLM, 1 BM25 negative + in-batch,
# batch 32, tau 0.05), the model family the only change. ME-BERT m = 1 is the [CLS] bi-encoder (a control: MiniLM
# was trained with mean pooling). Run from the repository root after `make data`.
#   bash experiments/mebert/run.sh            # the recipe as committed (3 epochs, documents up to 256 tokens)
#   CPU=1 bash experiments/mebert/run.sh      # CPU-sized: 1 epoch, documents up to 128 tokens
set -euo pipefail
PY=${PY:-python}
OUT=${OUT:-runs/mebert}
SIZE=()
if [ "${CPU:-0}" = 1 ]; then SIZE=(trainer.max_epochs=1 model.doc_max_length=128 validation.enabled=false); fi
[ -f data/scifact/negatives/bm25-train.jsonl ] || $PY -m retrieval_lab.mine retriever=bm25
for run in "dpr model=minilm" "mebert_m4 model=mebert model.vectors=4" "mebert_m1 model=mebert model.vectors=1"; do
    name=${run%% *}; model=${run#* }
    # shellcheck disable=SC2086
    $PY -m retrieval_lab.train experiment=dpr_scifact $model eval.before=false logger.wandb.enabled=false \
        "${SIZE[@]}" "hydra.run.dir=$OUT/$name"
done
$PY - "$OUT" <<'PY'
import json, sys
from pathlib import Path
print("| run | nDCG@10 | Recall@100 | MRR@10 | fit seconds |\n| --- | --- | --- | --- | --- |")
for run in ("dpr", "mebert_m4", "mebert_m1"):
    m = json.loads((Path(sys.argv[1]) / run / "metrics.json").read_text())
    a = m["after"]
    print(f"| {run} | {a['ndcg@10']:.4f} | {a['recall@100']:.4f} | {a['mrr@10']:.4f} | {m['fit_seconds']} |")
PY
