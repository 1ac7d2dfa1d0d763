# One command to set up and run each job on a fresh clone (see README.md):
#   make demo   - set up .venv and run the main job: `autoprune serve --demo` (API + embedded worker on SQLite,
#                 submit the bundled ResNet-20/digits job, watch it live, download the best model as ONNX)
#   make test   - set up .venv and run lint, type checks and the whole test suite (what CI runs)
# torch 2.13.0 (CPU build) is installed first and every version is pinned by constraints.txt, so pip never
# pulls a different torch build.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# Debian packages the tests use: docker-compose validates docker-compose.yml (`config`; no engine needed);
# chromium + chromium-driver run the dashboard's browser test (tests/service/test_dashboard.py, via selenium)
SYSTEM_PACKAGES := docker-compose chromium chromium-driver:chromedriver  # package[:the command it installs]
SRC    := autoprune agents service tests benchmarks

.PHONY: setup system demo test lint

system:
	@missing=""; for p in $(SYSTEM_PACKAGES); do \
	  command -v $${p##*:} >/dev/null || missing="$$missing $${p%%:*}"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -c constraints.txt torch==2.13.0
	$(BIN)/pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/autoprune serve --demo

lint: $(STAMP)
	$(BIN)/ruff check $(SRC)
	$(BIN)/ruff format --check $(SRC)
	$(BIN)/mypy

test:
	@start=$$(date +%s); \
	$(MAKE) --no-print-directory system lint && $(BIN)/pytest -q --durations=15; rc=$$?; \
	echo "make test: set-up, lint, type checks and tests took $$(( $$(date +%s) - start )) s (exit $$rc)"; exit $$rc
