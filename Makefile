# The two commands: `make run` (set up, then serve the demo model) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
LLAMA_CPP_PYTHON_VERSION := 0.3.36
DATA_DIR ?= ./var
DEMO_MODEL := $(DATA_DIR)/models/demo.gguf

.PHONY: setup run test bench clean image

## setup: .venv with llamad and the openai client installed, llama-server built (cached under ~/.cache/llamad), and
## Debian's prometheus for the real-Prometheus test, chromium and chromium-driver for the status page's browser test
## and podman and debootstrap for the container image test, when apt is there and we are root
## (pip runs only when llamad's sources or pinned versions changed since the last install: scripts/install-llamad.sh)
setup:
	@test -x $(BIN)/python || { rm -f $(VENV)/.llamad-install; $(PYTHON) -m venv $(VENV); }
	@bash scripts/install-llamad.sh $(VENV) '.[client]'
	bash scripts/build-llama-server.sh $(LLAMA_CPP_PYTHON_VERSION) $(VENV)
	@if ! command -v prometheus >/dev/null && command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends prometheus >/dev/null \
		|| echo "llamad: could not install prometheus; its test will be skipped"; fi
	@if ! { command -v chromium && command -v chromedriver; } >/dev/null && command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium chromium-driver >/dev/null \
		|| echo "llamad: could not install chromium; the status page's browser test will be skipped"; fi
	@if ! { command -v podman && command -v runc && command -v debootstrap; } >/dev/null && command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends podman buildah crun runc \
			fuse-overlayfs slirp4netns uidmap debootstrap >/dev/null \
		|| echo "llamad: could not install podman; the container image test will be skipped"; fi

## run: serve the configured model, or the demo model when none is configured
## (EMBEDDINGS=1 make run also serves /v1/embeddings). On Ctrl-C twistd drains and exits 0, and
## make, which got the SIGINT too, then ends by it (status 130) without an error line.
run: setup
	@set -e; \
	if [ -z "$$MODEL_PATH$$MODEL_NAME" ]; then \
		$(BIN)/llamad demo-model --force $(DEMO_MODEL) >/dev/null 2>&1; \
		export MODEL_PATH="$(abspath $(DEMO_MODEL))"; \
	fi; \
	export PATH="$(abspath $(BIN)):$$PATH" DATA_DIR="$(DATA_DIR)"; \
	exec $(BIN)/twistd -n --pidfile= llamad $(ARGS)

## test: the same set-up, the test extras and the llama-cpp-python server, then the whole suite.
## pip compiles llama-cpp-python once (about 8 min on 2 cores; then its wheel is cached): that compile
## shows its progress, nothing shows when there is nothing to build; pip's whole output: .venv/pip-test.log
test: setup
	@CMAKE_BUILD_PARALLEL_LEVEL=$${CMAKE_BUILD_PARALLEL_LEVEL:-2} bash scripts/progress.sh $(VENV)/pip-test.log \
		"llamad: compiling llama-cpp-python" $(BIN)/pip --disable-pip-version-check -v install '.[test,llama-cpp-python]'
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/pytest $(PYTEST_ARGS) tests

## image: the CPU image, llamad:cpu, with podman, on a base made locally from the llama-server built above
## (cached; BASE=ghcr.io/ggml-org/llama.cpp:server uses llama.cpp's image instead): scripts/image.sh
image: setup
	bash scripts/image.sh build Dockerfile.cpu $${IMAGE:-llamad:cpu}

clean:
	rm -rf $(VENV) build *.egg-info

## bench: llamad against direct llama-server and nginx, in interleaved rounds of one run (not part of `make test`)
bench: setup
	@command -v wrk >/dev/null && command -v nginx >/dev/null || \
		{ command -v apt-get >/dev/null && apt-get install -y -q wrk nginx-light >/dev/null; } || \
		{ echo "make bench needs wrk and nginx (Debian: apt-get install wrk nginx-light)"; exit 1; }
	PATH="$(abspath $(BIN)):$$PATH:/usr/sbin" $(BIN)/python bench/run.py --rounds $${ROUNDS:-8}
	PATH="$(abspath $(BIN)):$$PATH:/usr/sbin" $(BIN)/python bench/run.py --rounds $${ROUNDS:-8} --no-real-sse --policy
	$(BIN)/python bench/inprocess.py
	$(BIN)/python bench/inprocess.py --policy --requests 10000
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python bench/ttfb.py
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python bench/coldstart.py --runs 10
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python bench/swap.py --rounds 5
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python bench/mixed.py --rounds 3
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python bench/kv.py --rounds 3
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python bench/scale_from_zero.py --seconds 60
