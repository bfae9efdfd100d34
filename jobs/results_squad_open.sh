#!/usr/bin/env bash
# Every row of docs/results.md, on all 1,024 squad-open dev questions, each with a 95% bootstrap
# interval. Same data, same model init (the reader warm-up), same step budget for the trained rows.
#   bash jobs/results_squad_open.sh [extra --set overrides for the training runs...]
#   ROWS="reader retriever eval-reader eval-retriever eval-retriever-hybrid rag-seq" bash jobs/results_squad_open.sh
# Writes runs/results/<row>.json and .log and prints the table. A row whose .json exists is not
# run again, so an interrupted run resumes where it stopped. On 2 CPU cores: index 1 min, reader
# 25 min, retriever warm-up 5 min, each eval-only row about 6 min, each trained row about 18 min
# (12 min of training, 6 of evaluation): about 2 h 20 min for all of it.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
CFG=jobs/configs/train_squad_open_cpu.yaml
OUT=runs/results
ALL="reader retriever eval-gold eval-reader eval-retriever eval-retriever-hybrid closed-book rag-seq-frozen rag-seq rag-seq-gold rag-seq-hybrid rag-token"
ROWS=${ROWS:-$ALL}
EXTRA=("$@")
mkdir -p "$OUT"
[ -f indexes/squad-open/current ] || "$BIN/rag-ray" index --config jobs/configs/index_squad_open.yaml

wanted() { [[ " $ROWS " == *" $1 "* ]] && [ ! -f "$OUT/$1.json" ]; }
model_of() { "$BIN/python" -c "import json, sys; print(json.load(open(sys.argv[1]))['model'])" "$OUT/$1.json"; }
train() {  # row name, config, then overrides
  local row=$1 cfg=$2; shift 2
  wanted "$row" || return 0
  echo "$(date +%T) training: $row"
  "$BIN/rag-ray" train --config "$cfg" --set checkpoint.name="$row" --set report="$OUT/$row.json" "$@" "${EXTRA[@]}" \
    > "$OUT/$row.log" 2>&1 || { echo "row $row failed; see $OUT/$row.log"; exit 1; }
}
evaluate() {  # row name, model, then eval-qa flags
  local row=$1 model=$2; shift 2
  wanted "$row" || return 0
  echo "$(date +%T) evaluating: $row"
  "$BIN/rag-ray" eval-qa --model "$model" --index indexes/squad-open --questions squad-open:dev --decoding fast \
    --n-docs 3 --json "$@" > "$OUT/$row.out" 2> "$OUT/$row.log" || { echo "row $row failed; see $OUT/$row.log"; exit 1; }
  tail -n 1 "$OUT/$row.out" > "$OUT/$row.json"
}

# 1. the reader warm-up (gold passages) and 2. the retriever warm-up from it (query encoder only)
train reader jobs/configs/train_reader_squad_open_cpu.yaml   # scored over 1,024 questions by eval-reader
READER=$(model_of reader)
train retriever jobs/configs/train_retriever_squad_open_cpu.yaml --set model.init_from="$READER"
RETRIEVER=$(model_of retriever)
# 3. no joint training: the reader on each question's gold passage alone (the ceiling), over
# MiniLM's retrieval, over the warmed-up retriever, and hybrid
evaluate eval-gold "$READER" --gold-passage
evaluate eval-reader "$READER"
evaluate eval-retriever "$RETRIEVER"
evaluate eval-retriever-hybrid "$RETRIEVER" --hybrid
# 4. joint training, 200 steps of batch 8 each, all from the reader's generator
DEV=(--set eval.questions=1024)
train closed-book    "$CFG" --set model.init_from="$READER" --set model.mode=closed_book --set eval.decoding=greedy "${DEV[@]}"
train rag-seq-frozen "$CFG" --set model.init_from="$READER" --set model.freeze_query_encoder=true "${DEV[@]}"
train rag-seq        "$CFG" --set model.init_from="$RETRIEVER" "${DEV[@]}"
train rag-seq-gold   "$CFG" --set model.init_from="$RETRIEVER" --set data.gold_in_top_k=true "${DEV[@]}"
train rag-seq-hybrid "$CFG" --set model.init_from="$RETRIEVER" --set model.hybrid=true "${DEV[@]}"
train rag-token      "$CFG" --set model.init_from="$RETRIEVER" --set model.mode=token --set eval.decoding=greedy "${DEV[@]}"

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
    print(f"{row:<22}{ci(m, 'dev_em'):>22}{ci(m, 'dev_f1'):>22}{ci(m, 'dev_recall@1'):>20}{ci(m, 'dev_recall@5'):>22}"
          f"{m.get('dev_questions', '-'):>6}")
PY
