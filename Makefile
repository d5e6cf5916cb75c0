# The two commands a newcomer needs: `make demo` and `make test`. Both set up .venv from nothing first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
FASHION := /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz

.PHONY: setup data demo test test-slow test-all lint bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test,ray,lite,export,openvino,ann]'
	touch $(STAMP)

setup: $(STAMP)

# Fashion-MNIST ships as a Debian package (no download at run time); installed here when root with apt-get can.
# Never fatal: without it the demo uses scikit-learn's digits and the tests that need it are skipped.
FASHION_NOTE := note: Fashion-MNIST not installed (sudo apt-get install dataset-fashion-mnist); the demo uses \
  scikit-learn's digits and the tests that need Fashion-MNIST are skipped
data:
	@if [ -f $(FASHION) ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist; } \
	    || echo "$(FASHION_NOTE)"; \
	else \
	  echo "$(FASHION_NOTE)"; \
	fi

demo: setup data
	$(BIN)/tlfx demo

# Test files are spread over one worker process per core (at most 4; pytest-xdist), a whole file per worker so
# that module fixtures are built once; about half the wall time of one process on 2 cores. TEST_WORKERS=0: serial.
TEST_WORKERS ?= auto
XDIST = $(if $(filter 0,$(TEST_WORKERS)),-p no:xdist,-n $(TEST_WORKERS) --maxprocesses 4 --dist loadfile)

test: setup data
	$(BIN)/python -m pytest -q $(XDIST)

# pytest exits 5 when no test is selected: not a failure for the slow lane
test-slow: setup
	$(BIN)/python -m pytest -q -m slow || [ $$? -eq 5 ]

test-all: test test-slow

lint: setup
	$(BIN)/ruff check .

bench: setup
	$(BIN)/python benchmarks/extract_speed.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info demo-out
