# Everything runs from the virtual environment .venv/ at the repo root; each target creates or
# refreshes it first. TORCH_SPEC pins the CPU build that lies on this machine's disk: an open range
# would pull a multi-GB CUDA build (setup.py keeps a range for real users).
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python

.PHONY: venv sdk-venv test test-sdk demo docs bench bench-masks bench-quality clean train-image inference-image serve-image images image-test

venv: $(VENV)/.installed

$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

# pytest exits 5 when it collected no test: that is a failure here, not a pass.
test: venv
	@$(PY) -m pytest tests -m "not sdk"; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: no tests were collected" >&2; exit 1; fi; exit $$rc

# The Supervisely SDK (its serving clients, the masks benchmark's reference) in a venv of its own:
# never a dependency of ours. Built once; a warm run reuses it.
SDK_VENV ?= build/sdk-venv
SDK_SPEC ?= supervisely==6.74.51

sdk-venv: $(SDK_VENV)/.installed

$(SDK_VENV)/.installed:
	$(PYTHON) -m venv $(SDK_VENV)
	$(SDK_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(SDK_VENV)/bin/python -m pip install --quiet "$(SDK_SPEC)"
	touch $@

# The SDK's Session and ModelAPI clients against `sly-unet serve` (tests marked sdk).
test-sdk: venv sdk-venv
	@$(PY) -m pytest tests -m sdk; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test-sdk: no tests were collected" >&2; exit 1; fi; exit $$rc

demo: venv
	$(VENV)/bin/sly-unet demo --out build/demo

bench: venv
	$(PY) -m benchmarks.run
	$(PY) -m benchmarks.networks
	$(PY) -m benchmarks.networks --amp off
	$(PY) -m benchmarks.masks
	$(PY) -m benchmarks.onnx
	$(PY) -m benchmarks.serve --size 256 --input-size 64

# The masks command against the Supervisely SDK (its venv: see benchmarks/masks.py) and the training
# mask cache on 10,000 generated annotations.
bench-masks: venv sdk-venv
	$(PY) -m benchmarks.masks --sdk-python $(SDK_VENV)/bin/python

# Model quality on ../shared/data/isbi2012-membranes: default vs legacy recipe (about 30 minutes of
# training each on 2 cores).
bench-quality: venv
	$(PY) -m benchmarks.quality

# docs/config.md from the train config's schema (tests/test_config.py checks that they agree).
docs: venv
	$(PY) -c "from plugin.config.schema import config_reference; open('docs/config.md', 'w').write(config_reference())"

clean:
	rm -rf build $(VENV)

# Container images (docker/Dockerfile, one target each), tagged with the package version. Build
# options come from the environment: on these machines `eval "$$(../shared/tools/docker-engine.sh env)"`
# sets DOCKER_BUILD_ARGS to point pip at the local CPU torch wheel.
DOCKER ?= docker
DOCKER_BUILD_ARGS ?=
VERSION := $(shell sed -n 's/^__version__ = "\(.*\)"/\1/p' plugin/__init__.py)
IMAGE_TAG ?= $(VERSION)
TRAIN_IMAGE ?= sly-unet-train
INFERENCE_IMAGE ?= sly-unet-inference
SERVE_IMAGE ?= sly-unet-serve

train-image:
	$(DOCKER) build $(DOCKER_BUILD_ARGS) -f docker/Dockerfile --target train -t $(TRAIN_IMAGE):$(IMAGE_TAG) .

inference-image:
	$(DOCKER) build $(DOCKER_BUILD_ARGS) -f docker/Dockerfile --target inference -t $(INFERENCE_IMAGE):$(IMAGE_TAG) .

# The model server (entrypoints/serve.py): the inference image plus the serve extra.
serve-image:
	$(DOCKER) build $(DOCKER_BUILD_ARGS) -f docker/Dockerfile --target serve -t $(SERVE_IMAGE):$(IMAGE_TAG) .

images: train-image inference-image serve-image

# Builds the three images, then trains, infers and serves with them on small task dirs under build/image-test/.
image-test: images venv
	$(PY) -m tests.image.run --docker "$(DOCKER)" --train-image $(TRAIN_IMAGE):$(IMAGE_TAG) \
		--inference-image $(INFERENCE_IMAGE):$(IMAGE_TAG) --serve-image $(SERVE_IMAGE):$(IMAGE_TAG) --work build/image-test
