#!/usr/bin/env bash
# Every row of docs/results.md, on all 1,024 squad-open dev questions, each with a 95% bootstrap
# interval. Same data, same model init (the reader warm-up), same step budget for the trained rows.
#   bash jobs/results_squad_open.sh [extra --set overrides for the training runs...]
#   ROWS="reader retriever eval-gold eval-reader" bash jobs/results_squad_open.sh
#   ROWS="core ablation" bash jobs/results_squad_open.sh      # groups: core, ablation, more, all
# Writes runs/results/<row>.json and .log and prints the table. A row whose .json exists is not
# run again, so an interrupted run resumes where it stopped. Rows run in the order below whatever
# order ROWS names them in. Measured on 2 CPU cores (each row's time is in docs/results.md):
# - core (the default): the issue's rows (the reader on gold passages, closed-book, RAG-Sequence
#   frozen and trained, RAG-Token, the retriever warm-up, hybrid candidates) and the best model's
#   path (the longer reader, both DPR towers, their index, joint training, the reranker, EM read
#   from its top passage): about 3 h 10 min;
# - ablation: issue 11's fixes, each taken away alone (section 9, and rag-seq-gold) and the rank prior: about 75 min;
# - more: the other rows of docs/results.md (other decodings, K=1/K=3 variants, a third reader
#   round, a second DPR epoch and the reranker's whole epoch, which did not help): about 2 h 50 min,
#   and the end-to-end retriever with index refresh (rag-seq-e2e, rag-seq-e2e-stale): about 1 h more.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
CFG=jobs/configs/train_squad_open_cpu.yaml
OUT=runs/results
CORE="reader retriever eval-gold eval-reader eval-retriever eval-retriever-hybrid closed-book rag-seq-frozen rag-seq rag-token reader-2 eval-gold-2 retriever-dpr retrieval-dpr rag-seq-dpr reranker eval-reranker-k1"
ABLATION="rag-seq-gold reader-no-shuffle eval-gold-no-shuffle reader-pointer-identity eval-gold-pointer-identity eval-reader-no-span eval-reader-scale-1 retrieval-reranker-no-prior eval-reranker-k1-no-prior"
MORE="eval-hybrid-2 eval-hybrid-2-k1 reader-3 eval-gold-3 rag-seq-hybrid rag-seq-e2e rag-seq-e2e-stale rag-seq-2 eval-seq-2-k1 eval-seq-2-thorough eval-dpr eval-dpr-hybrid eval-dpr-hybrid-k1 retriever-dpr-2 retrieval-dpr-2 eval-seq-dpr-k1 retrieval-reranker eval-reranker reranker-epoch"
ALL="$CORE $ABLATION $MORE"  # the table prints every row that has run, in this order
ROWS=" ${ROWS:-core} "
ROWS=${ROWS// core / $CORE }; ROWS=${ROWS// ablation / $ABLATION }; ROWS=${ROWS// more / $MORE }; ROWS=${ROWS// all / $ALL }
EXTRA=("$@")
LIMIT=()
IDXS=indexes  # the indexes the rows build (the DPR towers'); the shared squad-open index is always indexes/squad-open
# SMOKE=1: every named row in one invocation on a tiny budget (2 training steps, 16 dev questions),
# into runs/results-smoke with its own checkpoints and indexes: checks that the whole chain runs, start to end, from
# a clean clone (15 min for core on 2 cores, with .venv and the index). Its numbers mean nothing.
if [ -n "${SMOKE:-}" ]; then
  OUT=runs/results-smoke; IDXS=$OUT/indexes
  EXTRA+=(--set optim.max_steps=2 --set eval.questions=16 --set log_every=1 --set checkpoint.storage_path="$OUT/runs")
  LIMIT=(--limit 16)
fi
mkdir -p "$OUT"
[ -f indexes/squad-open/current ] || "$BIN/rag-ray" index --config jobs/configs/index_squad_open.yaml

wanted() { [[ " $ROWS " == *" $1 "* ]] && [ ! -f "$OUT/$1.json" ]; }
field_of() { "$BIN/python" -c "import json, sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])" "$OUT/$1.json" "$2"; }
model_of() {  # a row's saved model (the rows after it start from it), or missing:<row> before it has run
  if [ -f "$OUT/$1.json" ]; then field_of "$1" model; else echo "missing:$1"; fi
}
needs() {  # row name, then its arguments: stop when they name the model of a row that has not run
  local row=$1 arg dep; shift
  for arg in "$@"; do
    if [[ "$arg" == *missing:* ]]; then
      dep=${arg##*missing:}; dep=${dep%%/*}
      echo "row $row needs row $dep's model first (ROWS=\"$dep $row\" or ROWS=core)" >&2; exit 1
    fi
  done
}
train() {  # row name, config, then overrides
  local row=$1 cfg=$2; shift 2
  wanted "$row" || return 0
  needs "$row" "$@"
  echo "$(date +%T) training: $row"
  "$BIN/rag-ray" train --config "$cfg" --set checkpoint.name="$row" --set report="$OUT/$row.json" \
    --set eval.predictions="$OUT/$row.predictions.jsonl" "$@" "${EXTRA[@]}" \
    > "$OUT/$row.log" 2>&1 || { echo "row $row failed; see $OUT/$row.log"; exit 1; }
}
reranker_recall() {  # row name, then eval-retrieval flags: the reranker row's order of its hybrid top 20
  local row=$1 model; shift
  wanted "$row" || return 0
  model=$(model_of reranker)
  needs "$row" "$model"
  echo "$(date +%T) evaluating: $row"
  "$BIN/rag-ray" eval-retrieval --index "$DPR_INDEX" --encoder "$model/query_encoder" --questions squad-open:dev \
    --hybrid --reranker "$model" --no-bm25 --json "${LIMIT[@]}" "$@" > "$OUT/$row.out" 2> "$OUT/$row.log" \
    || { echo "row $row failed; see $OUT/$row.log"; exit 1; }
  tail -n 1 "$OUT/$row.out" > "$OUT/$row.json"
}

evaluate() {  # row name, model, then eval-qa flags
  local row=$1 model=$2; shift 2
  wanted "$row" || return 0
  needs "$row" "$model"
  echo "$(date +%T) evaluating: $row"
  "$BIN/rag-ray" eval-qa --model "$model" --index "${IDX:-indexes/squad-open}" --questions squad-open:dev --decoding fast \
    --n-docs 3 --json --predictions "$OUT/$row.predictions.jsonl" "${LIMIT[@]}" "$@" > "$OUT/$row.out" 2> "$OUT/$row.log" \
    || { echo "row $row failed; see $OUT/$row.log"; exit 1; }
  tail -n 1 "$OUT/$row.out" > "$OUT/$row.json"
}

# 1. the reader warm-up (gold passages) and 2. the retriever warm-up from it (query encoder only)
# (every row of docs/results.md starts from a reader with the old default pointer, `small`; section 9
# measures `identity`, the default since)
# The reader rows end at their 800 steps, not at the config's 30-minute guard: on a slower 2-core
# machine (2026-11-27: 0.44-0.48 steps/s, against 0.66 before) 800 steps took 31-35 min.
GUARD=(--set optim.max_minutes=120)
train reader jobs/configs/train_reader_squad_open_cpu.yaml --set model.pointer_init=small "${GUARD[@]}"   # scored by eval-reader
READER=$(model_of reader)
train retriever jobs/configs/train_retriever_squad_open_cpu.yaml --set model.init_from="$READER"
RETRIEVER=$(model_of retriever)
# 3. no joint training: the reader on each question's gold passage alone (the ceiling), over
# MiniLM's retrieval, over the warmed-up retriever, and hybrid
evaluate eval-gold "$READER" --gold-passage
evaluate eval-reader "$READER"
evaluate eval-retriever "$RETRIEVER"
evaluate eval-retriever-hybrid "$RETRIEVER" --hybrid
# 3b. the reader trained on for 800 + 800 more steps (lr 1.5e-4, then 1e-4), from the retriever
# warm-up's model: a reader run leaves the query encoder and the scale as they are
READ=(--set eval.questions=0 "${GUARD[@]}")
train reader-2 jobs/configs/train_reader_squad_open_cpu.yaml --set model.init_from="$RETRIEVER" \
  --set optim.lr=1.5e-4 --set optim.copy_head_lr=1.5e-3 "${READ[@]}"
READER2=$(model_of reader-2)
evaluate eval-gold-2 "$READER2" --gold-passage
evaluate eval-hybrid-2 "$READER2" --hybrid
evaluate eval-hybrid-2-k1 "$READER2" --hybrid --n-docs 1   # the top passage alone
train reader-3 jobs/configs/train_reader_squad_open_cpu.yaml --set model.init_from="$READER2" \
  --set optim.lr=1.0e-4 --set optim.copy_head_lr=1.0e-3 "${READ[@]}"
if [ -f "$OUT/reader-3.json" ]; then  # no better than reader-2: it overfits (train loss ~1)
  evaluate eval-gold-3 "$(model_of reader-3)" --gold-passage
fi
# 4. joint training, 200 steps of batch 8 each, all from the reader's generator
DEV=(--set eval.questions=1024)
train closed-book    "$CFG" --set model.init_from="$READER" --set model.mode=closed_book --set eval.decoding=greedy "${DEV[@]}"
train rag-seq-frozen "$CFG" --set model.init_from="$READER" --set model.freeze_query_encoder=true "${DEV[@]}"
train rag-seq        "$CFG" --set model.init_from="$RETRIEVER" "${DEV[@]}"
train rag-seq-gold   "$CFG" --set model.init_from="$RETRIEVER" --set data.gold_in_top_k=true "${DEV[@]}"
train rag-seq-hybrid "$CFG" --set model.init_from="$RETRIEVER" --set model.hybrid=true "${DEV[@]}"
train rag-token      "$CFG" --set model.init_from="$RETRIEVER" --set model.mode=token --set eval.decoding=greedy "${DEV[@]}"
# 4b. the end-to-end retriever (group more): rag-seq with the passage encoder trained too, p(z|x) from the
# retrieved passages re-embedded by it, and the index rebuilt with it (Ray Data, into the run's own index
# root) every 50 steps and after the last; -stale rebuilds it only after the last, so training searches
# the first index throughout. Each row evaluates on its own last index (the report's "index").
E2E=(--set model.init_from="$RETRIEVER" --set model.train_passage_encoder=true "${DEV[@]}")
train rag-seq-e2e       "$CFG" "${E2E[@]}" --set index_refresh.every=50
train rag-seq-e2e-stale "$CFG" "${E2E[@]}" --set index_refresh.every=0
# 5. joint training from the longer reader: hybrid candidates, the gold passage in the top K, and
# a generator learning rate 10x lower (3e-5) than the rows above, which lowered EM at 3e-4
train rag-seq-2      "$CFG" --set model.init_from="$READER2" --set model.hybrid=true --set data.gold_in_top_k=true \
  --set optim.lr=3e-5 "${DEV[@]}"
# its model read from the top passage alone, and with thorough decoding (every hypothesis rescored
# on every passage) instead of fast
evaluate eval-seq-2-k1 "$(model_of rag-seq-2)" --hybrid --n-docs 1
evaluate eval-seq-2-thorough "$(model_of rag-seq-2)" --hybrid --decoding thorough

# 6. DPR's two towers: the retriever warm-up that also trains the passage encoder (from the longer
# reader, whose query encoder is the first warm-up's), then squad-open re-indexed with it into a
# second index; its recall (dense, and hybrid with BM25) and the reader over it
train retriever-dpr jobs/configs/train_retriever_squad_open_cpu.yaml --set model.init_from="$READER2" \
  --set model.train_passage_encoder=true --set optim.query_encoder_lr=5e-5 --set optim.max_steps=230 \
  --set checkpoint.every=230   # one epoch: 0.2 steps/s with both towers on 2 cores
if [ -f "$OUT/retriever-dpr.json" ]; then
  DPR=$(model_of retriever-dpr)
  DPR_INDEX=$IDXS/squad-open-dpr
  [ -f "$DPR_INDEX/current" ] || "$BIN/rag-ray" index --config jobs/configs/index_squad_open.yaml --out "$DPR_INDEX" \
    --encoder "$(field_of retriever-dpr passage_encoder)" > "$OUT/index-dpr.log" 2>&1
  if wanted retrieval-dpr; then
    echo "$(date +%T) evaluating: retrieval-dpr"
    "$BIN/rag-ray" eval-retrieval --index "$DPR_INDEX" --encoder "$DPR/query_encoder" --questions squad-open:dev \
      --hybrid --json "${LIMIT[@]}" > "$OUT/retrieval-dpr.out" 2> "$OUT/retrieval-dpr.log"
    tail -n 1 "$OUT/retrieval-dpr.out" > "$OUT/retrieval-dpr.json"
  fi
  IDX=$DPR_INDEX evaluate eval-dpr "$DPR"
  IDX=$DPR_INDEX evaluate eval-dpr-hybrid "$DPR" --hybrid
  IDX=$DPR_INDEX evaluate eval-dpr-hybrid-k1 "$DPR" --hybrid --n-docs 1
  # 6b. (only when named in ROWS) a second epoch of both towers from retriever-dpr's, with 2 BM25
  # hard negatives per question and lr 3e-5, its index rebuilt, and its recall
  train retriever-dpr-2 jobs/configs/train_retriever_squad_open_cpu.yaml --set index="$DPR_INDEX" \
    --set model.init_from="$DPR" --set model.train_passage_encoder=true --set data.hard_negatives=2 \
    --set optim.query_encoder_lr=3e-5 --set optim.max_steps=230 --set checkpoint.every=230
  if [ -f "$OUT/retriever-dpr-2.json" ]; then
    [ -f "$IDXS/squad-open-dpr-2/current" ] || "$BIN/rag-ray" index --config jobs/configs/index_squad_open.yaml \
      --out "$IDXS/squad-open-dpr-2" --encoder "$(field_of retriever-dpr-2 passage_encoder)" > "$OUT/index-dpr-2.log" 2>&1
    if wanted retrieval-dpr-2; then
      echo "$(date +%T) evaluating: retrieval-dpr-2"
      "$BIN/rag-ray" eval-retrieval --index "$IDXS/squad-open-dpr-2" --encoder "$(model_of retriever-dpr-2)/query_encoder" \
        --questions squad-open:dev --hybrid --json "${LIMIT[@]}" > "$OUT/retrieval-dpr-2.out" 2> "$OUT/retrieval-dpr-2.log"
      tail -n 1 "$OUT/retrieval-dpr-2.out" > "$OUT/retrieval-dpr-2.json"
    fi
  fi
  # 7. joint training over the rebuilt index, as rag-seq-2 (hybrid, gold in top K, lr 3e-5)
  train rag-seq-dpr "$CFG" --set index="$DPR_INDEX" --set model.init_from="$DPR" --set model.hybrid=true \
    --set data.gold_in_top_k=true --set optim.lr=3e-5 "${DEV[@]}"
  if [ -f "$OUT/rag-seq-dpr.json" ]; then
    IDX=$DPR_INDEX evaluate eval-seq-dpr-k1 "$(model_of rag-seq-dpr)" --hybrid --n-docs 1
    # 8. a cross-encoder reranker trained on that model's own hybrid top-20 (its recall is the
    # run's report), then the model with it reading the reranker's top 1 and top 3 of 20
    train reranker jobs/configs/train_reranker_squad_open_cpu.yaml --set index="$DPR_INDEX" \
      --set model.init_from="$(model_of rag-seq-dpr)"
    if [ -f "$OUT/reranker.json" ]; then
      # its order weighs the retriever's rank, logit - w·ln(1 + rank) at the default w = 1 (chosen on
      # training questions); the ablation's *-no-prior rows order by the logit alone (w = 0).
      # eval-reranker-k1 reports the reranked recall@1/5 itself; retrieval-reranker (group more)
      # adds the dense and hybrid columns of the same questions
      reranker_recall retrieval-reranker
      IDX=$DPR_INDEX evaluate eval-reranker-k1 "$(model_of reranker)" --hybrid --n-docs 1
      IDX=$DPR_INDEX evaluate eval-reranker "$(model_of reranker)" --hybrid
    fi
    # 8b. the same reranker trained for its whole epoch (900 steps, 41 min) instead of 20 minutes
    train reranker-epoch jobs/configs/train_reranker_squad_open_cpu.yaml --set index="$DPR_INDEX" \
      --set model.init_from="$(model_of rag-seq-dpr)" --set optim.max_minutes=45
  fi
fi

# 9. the ablation table (issue 11's fixes, each taken away alone from the rows it was measured on):
# the reader warm-up's fixes against `reader` (same 800 steps) by the gold-passage ceiling, and the
# read-time fixes against `eval-reader` (the same reader over MiniLM retrieval, K=3). Item 4 (the
# gold passage among distractors) is rag-seq against rag-seq-gold above.
# (GUARD, in READ: the 800 steps, not the clock, end these runs, as they ended `reader`)
SAME=(--set model.pointer_init=small "${READ[@]}")
train reader-no-shuffle jobs/configs/train_reader_squad_open_cpu.yaml --set shuffle=false "${SAME[@]}"
train reader-pointer-identity jobs/configs/train_reader_squad_open_cpu.yaml "${SAME[@]}" --set model.pointer_init=identity
if [ -f "$OUT/reader-no-shuffle.json" ]; then evaluate eval-gold-no-shuffle "$(model_of reader-no-shuffle)" --gold-passage; fi
if [ -f "$OUT/reader-pointer-identity.json" ]; then
  evaluate eval-gold-pointer-identity "$(model_of reader-pointer-identity)" --gold-passage
fi
evaluate eval-reader-no-span "$READER" --no-span-recovery
evaluate eval-reader-scale-1 "$READER" --doc-score-scale 1
# the reranker's rank prior (w = 1) against its logit alone: recall of its order, and EM reading its top 1
if [ -f "$OUT/reranker.json" ]; then
  DPR_INDEX=$IDXS/squad-open-dpr
  reranker_recall retrieval-reranker-no-prior --rerank-prior 0
  IDX=$DPR_INDEX evaluate eval-reranker-k1-no-prior "$(model_of reranker)" --hybrid --n-docs 1 --rerank-prior 0
elif wanted retrieval-reranker-no-prior || wanted eval-reranker-k1-no-prior; then
  echo "the *-no-prior rows need the reranker row first (ROWS=core)" >&2
fi

"$BIN/python" - "$OUT" $ALL <<'PY'
import json, sys, pathlib
out = pathlib.Path(sys.argv[1])
ci = lambda m, k: (f"{100 * m[k]:.1f} [{100 * m[k + '_ci95'][0]:.1f}, {100 * m[k + '_ci95'][1]:.1f}]"
                   if k in m and k + "_ci95" in m else (f"{100 * m[k]:.1f}" if k in m else "-"))
print(f"{'row':<22}{'EM [95% CI]':>22}{'F1 [95% CI]':>22}{'R@1':>20}{'R@5':>22}{'n':>6}")
for row in sys.argv[2:]:
    path = out / f"{row}.json"
    if not path.exists():
        continue
    r = json.loads(path.read_text())
    m = {**r.get("metrics", {}), **r} if "metrics" in r else r
    for system in [s for s in ("dense", "hybrid", "reranked") if s + "_ci95" in r]:  # an eval-retrieval report
        m = {"dev_questions": r["questions"], **{f"dev_{k}": r[system][k] for k in ("recall@1", "recall@5")},
             **{f"dev_{k}_ci95": r[system + "_ci95"][k] for k in ("recall@1", "recall@5")}}
        print(f"{row + ' ' + system:<22}{'-':>22}{'-':>22}{ci(m, 'dev_recall@1'):>20}{ci(m, 'dev_recall@5'):>22}"
              f"{m['dev_questions']:>6}")
    if "dense_ci95" in r:
        continue
    print(f"{row:<22}{ci(m, 'dev_em'):>22}{ci(m, 'dev_f1'):>22}{ci(m, 'dev_recall@1'):>20}{ci(m, 'dev_recall@5'):>22}"
          f"{m.get('dev_questions', '-'):>6}")
PY
