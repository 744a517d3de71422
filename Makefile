# Two commands do all the set-up on a fresh machine: `make up` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.meg-installed
PYTEST_ARGS ?=

.PHONY: up test test-tools venv proto bench-quick bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	# torch and torchvision must be a matching pair (compressai imports torchvision).
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[dev]'
	# compressai pins numpy<2 in its metadata but runs on numpy 2.x; Sionna 2.x needs numpy>=2.2.6.
	# Install it without its pins; its real runtime needs are in pyproject.toml.
	$(PY) -m pip install -q --no-deps compressai==1.2.8
	touch $(STAMP)

venv: $(STAMP)

up: venv
	$(VENV)/bin/meg up

# The system tools some tests drive (Chromium, promtool, docker-compose): one list, .ci/test-packages.txt,
# installed when missing (as root), so no test skips or fails for a missing tool on a fresh machine.
test-tools:
	.ci/install-test-tools

test: venv test-tools
	$(PY) -m pytest -q $(PYTEST_ARGS)

proto: venv
	$(PY) -m grpc_tools.protoc -I proto --python_out=proto --pyi_out=proto --grpc_python_out=proto proto/meg/v1/meg.proto

bench-quick: venv
	$(VENV)/bin/meg bench snr --quick --out bench/results/_tmp/quick
	$(VENV)/bin/meg bench rate --quick --out bench/results/_tmp/quick

bench: venv
	$(VENV)/bin/meg bench snr
	$(VENV)/bin/meg bench rate
	$(VENV)/bin/meg bench serve

clean:
	rm -rf $(VENV) .pytest_cache
