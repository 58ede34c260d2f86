# The two commands a newcomer needs: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
UV := $(BIN)/uv
PROTOS := $(wildcard protos/wa/v1/*.proto)
STAMP := $(VENV)/.installed

.PHONY: run test lint typecheck proto schema install bench bench-peer clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(UV): | $(BIN)/python
	$(BIN)/python -m pip install --quiet "uv>=0.9,<1"

$(STAMP): pyproject.toml uv.lock | $(UV)
	UV_PROJECT_ENVIRONMENT=$(VENV) $(UV) sync --frozen --quiet --python $(BIN)/python
	touch $(STAMP)

install: $(STAMP) gen/.stamp

gen/.stamp: $(PROTOS) $(STAMP)
	$(BIN)/python -m devtools.codegen
	touch gen/.stamp

proto: gen/.stamp

# db/schema.sql, what db/migrations build (tests/integration/test_schema.py keeps it true).
schema: install
	$(BIN)/python -m devtools.schema

run: install
	$(BIN)/wa run

# buf (npm @bufbuild/buf, pinned by .tools/package-lock.json): the proto linter and the
# breaking-change check of the internal API (README: "Changing the internal API").
BUF := .tools/node_modules/.bin/buf

$(BUF): .tools/package.json .tools/package-lock.json
	npm ci --prefix .tools --no-audit --no-fund --silent
	touch $(BUF)

# pytest-xdist workers: a test spends much of its time waiting (for processes to start, for
# what must not happen not to happen), and the other worker uses that time. Each worker has
# its own embedded PostgreSQL and Valkey; 0 runs the tests in pytest's own process.
PYTEST_WORKERS ?= 2

test: install $(BUF)
	$(BIN)/ruff check .
	$(BUF) lint protos
	@# Uncommitted proto changes are checked against HEAD; otherwise the last commit that
	@# changed protos/ against its parent, unless its message says [breaking-proto].
	@if ! git rev-parse --verify -q HEAD >/dev/null 2>&1; then \
	  echo "buf breaking: not a git checkout, nothing to compare with"; exit 0; fi; \
	if ! git diff --quiet HEAD -- protos; then against=HEAD; \
	else last=$$(git log -1 --format=%H -- protos); \
	  if [ -z "$$last" ] || ! git rev-parse -q --verify "$$last~1" >/dev/null; then \
	    echo "buf breaking: no earlier protos/ to compare with"; exit 0; fi; \
	  if git log -1 --format=%B "$$last" | grep -qF '[breaking-proto]'; then \
	    echo "buf breaking: skipped, $$last is a deliberate breaking change"; exit 0; fi; \
	  against=$$(git rev-parse "$$last~1"); fi; \
	echo "buf breaking protos --against $$against"; \
	$(BUF) breaking protos --against ".git#ref=$$against,subdir=protos"
	$(BIN)/mypy common services cli tests bench devtools fastotel
	@# pytest exits 5 when it collected nothing: that is a failure, not a pass.
	$(BIN)/pytest -p no:cacheprovider -n $(PYTEST_WORKERS) --dist loadgroup $(PYTEST_ARGS); code=$$?; \
	if [ $$code -eq 5 ]; then echo "no tests were collected" >&2; exit 1; fi; exit $$code

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: install
	$(BIN)/mypy common services cli tests bench devtools fastotel

bench: install
	$(BIN)/python -m bench.ack
	$(BIN)/python -m bench.e2e

# The same burst against a minimal pywa bot (README, Benchmarks). pywa is an optional extra
# (`peer`), installed by this target only: `make install` leaves it out again when it syncs.
bench-peer: install
	UV_PROJECT_ENVIRONMENT=$(VENV) $(UV) sync --frozen --quiet --python $(BIN)/python --extra peer
	$(BIN)/python -m bench.peer $(BENCH_PEER_ARGS)

clean:
	rm -rf gen .run .mypy_cache .ruff_cache .pytest_cache
