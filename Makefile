# meshd: `make demo`, `make test`, `make bench`, `make fuzz`. Each creates .venv when missing.
# `make install [PREFIX=/opt/meshd] [DESTDIR=]`: a venv at PREFIX, /usr/local/bin/meshd,
# the systemd units, /etc/meshd/meshd.toml when absent (scripts/install.sh says more).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test lint unit bench fuzz tools clean install

PLUGINS := plugins/static plugins/consul plugins/kubernetes plugins/example

$(STAMP): setup.cfg pyproject.toml $(addsuffix /setup.cfg,$(PLUGINS))
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@# The distribution was named meshd before it became meshd-proxy (meshd on the
	@# package index is another project): drop the old editable install of this tree.
	$(PY) -m pip uninstall -q -y meshd 2>/dev/null || true
	$(PY) -m pip install -q -e '.[test]' $(addprefix -e ,$(PLUGINS))
	touch $@

# System tools the tests and benchmarks drive (real clients, a real nginx to compare with).
tools:
	@sh scripts/ensure-tools.sh $(TOOLS)

demo: $(STAMP)
	$(PY) -m meshd.demo

lint: $(STAMP)
	$(VENV)/bin/ruff check meshd plugins tests scripts fuzz bench
	$(VENV)/bin/mypy

# Test files run in TEST_JOBS processes (pytest-xdist; a file stays in one process, so its
# module-scoped meshds and fixed namespace names are never shared); most tests wait on
# real processes and sockets, not on the CPU. TEST_JOBS=0 runs them in this process.
TEST_JOBS ?= 2

test: $(STAMP)
	@$(MAKE) --no-print-directory tools TOOLS="curl h2load nghttp nginx ip iptables systemd-analyze vagrant strace sslscan tmux"
	@$(MAKE) --no-print-directory tools TOOLS="chromium chromedriver"  # the dashboard's browser test
	@$(MAKE) --no-print-directory lint
	$(VENV)/bin/pytest -q -n $(TEST_JOBS) --dist loadfile --durations=30 $(PYTEST_ARGS)

bench: $(STAMP)
	@$(MAKE) --no-print-directory tools TOOLS="curl wrk nginx h2load"
	$(PY) -m bench $(BENCH_ARGS)

PREFIX ?= /opt/meshd
DESTDIR ?=
BINDIR ?= /usr/local/bin
UNITDIR ?= /etc/systemd/system
SYSCONFDIR ?= /etc
INSTALL_PLUGINS := plugins/static plugins/consul plugins/kubernetes

install:
	PREFIX="$(PREFIX)" DESTDIR="$(DESTDIR)" BINDIR="$(BINDIR)" UNITDIR="$(UNITDIR)" \
	SYSCONFDIR="$(SYSCONFDIR)" PYTHON="$(PYTHON)" PLUGINS="$(INSTALL_PLUGINS)" \
	sh scripts/install.sh

# Coverage-guided fuzzing of the protocol cores (fuzz/): each target for FUZZ_SECONDS,
# one after another. atheris ships libFuzzer in its manylinux wheel: no clang needed.
FUZZ_SECONDS ?= 60
FUZZ_TARGETS ?=
$(VENV)/.fuzz-stamp: $(STAMP)
	$(PY) -m pip install -q 'atheris>=2.3,<4'
	touch $@

fuzz: $(VENV)/.fuzz-stamp
	nice $(PY) -m fuzz.run --seconds $(FUZZ_SECONDS) $(FUZZ_TARGETS)

clean:
	rm -rf $(VENV) build *.egg-info plugins/*/*.egg-info .fuzz
