#!/usr/bin/env bash
# The four rows of docs/results.md: same data, same model init (the reader warm-up), same step
# budget for each row.
#   bash jobs/results_squad_open.sh [extra --set overrides...]
# Writes runs/results/<row>.json (the final report of each run) and prints a summary table.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
CFG=jobs/configs/train_squad_open_cpu.yaml
OUT=runs/results
mkdir -p "$OUT"
[ -f indexes/squad-open/manifest.json ] || "$BIN/rag-ray" index --config jobs/configs/index_squad_open.yaml
run() {  # row name, then overrides
  local row=$1; shift
  "$BIN/rag-ray" train --config "$CFG" --set checkpoint.name="$row" --set report="$OUT/$row.json" "$@" "${EXTRA[@]}" \
    > "$OUT/$row.log" 2>&1 || { echo "row $row failed; see $OUT/$row.log"; exit 1; }
  echo "done: $row"
}
EXTRA=("$@")
# 1. the reader warm-up (gold passages), 2. the four rows, each starting from the reader
[ -f "$OUT/reader.json" ] || \
  "$BIN/rag-ray" train --config jobs/configs/train_reader_squad_open_cpu.yaml --set report="$OUT/reader.json" "${EXTRA[@]}" \
    > "$OUT/reader.log" 2>&1 || { echo "reader failed; see $OUT/reader.log"; exit 1; }
READER=$("$BIN/python" -c "import json, sys; print(json.load(open(sys.argv[1]))['model'])" "$OUT/reader.json")
echo "reader: $READER"
EXTRA+=(--set model.init_from="$READER")
run closed-book      --set model.mode=closed_book --set eval.decoding=greedy
run rag-seq-frozen   --set model.freeze_query_encoder=true
run rag-seq          # the config as is: RAG-Sequence, query encoder trained
run rag-token        --set model.mode=token --set eval.decoding=greedy
"$BIN/python" - "$OUT" <<'PY'
import json, sys, pathlib
print(f"{'run':<18}{'EM':>7}{'F1':>7}{'R@5':>7}{'steps':>7}{'min':>7}")
for row in ("reader", "closed-book", "rag-seq-frozen", "rag-seq", "rag-token"):
    r = json.loads((pathlib.Path(sys.argv[1]) / f"{row}.json").read_text())
    m = r["metrics"]
    rec = m.get("dev_recall@5")
    print(f"{row:<18}{100 * m['dev_em']:>7.1f}{100 * m['dev_f1']:>7.1f}{'-' if rec is None else f'{100 * rec:.1f}':>7}"
          f"{m['step']:>7}{m['wall_seconds'] / 60:>7.1f}")
PY
