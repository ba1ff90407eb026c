# Everyday verbs. Extra arguments go in ARGS, e.g. make train ARGS="loss.temperature=0.02 trainer.max_epochs=1"
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Offline machines copy SciFact from this folder instead of downloading it (override: make data DATA_SOURCE=...).
DATA_SOURCE ?= $(wildcard ../shared/data/scifact)
TORCH_VERSION ?= 2.13.0
# pytest-xdist workers for make test: auto is one per core (about 1 GB of memory each); 0 runs the tests in one process
TEST_WORKERS ?= auto

.PHONY: install data demo train evaluate bm25 mine test sweep report bench clean

install: $(VENV)/.installed

# torch is pinned and installed first, so that pip does not pull the newest (multi-gigabyte CUDA) build.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==$(TORCH_VERSION)
	$(PY) -m pip install -q -e '.[test]'
	touch $@

data: install
	$(PY) -m retrieval_lab.data fetch scifact $(if $(DATA_SOURCE),--source $(DATA_SOURCE))

demo: data          ## the README's main job: short MiniLM fine-tune on SciFact, before/after metrics
	$(PY) -m retrieval_lab.train experiment=quick_cpu $(ARGS)

train: data         ## full training run (default: 3 epochs in-batch InfoNCE)
	$(PY) -m retrieval_lab.train $(ARGS)

evaluate: data      ## zero-shot evaluation of the configured model on SciFact test
	$(PY) -m retrieval_lab.evaluate $(ARGS)

bm25: data
	$(PY) -m retrieval_lab.evaluate retriever=bm25 $(ARGS)

mine: data          ## BM25 hard negatives for negatives=bm25|ance|tas|tasb
	$(PY) -m retrieval_lab.mine $(ARGS)

test: install       ## the whole suite in TEST_WORKERS processes (files stay whole: a DDP test's launches share a worker)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile $(ARGS)

sweep: data         ## a Hydra multirun, e.g. make sweep ARGS="loss.temperature=0.02,0.05 seed=1,2"
	$(PY) -m retrieval_lab.train -m $(or $(ARGS),experiment=quick_cpu loss.temperature=0.02,0.05,0.1)

report: install     ## one table + plots for a sweep: make report ARGS=multirun/<sweep>
	$(PY) -m retrieval_lab.report $(ARGS)

bench: data         ## corpus encoding throughput against a plain loop, same run
	$(PY) experiments/bench_encode.py $(ARGS)

clean:
	rm -rf runs multirun outputs
