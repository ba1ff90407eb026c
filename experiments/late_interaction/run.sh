#!/usr/bin/env bash
# Late interaction against the single vector on SciFact, in one run of this script, each pair at the same budget
# and seed:
#   1. the DPR recipe (dpr_scifact: MiniLM, 1 BM25 negative + in-batch, batch 32): single-vector DPR against
#      ColBERT-MiniLM (MaxSim, temperature 1: ColBERT's scores are sums of cosines);
#   2. distillation from the cross-encoder teacher (module=cross_encoder, trained here; its scores of a 7-negative
#      BM25 file): the listwise-KL single-vector student (listwise_kl_scifact) against ColBERTv2 (loss=colbertv2:
#      the same KL plus in-batch cross-entropy);
#   3. the trained ColBERTv2 searched four ways: exact MaxSim, ColBERT v1's ANN candidates, PLAID with 2-bit and
#      1-bit residuals; and as a re-ranker of BM25's top 100 (reranker=model);
# then retrieval_lab.report's paired t-test for each comparison. Both model kinds read documents of the same length.
# Run from the repository root after `make data`.
#   bash experiments/late_interaction/run.sh          # the full recipes (3 epochs, 256-token documents; a GPU)
#   CPU=1 bash experiments/late_interaction/run.sh    # CPU-sized: 1 epoch, 128-token documents, a 1-epoch
#                                                     # teacher (not evaluated)
set -euo pipefail
PY=${PY:-python}
OUT=${OUT:-runs/late_interaction}
NEG=data/scifact/negatives
COMMON=(eval.before=false logger.wandb.enabled=false checkpoint.every_n_steps=0)
if [ "${CPU:-0}" = 1 ]; then
    # the CPU teacher is not evaluated (re-ranking BM25's top 100 of 300 queries takes it half an hour)
    DOCS=128; SIZE=(trainer.max_epochs=1 validation.enabled=false); TEACHER=(negatives.group_size=4 batch_size=8
        trainer.max_epochs=1 model.max_length=192 eval.after=false); TEACHER_LENGTH=192
else
    DOCS=256; SIZE=(); TEACHER=(negatives.group_size=8 batch_size=16 trainer.max_epochs=10 model.max_length=320)
    TEACHER_LENGTH=320
fi
COLBERT=(model=colbert model.doc_max_length=$DOCS)
run() {  # name, then the run's overrides; a finished run (its metrics.json) is kept
    local name=$1; shift
    [ -f "$OUT/$name/metrics.json" ] && return
    echo "== $name"
    $PY -m retrieval_lab.train "${COMMON[@]}" "$@" "hydra.run.dir=$OUT/$name"
}
[ -f $NEG/bm25-train.jsonl ] || $PY -m retrieval_lab.mine retriever=bm25
[ -f $NEG/bm25top7-train.jsonl ] || $PY -m retrieval_lab.mine n_neg=7 output=$NEG/bm25top7-train.jsonl
[ -d "$OUT/teacher/model" ] || run teacher module=cross_encoder "${TEACHER[@]}" optim.lr=5e-5 validation.enabled=false
[ -f $NEG/ce-train.jsonl ] || $PY -m retrieval_lab.score model.name_or_path=$OUT/teacher/model \
    model.max_length=$TEACHER_LENGTH input=$NEG/bm25top7-train.jsonl output=$NEG/ce-train.jsonl \
    hydra.run.dir=$OUT/score
run dpr_recipe/dpr experiment=dpr_scifact model=minilm model.doc_max_length=$DOCS "${SIZE[@]}"
run dpr_recipe/colbert experiment=dpr_scifact "${COLBERT[@]}" loss.temperature=1 "${SIZE[@]}"
run distillation/listwise_kl experiment=listwise_kl_scifact model=minilm model.doc_max_length=$DOCS "${SIZE[@]}"
run distillation/colbertv2 experiment=listwise_kl_scifact "${COLBERT[@]}" loss=colbertv2 loss.temperature=1 "${SIZE[@]}"
# the trained ColBERTv2 searched every way, its corpus encoded once (index size, build time, latency, quality)
[ -f "$OUT/search/results.json" ] || $PY experiments/late_interaction/search_modes.py \
    $OUT/distillation/colbertv2/model --out $OUT/search
[ -f "$OUT/rerank_bm25/metrics.json" ] || $PY -m retrieval_lab.evaluate retriever=bm25 reranker=model model=colbert \
    model.name_or_path=$OUT/distillation/colbertv2/model "hydra.run.dir=$OUT/rerank_bm25"
# the single vector's objective exactly (listwise KL alone), on ColBERT: the family's share of the difference
run distillation/colbert_kl experiment=listwise_kl_scifact "${COLBERT[@]}" loss.temperature=1 "${SIZE[@]}"
for pair in "dpr_recipe model=minilm" "distillation model=minilm"; do
    $PY -m retrieval_lab.report "$OUT/${pair%% *}" --baseline "${pair#* }"
    cat "$OUT/${pair%% *}/report/report.md"
done
