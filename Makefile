# Everything runs from the virtual environment .venv/ at the repo root; each target creates or
# refreshes it first. TORCH_SPEC pins the CPU build that lies on this machine's disk: an open range
# would pull a multi-GB CUDA build (setup.py keeps a range for real users).
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python

.PHONY: venv test demo bench clean

venv: $(VENV)/.installed

$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

# pytest exits 5 when it collected no test: that is a failure here, not a pass.
test: venv
	@$(PY) -m pytest tests; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: no tests were collected" >&2; exit 1; fi; exit $$rc

demo: venv
	$(VENV)/bin/sly-unet demo --out build/demo

bench: venv
	$(PY) -m benchmarks.run

clean:
	rm -rf build $(VENV)
