# The README's two commands. Both set up first (scripts/setup.sh: idempotent, seconds when nothing changed).
#   make demo DEMO_ARGS=--cold    a cold start: retrain the classifier stand-in and redo the demo's calibration
#   make demo VENV=/path/venv     use an environment outside this checkout as it is (set-up checks it, never changes it)
.PHONY: setup demo test

VENV ?= .venv
export VENV
DEMO_ARGS ?=

setup:
	./scripts/setup.sh

# Main job on the embedded default: real vLLM tiers with tiny models + the router, then a live demo.
demo: setup
	$(VENV)/bin/routenlp up -f examples/local/ --demo $(DEMO_ARGS)

# The whole test suite (unit, manifests, operator integration, e2e with real tiny models).
test: setup
	$(VENV)/bin/python -m pytest -q -p no:cacheprovider tests
