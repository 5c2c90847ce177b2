# Universal neurons pipeline. Every variable is documented in README.md.
PYTHON ?= .venv/bin/python
# Empty unless set: `python -m tasks` holds every default (tasks/common.py), so a variable is
# passed on only when given.
MODELS ?=
CHECKPOINT ?=
DATASET ?=
N_TOKENS ?=
CTX_LEN ?=
EXCLUDE_TOKENS ?=
REFERENCE ?=
ROTATIONS ?=
THRESHOLD ?=
TOP_K ?=
ABLATION ?=
ABLATION_TOKENS ?=
ABLATION_SAMPLES ?=
DEVICE ?=
WORKERS ?=
PARALLEL ?=
BATCH_SIZE ?=
QUICK ?=
SCHEDULER ?=
SCHEDULER_PORT ?=
SCHEDULER_HOST ?=
SCHEDULER_GPUS ?=
CACHE ?=
CORR_MEMORY ?=
CHECKPOINTS ?=
CONFIRM ?=

# Build .venv only when no other interpreter was given (PYTHON=python3 uses yours as is).
ifeq ($(PYTHON),.venv/bin/python)
SETUP := .venv/.installed
else
SETUP :=
endif

export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup lock analyze report compare plan clean-store test test-all browser bench scheduler scheduler-stop

setup: $(SETUP)

# The locked requirements (requirements.lock: the exact version of every package), then this
# project itself, editable (the `universal-neurons` command, `import universal_neurons_clean`
# from any directory).
.venv/.installed: requirements.lock pyproject.toml
	test -x .venv/bin/python || python3 -m venv .venv
	.venv/bin/python -m pip install --quiet --upgrade pip
	.venv/bin/python -m pip install --quiet -r requirements.lock
	.venv/bin/python -m pip install --quiet --no-deps -e .
	touch $@

# requirements.lock anew from requirements.txt (the direct requirements), resolved in a scratch
# venv; torch's local build label (+cpu) is dropped, so the pin also takes a CUDA build of it.
lock:
	rm -rf .lock-venv && python3 -m venv .lock-venv
	.lock-venv/bin/python -m pip install --quiet -r requirements.txt
	{ echo "# Exact versions of everything make setup installs: make lock writes this from requirements.txt"; \
	  .lock-venv/bin/python -m pip freeze --exclude-editable | sed -E 's/^(torch==[^+]*)\+.*/\1/'; } > requirements.lock
	rm -rf .lock-venv

# `--option "value"` for each variable that is set (given empty, as `N_TOKENS=`, it stays unset).
option = $(if $(strip $($(1))),--$(2) "$($(1))")
RUN_ARGS = $(call option,MODELS,models) $(call option,DATASET,dataset) $(call option,N_TOKENS,n-tokens) \
	$(call option,CTX_LEN,ctx-len) $(call option,EXCLUDE_TOKENS,exclude-tokens) $(call option,REFERENCE,reference) \
	$(call option,ROTATIONS,rotations) $(call option,THRESHOLD,threshold) $(call option,TOP_K,top-k) \
	$(call option,ABLATION,ablation) $(call option,ABLATION_TOKENS,ablation-tokens) \
	$(call option,ABLATION_SAMPLES,ablation-samples) \
	$(call option,DEVICE,device) $(call option,WORKERS,workers) $(call option,PARALLEL,parallel) \
	$(call option,BATCH_SIZE,batch-size) $(call option,SCHEDULER,scheduler) $(call option,SCHEDULER_PORT,scheduler-port) \
	$(call option,CACHE,cache) $(call option,CORR_MEMORY,memory) $(if $(QUICK),--quick)

analyze: $(SETUP)
	$(PYTHON) -m tasks analyze $(RUN_ARGS) $(call option,CHECKPOINT,checkpoint)

report: $(SETUP)
	$(PYTHON) -m tasks report $(RUN_ARGS) $(call option,CHECKPOINT,checkpoint)

# The correlation's plan for the same variables as analyze: nothing loaded, nothing written.
plan: $(SETUP)
	$(PYTHON) -m tasks plan $(RUN_ARGS) $(call option,CHECKPOINT,checkpoint)

# What the store holds that no output needs (set-aside damaged files, leftovers of interrupted
# writes, correlation blocks of another plan), with their sizes; CONFIRM=1 removes them.
clean-store: $(SETUP)
	$(PYTHON) -m tasks clean-store $(if $(filter 1 yes true,$(CONFIRM)),--confirm)

compare: $(SETUP)
	$(PYTHON) -m tasks compare $(RUN_ARGS) $(call option,CHECKPOINTS,checkpoints)

# The suite without the slow end-to-end scenarios (under 10 minutes on 2 cores); test-all runs them too.
# Test modules are spread over one pytest-xdist worker per core (a module's tests stay together).
test: $(SETUP) browser
	HF_HUB_OFFLINE=1 $(PYTHON) -m pytest -q -n auto --dist loadfile -m "not slow" tests

test-all: $(SETUP) browser
	HF_HUB_OFFLINE=1 $(PYTHON) -m pytest -q -n auto --dist loadfile tests

# Debian's Chromium renders the HTML reports in the tests (skipped where it cannot be installed).
browser:
	@command -v chromium >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
		apt-get install -y -qq chromium >/dev/null; } || echo "chromium not installed: the rendering tests will skip"

bench: $(SETUP)
	HF_HUB_OFFLINE=1 $(PYTHON) -m bench.run

# The Luigi central scheduler (web UI at http://127.0.0.1:8082, or SCHEDULER_HOST:SCHEDULER_PORT);
# state, pid file and logs under store/scheduler/.
scheduler: $(SETUP)
	$(PYTHON) -m tasks scheduler start $(call option,SCHEDULER_PORT,scheduler-port) \
		$(call option,SCHEDULER_HOST,scheduler-host) $(call option,SCHEDULER_GPUS,gpus)

scheduler-stop: $(SETUP)
	$(PYTHON) -m tasks scheduler stop
