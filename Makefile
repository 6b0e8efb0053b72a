# vmbeam-kvm: `make demo` and `make test` install what they need (scripts/setup.sh).
PY := .venv/bin/python
export VMBEAM_ACCEL ?= auto

.PHONY: setup images demo test test-stock lint bench soak clean qemu
setup:
	@bash scripts/setup.sh

images: setup

# The patched QEMU (qemu-patches/), built into a cache outside the checkout and linked as
# build/qemu/qemu-system-x86_64 (config.PATCHED_QEMU); prints the binary's path.
qemu:
	@out=$$(bash scripts/build-qemu.sh) || exit 1; path=$$(printf '%s\n' "$$out" | tail -n 1); \
		mkdir -p build/qemu && ln -sfn "$$path" build/qemu/qemu-system-x86_64 && echo "$$path"

demo: setup
	$(PY) scripts/demo.py

lint: setup
	.venv/bin/ruff check vmbeam_kvm tests scripts native
	.venv/bin/mypy

test: lint
	$(PY) -m pytest -q -ra tests

# The same guarantees asked of the distribution's QEMU: each shows as "guarantee missing".
test-stock: setup
	VMBEAM_QEMU=/usr/bin/qemu-system-x86_64 $(PY) -m pytest -q -ra tests/test_qemu_patches.py \
		tests/test_zero_copy.py

soak: setup
	$(PY) scripts/soak.py --moves 200

bench: setup
	.venv/bin/vmbeam-kvm --state-dir build/bench-state bench flat --sizes 1G,4G,8G --repeat 3 \
		--plot build/bench-flat.png --json > build/bench-flat.json

clean:
	rm -rf build .venv vmbeam_kvm/_pagemap*.so
