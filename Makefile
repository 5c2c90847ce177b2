# Universal neurons pipeline. Every variable is documented in README.md.
PYTHON ?= .venv/bin/python
MODELS ?= toy-zoo
CHECKPOINT ?=
DATASET ?=
N_TOKENS ?=
CTX_LEN ?=
EXCLUDE_TOKENS ?=
REFERENCE ?= 0
ROTATIONS ?= 5
THRESHOLD ?=
TOP_K ?=
DEVICE ?= auto
WORKERS ?= 1
PARALLEL ?=
BATCH_SIZE ?=
QUICK ?=
SCHEDULER ?= auto
SCHEDULER_PORT ?= 8082
CACHE ?= auto
CORR_MEMORY ?=
CHECKPOINTS ?= 100 250 500 1000

# Build .venv only when no other interpreter was given (PYTHON=python3 uses yours as is).
ifeq ($(PYTHON),.venv/bin/python)
SETUP := .venv/.installed
else
SETUP :=
endif

export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup analyze report compare test browser bench scheduler scheduler-stop

setup: $(SETUP)

# The pinned requirements, then this project itself, editable (the `universal-neurons`
# command, `import universal_neurons_clean` from any directory).
.venv/.installed: requirements.txt pyproject.toml
	test -x .venv/bin/python || python3 -m venv .venv
	.venv/bin/python -m pip install --quiet --upgrade pip
	.venv/bin/python -m pip install --quiet -r requirements.txt
	.venv/bin/python -m pip install --quiet --no-deps -e .
	touch $@

RUN_ARGS = --models "$(MODELS)" --dataset "$(DATASET)" --n-tokens "$(N_TOKENS)" --ctx-len "$(CTX_LEN)" \
	--exclude-tokens "$(EXCLUDE_TOKENS)" \
	--reference "$(REFERENCE)" --rotations "$(ROTATIONS)" --threshold "$(THRESHOLD)" --top-k "$(TOP_K)" \
	--device "$(DEVICE)" --workers "$(WORKERS)" --parallel "$(PARALLEL)" --batch-size "$(BATCH_SIZE)" --scheduler "$(SCHEDULER)" --scheduler-port "$(SCHEDULER_PORT)" \
	--cache "$(CACHE)" --memory "$(CORR_MEMORY)" $(if $(QUICK),--quick)

analyze: $(SETUP)
	$(PYTHON) -m tasks analyze $(RUN_ARGS) --checkpoint "$(CHECKPOINT)"

report: $(SETUP)
	$(PYTHON) -m tasks report $(RUN_ARGS) --checkpoint "$(CHECKPOINT)"

compare: $(SETUP)
	$(PYTHON) -m tasks compare $(RUN_ARGS) --checkpoints "$(CHECKPOINTS)"

test: $(SETUP) browser
	HF_HUB_OFFLINE=1 $(PYTHON) -m pytest -q tests

# Debian's Chromium renders the HTML reports in the tests (skipped where it cannot be installed).
browser:
	@command -v chromium >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
		apt-get install -y -qq chromium >/dev/null; } || echo "chromium not installed: the rendering tests will skip"

bench: $(SETUP)
	HF_HUB_OFFLINE=1 $(PYTHON) -m bench.run

# The Luigi central scheduler (web UI at http://127.0.0.1:$(SCHEDULER_PORT)); state, pid
# file and logs under store/scheduler/.
scheduler: $(SETUP)
	$(PYTHON) -m tasks scheduler start --scheduler-port $(SCHEDULER_PORT)

scheduler-stop: $(SETUP)
	$(PYTHON) -m tasks scheduler stop
