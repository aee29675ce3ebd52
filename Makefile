# The two commands of the README: `make demo` and `make test`. Both set everything up first.
.PHONY: demo test test-quick lint lint-only bench setup lock

setup:
	@bash scripts/bootstrap.sh

demo: setup
	@.venv/bin/backup-tasks demo

test: setup
	@bash scripts/services.sh
	@$(MAKE) --no-print-directory lint-only
	@.venv/bin/python -m pytest -p no:cacheprovider -ra $(PYTEST_ARGS)

test-quick: setup
	@.venv/bin/python -m pytest -p no:cacheprovider -m "not slow" -x -q $(PYTEST_ARGS)

lint: setup
	@$(MAKE) --no-print-directory lint-only

# ruff, then the import contracts of pyproject.toml (layers, the WAL fast path, no cycles).
lint-only:
	@.venv/bin/ruff check backup_tasks tests bench celeryconfig.py
	@.venv/bin/lint-imports --no-cache

bench: setup
	@.venv/bin/python bench/run.py $(BENCH_ARGS)

# Refresh requirements.lock to the newest releases pyproject.toml's ranges allow (then `make test`).
lock: setup
	@.venv/bin/uv pip compile pyproject.toml --extra test --extra dev --python-version 3.11 \
		--python-platform x86_64-unknown-linux-gnu --generate-hashes --custom-compile-command "make lock" --quiet -o requirements.lock
	@bash scripts/bootstrap.sh
