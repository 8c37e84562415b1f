.PHONY: test bench docs build wheel wheel-cuda check-portable check-triton check-cudasim info gpu-check gpu-prebuild gpu-minilm

test:  ## the test command: installs what it needs, builds, runs tests/
	bash scripts/test.sh

bench:  ## kernel benchmarks; JSON with device and versions under bench/results/
	bash scripts/bench.sh

docs:  ## docs/benchmarks.md and docs/targets.md from the result files in bench/results/
	python -m weightkit.benchreport --docs docs/benchmarks.md
	python -m bench.targets --docs docs/targets.md

build:  ## editable install, built in place with ninja (incremental; build/compile_commands.json for editors)
	python -m pip install --no-build-isolation --no-deps -e .

wheel:  ## cp3xx-linux wheel: weightkit._C with the CPU kernels (and the CUDA library if setup.py finds nvcc + a CUDA torch)
	python -m pip wheel --no-build-isolation --no-deps -w dist .

wheel-cuda:  ## cp3xx manylinux wheel: weightkit._C and the CUDA kernel library (sm_80, sm_90, sm_100 + PTX), built with nvcc
	bash scripts/build_wheel.sh

check-portable:  ## the built kernels, unchanged, under a second torch release (.venv-portable, torch 2.14.1; PORTABLE_VENV=...)
	bash scripts/check_portable.sh

check-triton:  ## Triton kernels under another Triton (TRITON_VERSION, default 3.6.0 as on the GPU image; downloads it): sm_90 compile of every launch + interpreter tests/ops
	TRITON_VERSION=$(or $(TRITON_VERSION),3.6.0) bash scripts/check_triton.sh

check-cudasim:  ## csrc/cuda's kernels on the CPU (cudasim, ASan + UBSan) under the cuda backend's tests; no GPU needed, ~2.5 min
	python -m pytest -q -p no:cacheprovider tests/test_cudasim.py

info:
	python -m weightkit info

gpu-prebuild:  ## the kernel libraries of the GPU machine built here (.gpu-prebuilt: carry it; gpu-check skips its build)
	bash scripts/prebuild_gpu.sh

gpu-minilm:  ## a float16 copy of all-MiniLM-L6-v2's folder (.gpu-minilm, 45 MB) for the compress section on a GPU machine
	python -c "from weightkit.models.minilm import pack_minilm; print(pack_minilm('.gpu-minilm'))"

gpu-check:  ## on a machine with a GPU, <= 7 min: build, info, CUDA tests, GPU report, short train -> $(OUT) (scripts/gpu_check.sh)
	bash scripts/gpu_check.sh $(or $(OUT),gpu-check-out)
