# Every target creates and uses its own virtualenv in .venv.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install serve test fuzz bench soak clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(STAMP): $(PY) setup.py
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

serve: $(STAMP)
	mkdir -p var
	$(VENV)/bin/zeo-runzeo -C conf/zeo.conf

test: $(STAMP)
	$(PY) -m pytest tests

# The fuzzers of `make test`, with ZEO_FUZZ_FACTOR (default 50) times as
# many examples, randomized: tests/fuzzing.py.
fuzz: $(STAMP)
	ZEO_FUZZ=long $(PY) -m pytest tests/test_fuzz_wire.py \
		tests/test_fuzz_server.py --hypothesis-show-statistics

# Extra bench flags, e.g. make bench BENCH_ARGS=--reconnect-only
BENCH_ARGS ?=

bench: $(STAMP)
	$(PY) bench/run.py $(BENCH_ARGS)

# The soak runs for MINUTES (default 30); SOAK_ARGS adds bench/soak.py
# options.  matplotlib (the soak extra) draws its plot; without it the
# soak still runs and writes the samples as CSV.
MINUTES ?= 30
soak: $(STAMP)
	$(PY) -c 'import matplotlib' 2>/dev/null \
	    || $(PY) -m pip install -q -e '.[soak]' \
	    || echo "soak: matplotlib could not be installed; the samples go to a CSV file only"
	$(PY) bench/soak.py --minutes $(MINUTES) $(SOAK_ARGS)

clean:
	rm -rf $(VENV) var *.egg-info
