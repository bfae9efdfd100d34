# rag_ray: two commands on a fresh machine (see README.md)
#   make quickstart   set up .venv, then index, train, evaluate and serve RAG on squad-open (rag-ray quickstart)
#   make test         set up .venv, run the test suite (what CI runs)
PY      ?= python3
VENV    ?= .venv
BIN      = $(VENV)/bin
INDEX   ?= indexes/squad-open
export HF_HUB_OFFLINE ?= 1
export RAY_USAGE_STATS_ENABLED ?= 0

# torch is pinned in the same pip command as everything else: unpinned, pip pulls a multi-GB CUDA build.
$(BIN)/rag-ray: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0 -e '.[test]'
	touch $@

.PHONY: venv quickstart test index bench
venv: $(BIN)/rag-ray

index: venv
	$(BIN)/rag-ray index --corpus squad-open --out $(INDEX) --shards 2 --overwrite

# BUDGET (training minutes) and ARGS (e.g. ARGS=--no-keep) pass through to rag-ray quickstart
BUDGET  ?= 13
quickstart: venv
	$(BIN)/rag-ray quickstart --budget-minutes $(BUDGET) $(ARGS)

test: venv
	$(BIN)/python -m pytest -q tests
