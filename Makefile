# The two commands of the README: `make run` (set up, then the main job) and
# `make test` (set up, then the test suite). Set-up is idempotent.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.deps-installed

.PHONY: run test setup build bench harness aot traffic gpu-check clean

run: build
	$(PY) -m kdkernels

test: build
	$(PY) -m pytest -q -n 2 --dist loadgroup tests

setup: $(STAMP)

$(STAMP):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0 triton==3.9.0 numpy ninja pybind11 setuptools wheel \
		pytest pytest-xdist pytest-benchmark hypothesis scikit-learn matplotlib tqdm pyyaml
	# torchdistill for the SPKDLoss parity and integration tests (its YAML loader needs pyyaml, above);
	# --no-deps keeps its torchvision (a CUDA torch) out
	$(PY) -m pip install -q --no-deps torchdistill==1.1.5
	# the checkout itself is the package (its extension is built in place below)
	$(PY) -c "import site, os; open(os.path.join(site.getsitepackages()[0], 'kdkernels-checkout.pth'), 'w').write(os.getcwd() + '\\n')"
	touch $(STAMP)

# The extension is compiled in place against the venv's torch (no build
# isolation), again only when a source under csrc/ changed.
EXT_STAMP := build/.ext-built
build: $(EXT_STAMP)

$(EXT_STAMP): $(STAMP) setup.py $(wildcard csrc/*.cpp csrc/*.h csrc/kernels/*.cpp csrc/kernels/*.h)
	$(PY) setup.py -q build_ext --inplace
	mkdir -p build && touch $(EXT_STAMP)

bench: build
	$(PY) -m kdkernels bench --out out/bench

harness: build
	$(PY) examples/distill_digits.py --out out/digits

aot: build
	$(PY) -m kdkernels.triton.aot

traffic: build
	$(PY) -m kdkernels.triton.traffic

# the Triton backend on a CUDA GPU (tests, CUDA graphs, torch.compile, bench JSON); skips without one
gpu-check: build
	PY=$(PY) scripts/gpu_check.sh

clean:
	rm -rf build *.egg-info kdkernels/_C*.so kdkernels/_kernels_*.so
