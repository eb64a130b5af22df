# Two commands matter: `make demo` and `make test`. Both install what they need first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install demo test test-fast stack stack-down cluster cluster-down bench clean

install: $(STAMP)

$(STAMP): pyproject.toml requirements.lock infra/install-system.sh
	bash infra/install-system.sh
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -U 'pip>=25'
	$(BIN)/python -m pip install -q -c requirements.lock -e '.[dev]'
	touch $(STAMP)

demo: install
	$(BIN)/python -m flows.demo

test: install
	$(BIN)/python -m pytest -q --durations=15

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

stack: install
	bash infra/stack.sh up

stack-down:
	bash infra/stack.sh down

cluster: install
	bash infra/cluster.sh up

cluster-down:
	bash infra/cluster.sh down

bench: install
	for b in benchmarks/*.py; do $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache
