# Two commands: `make demo` and `make test`. Both start from a fresh clone.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-$(shell sha1sum pyproject.toml | cut -c1-12)
DEMO_RUNTIME := $(CURDIR)/.demo-runtime

ROOTFS := .cache/rootfs-bookworm.tar
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: install system-deps test-image demo test bench clean

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

# What the tests start for real: Debian's Docker engine (the tests run dockerd on their own
# socket), OpenSSH's sshd (on a loopback port), and a debootstrap root file system for the
# test images (about 40 s, cached).
system-deps:
	@if [ ! -x /usr/sbin/dockerd ] || [ ! -x /usr/sbin/debootstrap ] || [ ! -x /usr/sbin/sshd ]; then \
		$(SUDO) apt-get update -q && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q docker.io debootstrap openssh-server; \
	fi

$(ROOTFS): | system-deps
	rm -rf .cache/rootfs && mkdir -p .cache
	$(SUDO) /usr/sbin/debootstrap --variant=minbase \
		--include=python3,python3-cffi-backend,python3-zmq,python3-cloudpickle \
		bookworm .cache/rootfs http://deb.debian.org/debian
	$(SUDO) tar -C .cache/rootfs -cf $@.tmp . && mv $@.tmp $@ && $(SUDO) rm -rf .cache/rootfs

test-image: $(ROOTFS)

test: install system-deps test-image
	$(PY) -m pytest -q

bench: install
	$(PY) bench/bench.py

clean:
	rm -rf $(VENV) $(DEMO_RUNTIME) .pytest_cache
