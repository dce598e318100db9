# Two commands: `make demo` and `make test`. Both start from a fresh clone.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-$(shell sha1sum pyproject.toml | cut -c1-12)
DEMO_RUNTIME := $(CURDIR)/.demo-runtime

ROOTFS := .cache/rootfs-bookworm.tar
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: install system-deps test-image demo test bench clean

LABEXT_SRC := labextension/package.json labextension/package-lock.json labextension/tsconfig.json \
	$(wildcard labextension/src/*.ts labextension/src/*.tsx labextension/style/*)
NODE_MODULES := labextension/node_modules/.package-lock.json

# The labextension's node modules, as locked. `npm install`, not `npm ci`: the package
# registry here lacks rspack's bindings for other platforms, which `npm ci` insists on.
$(NODE_MODULES): labextension/package.json labextension/package-lock.json | system-deps
	cd labextension && npm install --no-audit --no-fund

# The package, editable, with the labextension built into it by hatch-jupyter-builder
# (JupyterLab's builder comes from the venv, hence the build deps first and PATH).
$(STAMP): pyproject.toml $(LABEXT_SRC) $(NODE_MODULES)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q 'hatchling>=1.21' 'hatch-jupyter-builder>=0.9' 'jupyterlab>=4.2,<5'
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(PY) -m pip install -q --no-build-isolation -e '.[test,bench]'
	rm -f $(VENV)/.installed-*
	touch $@

install: $(STAMP)

# Runs examples/quickstart.ipynb headless (nbclient: examples/run_headless.py) on the embedded
# local daemon, which reads examples/demo/jupyter_gpu_config.py (JUPYTER_CONFIG_DIR): one
# simulated H100 at its list price, so cost lines are in dollars with no GPU. Prints every
# cell's output, the status lines the cells showed and what they cost, then stops that daemon
# by its pid. A fresh demo daemon each time (a leftover one stopped, its ledger removed), so
# the first run of a cell has no "last run" estimate and the second has.
demo: install
	mkdir -p $(DEMO_RUNTIME)
	rm -f $(DEMO_RUNTIME)/quickstart.out.ipynb
	export JUPYTER_CONFIG_DIR=$(CURDIR)/examples/demo JUPYTER_RUNTIME_DIR=$(DEMO_RUNTIME); \
	$(VENV)/bin/jupyter gpu stop >/dev/null && \
	$(PY) -c 'import shutil, sys; from kernel_worker.daemon.paths import default_state_dir as state; \
	shutil.rmtree(state(sys.argv[1]), ignore_errors=True)' $(DEMO_RUNTIME)/jupyter-gpu-daemon.json && \
	$(PY) examples/run_headless.py examples/quickstart.ipynb $(DEMO_RUNTIME)/quickstart.out.ipynb; \
	status=$$?; \
	$(VENV)/bin/jupyter gpu stop; \
	test -f $(DEMO_RUNTIME)/quickstart.out.ipynb && $(PY) examples/show_outputs.py $(DEMO_RUNTIME)/quickstart.out.ipynb; \
	exit $$status

# What the build and the tests start for real: Node.js and npm (the labextension), Debian's
# Docker engine (the tests run dockerd on their own socket), OpenSSH's sshd (on a loopback
# port), Debian's Chromium (driven by Playwright; never a downloaded browser), Debian's Slurm
# (slurm-wlm: slurmctld, slurmd and the client commands) with munge (the tests start munged,
# slurmctld and slurmd with their own config: tests/support/slurm.py), runc (the OCI runtime
# Slurm's --container runs the test bundle with: tests/support/slurm_oci.py; bookworm's crun
# 1.8 refuses a hybrid cgroup layout such as this VM's), and a debootstrap root file system
# for the test images (about 40 s, cached). This target starts no daemon (here
# /usr/sbin/policy-rc.d keeps apt from starting them; slurmctld's and slurmd's units need an
# /etc/slurm/slurm.conf, which nothing writes).
system-deps:
	@if [ ! -x /usr/sbin/dockerd ] || [ ! -x /usr/sbin/debootstrap ] || [ ! -x /usr/sbin/sshd ] \
		|| [ ! -x /usr/bin/chromium ] || ! command -v npm >/dev/null \
		|| [ ! -x /usr/sbin/slurmctld ] || [ ! -x /usr/sbin/slurmd ] || [ ! -x /usr/bin/sbatch ] \
		|| [ ! -x /usr/sbin/munged ] || [ ! -x /usr/sbin/runc ]; then \
		$(SUDO) apt-get update -q && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q docker.io debootstrap openssh-server chromium \
			slurm-wlm munge runc $$(command -v npm >/dev/null || echo nodejs npm); \
	fi

# The archive comes from this machine's own apt sources (scripts/apt-source.sh): the
# repository names no package host.
$(ROOTFS): | system-deps
	archive=$$(scripts/apt-source.sh bookworm main) && \
	rm -rf .cache/rootfs && mkdir -p .cache && \
	$(SUDO) /usr/sbin/debootstrap --variant=minbase \
		--include=python3,python3-cffi-backend,python3-zmq,python3-cloudpickle \
		bookworm .cache/rootfs "$$archive"
	$(SUDO) tar -C .cache/rootfs -cf $@.tmp . && mv $@.tmp $@ && $(SUDO) rm -rf .cache/rootfs

test-image: $(ROOTFS)

test: install system-deps test-image
	cd labextension && npm test --silent
	$(PY) -m pytest -q

# Where torch is installed (a GPU machine): the snapshot's torch path, a CUDA model included.
test-gpu: install
	JUPYTER_GPU_TORCH_TESTS=1 $(PY) -m pytest -q tests/gpu

bench: install
	$(PY) bench/bench.py

# N real kernels at once through nbclient against one daemon (bench/load.py); options as
# `make bench-load LOAD_ARGS="--n 8,16 --cells 10"`.
.PHONY: bench-load bench-restart bench-money
bench-load: install
	$(PY) bench/load.py $(LOAD_ARGS)

# A daemon restarted mid-cell, and %gpu attach replaying buffered output (bench/restart.py).
bench-restart: install
	$(PY) bench/restart.py

# Snapshot write and restore of a 1 GiB numpy namespace beside np.save/np.load of the same
# arrays, and one small name read lazily out of it (bench/snapshot.py; run as root, it drops
# the page cache before each cold read).
.PHONY: bench-snapshot
bench-snapshot: install
	$(PY) bench/snapshot.py

# Money (bench/money.py): a budget's stop, a spend report on a 1,000,000-record ledger, and
# what per-cell accounting adds to the empty-cell round trip beside the commit before it;
# options as `make bench-money MONEY_ARGS="--rows 100000 --only ledger"`.
bench-money: install
	$(PY) bench/money.py $(MONEY_ARGS)

clean:
	rm -rf $(VENV) $(DEMO_RUNTIME) .pytest_cache labextension/node_modules labextension/lib \
		server/jupyter_gpu_server/labextension

# The differential run on the whole corpus of public notebooks (tests/differential/corpus.txt,
# fetched from PyPI releases with pip): each headless as it is, twice, and with every code
# cell under %%gpu on the process and docker backends; prints the table (bench/differential.py).
.PHONY: differential
differential: install system-deps test-image
	$(PY) bench/differential.py $(DIFF_ARGS)
