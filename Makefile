# vmbeam-kvm: `make demo` and `make test` install what they need (scripts/setup.sh).
PY := .venv/bin/python
export VMBEAM_ACCEL ?= auto

.PHONY: setup images demo test lint bench soak clean
setup:
	@bash scripts/setup.sh

images: setup

demo: setup
	$(PY) scripts/demo.py

lint: setup
	.venv/bin/ruff check vmbeam_kvm tests scripts native
	.venv/bin/mypy

test: lint
	$(PY) -m pytest -q -ra tests

soak: setup
	$(PY) scripts/soak.py --moves 200

bench: setup
	.venv/bin/vmbeam-kvm --state-dir build/bench-state bench flat --sizes 1G,4G,8G --repeat 3 \
		--plot build/bench-flat.png --json > build/bench-flat.json

clean:
	rm -rf build .venv vmbeam_kvm/_pagemap*.so
