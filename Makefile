.PHONY: test bench build wheel info

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
