# The two commands: `make serve` (set up, then serve the default model) and `make test` (set up, then test).
.PHONY: setup serve test lint

setup:
	scripts/setup.sh

serve: setup
	.venv/bin/cumulo serve

test:
	scripts/setup.sh test
	.venv/bin/ruff check cumulo tests bench
	.venv/bin/ruff format --check cumulo tests bench
	.venv/bin/lint-imports --no-cache
	.venv/bin/python -m pytest -q

lint:
	.venv/bin/ruff check cumulo tests bench
	.venv/bin/ruff format --check cumulo tests bench
	.venv/bin/lint-imports --no-cache
