.PHONY: test bench docs build wheel wheel-cuda check-portable info gpu-check

test:  ## the test command: installs what it needs, builds, runs tests/
	bash scripts/test.sh

bench:  ## kernel benchmarks; JSON with device and versions under bench/results/
	bash scripts/bench.sh

docs:  ## docs/benchmarks.md from the result files in bench/results/
	python -m weightkit.benchreport --docs docs/benchmarks.md

build:
	python -m pip install --no-build-isolation --no-deps -e .

wheel:  ## py3-none-linux wheel with the CPU kernel library (and the CUDA one if setup.py finds nvcc + a CUDA torch)
	python -m pip wheel --no-build-isolation --no-deps -w dist .

wheel-cuda:  ## manylinux wheel with the CPU and CUDA kernel libraries (sm_80, sm_90, sm_100 + PTX), built with nvcc
	bash scripts/build_wheel.sh

check-portable:  ## the built kernels, unchanged, under a second torch release (default: /work/venvs/portable-ext-214)
	bash scripts/check_portable.sh

info:
	python -m weightkit info

gpu-check:  ## on a machine with a GPU, <= 7 min: build, info, CUDA tests, GPU report, short train -> $(OUT) (scripts/gpu_check.sh)
	bash scripts/gpu_check.sh $(or $(OUT),gpu-check-out)
