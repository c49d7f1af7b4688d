# Every target creates and uses its own virtualenv in .venv.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install serve test test-ft fuzz bench soak clean clean-ft

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

# The whole suite on a free-threaded CPython with the GIL off.  The
# interpreter is built once (tools/build-ft-python, a few minutes) into
# $(FT_PREFIX) and kept; `make clean` leaves it, `make clean-ft` removes it.
# No C extension of the stack has free-threaded wheels yet: pip builds
# them from source.  persistent needs cffi, which supports free-threading
# only from 3.14 on (cffi 2 refuses 3.13t): persistent (and BTrees, which
# builds against persistent) is built against cffi 1.x (without build
# isolation, which would fetch cffi 2), and persistent's
# cffi module without the limited API, which 3.13t does not have.
# --prefer-binary: the newest release that has a wheel for the
# interpreter (hypothesis's latest have a Rust part, built offline here
# only from a wheel) rather than the newest sources.
FT_PREFIX := .ft/python
FT_PYTHON := $(FT_PREFIX)/bin/python3
FT_VENV := .venv-ft
FT_PY := $(FT_VENV)/bin/python
FT_STAMP := $(FT_VENV)/.installed

$(FT_PYTHON):
	tools/build-ft-python $(FT_PREFIX)

$(FT_PY): $(FT_PYTHON)
	$(FT_PYTHON) -m venv $(FT_VENV)
	$(FT_PY) -m pip install -q --upgrade pip

$(FT_STAMP): $(FT_PY) setup.py
	$(FT_PY) -m pip install -q setuptools wheel pycparser
	$(FT_PY) -m pip install -q --no-build-isolation 'cffi<2'
	CFLAGS=-D_CFFI_NO_LIMITED_API $(FT_PY) -m pip install -q \
		--no-build-isolation persistent BTrees
	$(FT_PY) -m pip install -q --prefer-binary -e '.[test-ft]'
	touch $(FT_STAMP)

# The TLS tests' certificates are made by .venv's Python: cryptography
# cannot be built for the free-threaded one (tests/tls_certificates.py).
test-ft: $(FT_STAMP) $(STAMP)
	PYTHON_GIL=0 ZEO_CERT_PYTHON=$(abspath $(PY)) $(FT_PY) -m pytest tests

clean-ft:
	rm -rf $(FT_VENV) .ft

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
	rm -rf $(VENV) $(FT_VENV) var *.egg-info
