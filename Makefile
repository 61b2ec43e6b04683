# Two entry points: `make demo` runs the main job, `make test` runs the checks.
# Both create the virtual environment in .venv on first use.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
DEMO := out/demo

.PHONY: demo test lint bench clean container container-test container-export

$(BIN)/pantherseg: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip==25.3
	$(BIN)/pip install --quiet -e ".[eval,dev,training]"
	touch $@

demo: $(BIN)/pantherseg
	$(BIN)/pantherseg synth $(DEMO)/phantoms --cases 6 --size small --seed 1
	$(BIN)/python examples/perturbed_predictions.py $(DEMO)/phantoms $(DEMO)/predictions
	$(BIN)/pantherseg evaluate --quiet --gt $(DEMO)/phantoms/LabelsTr \
	  --pred $(DEMO)/predictions/exact $(DEMO)/predictions/eroded $(DEMO)/predictions/shifted \
	  --images $(DEMO)/phantoms/ImagesTr --out $(DEMO)/evaluation --report $(DEMO)/report

lint: $(BIN)/pantherseg
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	$(BIN)/pytest

bench: $(BIN)/pantherseg
	$(BIN)/python -m bench.metrics

clean:
	rm -rf out

container:
	./build.sh

container-test: $(BIN)/pantherseg
	./test.sh

container-export:
	./export.sh
