# Universal neurons pipeline. Every variable is documented in docs/reference.md.
PYTHON ?= .venv/bin/python
# Build .venv only when no other interpreter was given (PYTHON=python3 uses yours as is).
ifeq ($(PYTHON),.venv/bin/python)
SETUP := .venv/.installed
else
SETUP :=
endif

export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup lock analyze report compare plan clean-store test test-all browser bench rehearse readme-figures scheduler scheduler-stop

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

# The commands read their variables (MODELS, CHECKPOINT, N_TOKENS, ... every one is in
# docs/reference.md) from the environment make runs them with (--from-make): each is described
# once, in unlib/config.py. A variable given empty (N_TOKENS=) stays unset. `make plan` prints
# the correlation's plan for the same variables as analyze: nothing loaded, nothing written.
analyze report compare plan clean-store: $(SETUP)
	$(PYTHON) -m tasks $@ --from-make

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

# DEVICE=cuda: only the GPU section (precision modes, the stream's rate, projected paper runs).
bench: $(SETUP)
	HF_HUB_OFFLINE=1 $(PYTHON) -m bench.run

# The paper's path at reduced tokens: GPT-2-small-shaped random models, several passes, caches
# and no caches, killed and resumed with other WORKERS and CORR_MEMORY (bench/rehearse.py).
rehearse: $(SETUP)
	HF_HUB_OFFLINE=1 $(PYTHON) -m bench.rehearse

# The README's "What the default analysis finds", measured again on this machine and written
# into README.md with its name and the date (bench/readme_figures.py).
readme-figures: $(SETUP)
	HF_HUB_OFFLINE=1 $(PYTHON) -m bench.readme_figures

# The Luigi central scheduler (web UI at http://127.0.0.1:8082, or SCHEDULER_HOST:SCHEDULER_PORT);
# state, pid file and logs under store/scheduler/.
scheduler: $(SETUP)
	$(PYTHON) -m tasks scheduler start --from-make

scheduler-stop: $(SETUP)
	$(PYTHON) -m tasks scheduler stop
