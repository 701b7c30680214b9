# The two commands: `make demo` and `make test`. Both create .venv when it is missing.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
ZOO    := $(VENV)/bin/zoo
STAMP  := $(VENV)/.installed
DEMO_DIR ?= models
PYTEST_ARGS ?=
# Tests run in parallel processes, one per CPU up to 4 (pytest-xdist): 12 min instead of 18 on 2 cores.
TEST_WORKERS ?= -n auto --maxprocesses 4

.PHONY: demo test lint bench bench-quick clean tflite-venv

# Reinstall only when the project's metadata changed.
$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev,deploy]"
	@touch $(STAMP)

# onnxruntime-web for the web target, from the pinned package-lock.json (npm writes the marker).
# Without npm the web target alone is unavailable and says so; everything else still installs.
WEB_DIR   := pipeline/export/web
WEB_STAMP := $(WEB_DIR)/node_modules/.package-lock.json
$(WEB_STAMP): $(WEB_DIR)/package-lock.json
	@if command -v npm >/dev/null; then cd $(WEB_DIR) && npm ci --ignore-scripts --no-audit --no-fund; \
	else echo "npm not found: the web target is unavailable (apt-get install nodejs npm, then make)"; fi

# onnx2tf, the tflite target's converter, in its own venv: it pins numpy, onnx, onnxruntime, opencv
# and protobuf versions that would break .venv (README "Deploy"). zoo runs it as a subprocess.
TFLITE_VENV  := .venv-tflite
TFLITE_STAMP := $(TFLITE_VENV)/.installed
TFLITE_REQS  := pipeline/export/tflite-requirements.txt
$(TFLITE_STAMP): $(TFLITE_REQS)
	@test -x $(TFLITE_VENV)/bin/python || $(PYTHON) -m venv $(TFLITE_VENV)
	$(TFLITE_VENV)/bin/python -m pip install --quiet -r $(TFLITE_REQS)
	@touch $(TFLITE_STAMP)

tflite-venv: $(TFLITE_STAMP)

test: $(STAMP) $(WEB_STAMP) $(TFLITE_STAMP)
	$(PY) -m pytest $(TEST_WORKERS) $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# The whole chain, offline: the bundled pretrained model, built-in digits, the export gate.
DEMO_RUN     := $(DEMO_DIR)/demo-efficientnet-lite0-digits
DEMO_SAMPLES := $(DEMO_DIR)/demo-samples
ZOOD         := $(ZOO) --models-dir $(DEMO_DIR)

demo: $(STAMP) $(WEB_STAMP) $(TFLITE_STAMP)
	$(ZOOD) list
	$(ZOOD) fetch efficientnet-lite0
	@rm -rf $(DEMO_RUN) $(DEMO_SAMPLES) && mkdir -p $(DEMO_SAMPLES)
	@$(PY) -c "from skimage import data; from PIL import Image; Image.fromarray(data.chelsea()).save('$(DEMO_SAMPLES)/chelsea.png')"
	$(ZOOD) predict $(DEMO_DIR)/efficientnet-lite0/model.onnx $(DEMO_SAMPLES)/chelsea.png --top-k 3
	$(ZOOD) adapt efficientnet-lite0 --classes 10 --out $(DEMO_RUN)
	$(ZOOD) export $(DEMO_RUN)
	$(ZOOD) verify $(DEMO_RUN)/model.onnx --run $(DEMO_RUN) --runtimes ort,opencv
	@$(PY) -c "from pipeline.core.samples import DataSplit; from pipeline.data.images import open_image; s = DataSplit.load('$(DEMO_RUN)/split.json'); [open_image(r).save(f'$(DEMO_SAMPLES)/test{i}-true-{s.class_names[y]}.png') for i, (r, y) in enumerate(s.test[:6])]"
	$(ZOOD) predict $(DEMO_RUN)/model.onnx $(DEMO_SAMPLES)/test*.png --top-k 2
	@echo
	@echo "Done. The fetched model:      $(DEMO_DIR)/efficientnet-lite0/model.onnx"
	@echo "      The run (metrics, plots): $(DEMO_RUN)/"
	@echo "      The deployable file:      $(DEMO_RUN)/model.onnx (labels and preprocessing in its metadata)"

bench: $(STAMP)
	$(PY) -m bench.run

bench-quick: $(STAMP)
	$(PY) -m bench.run --quick

clean:
	rm -rf $(VENV) $(TFLITE_VENV) .pytest_cache .ruff_cache *.egg-info
