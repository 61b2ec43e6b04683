# Two entry points: `make demo` runs the main job, `make test` runs the checks.
# Both create the virtual environment in .venv on first use.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
DEMO := out/demo
# The task whose shipped model and sample case `make demo` runs: task1 (T1 arterial MRI) or task2
# (T2 MR-Linac MRI), e.g. `make demo TASK=task2`.
TASK ?= task1
SAMPLE := test/samples/$(TASK)

.PHONY: demo demo-evaluation test lint bench clean container container-test container-export

$(BIN)/pantherseg: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip==25.3
	$(BIN)/pip install --quiet -e ".[eval,dev,training]"
	touch $@

# The container's entrypoint on the task's bundled sample case with its shipped model, then its
# scores.
demo: $(BIN)/pantherseg
	@test -d $(SAMPLE) || { echo "make demo: TASK must be task1 or task2, not '$(TASK)'" >&2; exit 2; }
	rm -rf $(DEMO)
	$(BIN)/python process.py --input $(SAMPLE)/input --output $(DEMO)/output --model models/$(TASK) --device cpu
	$(BIN)/pantherseg evaluate --quiet --gt $(SAMPLE)/label \
	  --pred $(DEMO)/output/images/pancreatic-tumor-segmentation \
	  --names shipped-model-$(TASK) --images $(wildcard $(SAMPLE)/input/images/*) \
	  --out $(DEMO)/evaluation --report $(DEMO)/report

# The evaluation on its own: phantoms scored against stand-in predictions (exact, eroded, shifted).
demo-evaluation: $(BIN)/pantherseg
	$(BIN)/pantherseg synth $(DEMO)-evaluation/phantoms --cases 6 --size small --seed 1
	$(BIN)/python examples/perturbed_predictions.py $(DEMO)-evaluation/phantoms $(DEMO)-evaluation/predictions
	$(BIN)/pantherseg evaluate --quiet --gt $(DEMO)-evaluation/phantoms/LabelsTr \
	  --pred $(DEMO)-evaluation/predictions/exact $(DEMO)-evaluation/predictions/eroded \
	  $(DEMO)-evaluation/predictions/shifted --images $(DEMO)-evaluation/phantoms/ImagesTr \
	  --out $(DEMO)-evaluation/evaluation --report $(DEMO)-evaluation/report

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
	./build.sh --task $(TASK)

container-test: $(BIN)/pantherseg
	./test.sh

container-export:
	./export.sh --task $(TASK)
