.PHONY: test bench build wheel info gpu-check

test:  ## the test command: installs what it needs, builds, runs tests/
	bash scripts/test.sh

bench:  ## kernel benchmarks; JSON with device and versions under bench/results/
	bash scripts/bench.sh

build:
	python -m pip install --no-build-isolation --no-deps -e .

wheel:
	python -m pip wheel --no-build-isolation --no-deps -w dist .

info:
	python -m weightkit info

gpu-check:  ## on a machine with a GPU: build for its arch, whole suite on CUDA, GPU report + benches -> $(OUT)
	bash scripts/gpu_check.sh $(or $(OUT),gpu-check-out)
