# Two commands: `make demo` and `make test`. Both start from a fresh clone.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-$(shell sha1sum pyproject.toml | cut -c1-12)
DEMO_RUNTIME := $(CURDIR)/.demo-runtime

.PHONY: install demo test bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,bench]'
	rm -f $(VENV)/.installed-*
	touch $@

install: $(STAMP)

# Runs examples/quickstart.ipynb headless on the embedded local daemon (no GPU needed),
# prints every cell's output with its cost line, then stops that daemon by its pid.
demo: install
	mkdir -p $(DEMO_RUNTIME)
	JUPYTER_RUNTIME_DIR=$(DEMO_RUNTIME) $(VENV)/bin/jupyter nbconvert --to notebook --execute \
		examples/quickstart.ipynb --output-dir $(DEMO_RUNTIME) --output quickstart.out.ipynb; \
	status=$$?; \
	JUPYTER_RUNTIME_DIR=$(DEMO_RUNTIME) $(VENV)/bin/jupyter gpu stop; \
	test $$status -eq 0 && $(PY) examples/show_outputs.py $(DEMO_RUNTIME)/quickstart.out.ipynb

test: install
	$(PY) -m pytest -q

bench: install
	$(PY) bench/bench.py

clean:
	rm -rf $(VENV) $(DEMO_RUNTIME) .pytest_cache
