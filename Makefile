# The README's two commands. Both set up first (scripts/setup.sh is idempotent).
.PHONY: setup demo test

setup:
	./scripts/setup.sh

# Main job on the embedded default: real vLLM tiers with tiny models + the router, then a live demo.
demo: setup
	.venv/bin/routenlp up -f examples/local/ --demo

# The whole test suite (unit, manifests, operator integration, e2e with real tiny models).
test: setup
	.venv/bin/python -m pytest -q -p no:cacheprovider tests
