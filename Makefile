# meshd: `make demo`, `make test`, `make bench`. Each creates .venv when missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test lint unit bench tools clean

PLUGINS := plugins/static plugins/consul plugins/kubernetes plugins/example

$(STAMP): setup.cfg pyproject.toml $(addsuffix /setup.cfg,$(PLUGINS))
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]' $(addprefix -e ,$(PLUGINS))
	touch $@

# System tools the tests and benchmarks drive (real clients, a real nginx to compare with).
tools:
	@sh scripts/ensure-tools.sh $(TOOLS)

demo: $(STAMP)
	$(PY) -m meshd.demo

lint: $(STAMP)
	$(VENV)/bin/ruff check meshd plugins tests scripts
	$(VENV)/bin/mypy

test: $(STAMP)
	@$(MAKE) --no-print-directory tools TOOLS="curl h2load nghttp nginx ip iptables"
	@$(MAKE) --no-print-directory lint
	$(VENV)/bin/pytest -q $(PYTEST_ARGS)

bench: $(STAMP)
	@$(MAKE) --no-print-directory tools TOOLS="curl wrk nginx h2load"
	$(PY) scripts/bench.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info plugins/*/*.egg-info
