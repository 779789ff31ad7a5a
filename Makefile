# Two entry points for a fresh machine: `make demo` (the main job end to end) and
# `make test` (the suite). Both create .venv with every extra, torch pinned by constraints.txt.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test lint clean chromium

$(STAMP): pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	# constraints.txt pins torch/torchvision (their wheels are on the build machines' disk).
	$(BIN)/pip install -q -c constraints.txt -e '.[train,serve,cpu,dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m faar.demo --out out/demo

# tests/test_web.py drives Debian's headless Chromium; install it when missing and apt-get can
# (root). This never fails the build: without Chromium those tests skip and say why.
chromium:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then :; \
	elif command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
			chromium chromium-driver >/dev/null) || echo "chromium not installed: the browser tests will skip"; \
	else echo "no chromium and no apt-get as root: the browser tests will skip"; fi

test: $(STAMP) chromium
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf out runs .pytest_cache
