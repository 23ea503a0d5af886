# Two commands do everything on a fresh Debian 12 machine with Python 3.11:
#   make demo   run the daemon on the example video and print its events
#   make test   lint, type-check and run the whole test suite (capture's tests in both capture modes)
# Each installs what is missing first (Debian packages through apt-get, Python packages into .venv).

SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
SHARED ?= ../shared
APT_PACKAGES := python3-venv libgl1 libglib2.0-0 \
	gcc pkg-config libgirepository1.0-dev libcairo2-dev \
	gir1.2-gstreamer-1.0 gir1.2-gst-plugins-base-1.0 gir1.2-gst-rtsp-server-1.0 \
	gstreamer1.0-plugins-base gstreamer1.0-plugins-good gstreamer1.0-plugins-bad gstreamer1.0-plugins-ugly \
	gstreamer1.0-libav gstreamer1.0-tools \
	systemd mosquitto chromium nats-server iproute2
TORCH := torch==2.14.1 torchvision==0.29.1

export VIGILD_MEDIA ?= $(abspath $(SHARED)/media)
export VIGILD_MODELS ?= $(abspath $(SHARED)/models)
# never let ultralytics try to download or pip-install anything in the demo and tests
export YOLO_OFFLINE ?= 1

.PHONY: setup system-deps demo test lint unit e2e e2e-workers soak bench install clean

setup: $(VENV)/.installed

system-deps:
	@missing=$$(for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		sudo=$$([ "$$(id -u)" = 0 ] || echo sudo); \
		echo "installing Debian packages: $$missing"; \
		$$sudo apt-get update -q && DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -q --no-install-recommends $$missing; \
	fi

$(VENV)/.installed: pyproject.toml | system-deps
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q $(TORCH)
	$(VENV)/bin/pip install -q -e ".[dev]"
	touch $@

demo: setup
	@echo "vigild on $(VIGILD_MEDIA)/vtest.avi at its own 10 fps; events follow (Ctrl-C to stop)"
	@trap 'kill $$sub $$daemon 2>/dev/null' EXIT; \
	$(VENV)/bin/vigild sub --topics --timeout 30 & sub=$$!; \
	$(VENV)/bin/vigild run --config configs/vtest.yaml --log-level WARNING & daemon=$$!; \
	wait $$daemon; sleep 1

lint: setup
	$(VENV)/bin/ruff check daemon plugins tests bench
	@# mypy and lint-imports see the packages under their installed names (vigild -> daemon/, vigild.plugins ->
	@# plugins/) through a tree of links: on the plain directories mypy would treat every vigild import as unknown
	@# (Any), and lint-imports would not see the plugins as part of vigild
	rm -rf .mypy-tree && mkdir -p .mypy-tree/vigild
	for entry in daemon/*; do ln -s ../../$$entry .mypy-tree/vigild/; done; ln -sfn ../../plugins .mypy-tree/vigild/plugins
	cd .mypy-tree && $(abspath $(VENV))/bin/mypy --config-file ../pyproject.toml -p vigild
	@# the layers as an import contract ([tool.importlinter] in pyproject.toml, docs/design.md#layers)
	cd .mypy-tree && $(abspath $(VENV))/bin/lint-imports --no-cache --no-logo ../pyproject.toml

unit: setup
	$(VENV)/bin/python -m pytest -m "not e2e"

e2e: setup
	$(VENV)/bin/python -m pytest -m e2e

# `make test` runs the whole suite once, in one session. The tests marked `capture_modes` (their behaviour goes through
# capture: frames, reconnects, reloads, stops) run twice in it, [threads] and [workers] (capture in worker processes),
# so that every end-to-end behaviour of capture holds in both modes; the tests that run a daemon only to check its
# config, control socket or CURVE keys run once. `make e2e-workers` runs the [workers] variants alone. pytest's exit 5
# (nothing collected) fails both.
NO_TESTS_FAIL = rc=$$?; if [ $$rc = 5 ]; then echo "pytest collected no tests: failing"; exit 1; fi; exit $$rc

test: lint
	@$(VENV)/bin/python -m pytest; $(NO_TESTS_FAIL)

e2e-workers: setup
	@$(VENV)/bin/python -m pytest -m "capture_workers and not slow"; $(NO_TESTS_FAIL)

soak: setup
	VIGILD_SOAK_S=$${VIGILD_SOAK_S:-600} $(VENV)/bin/python -m pytest -m slow -s

# as root: a venv in /opt/vigild, the unit, the vigild user (scripts/install-service.sh --help)
install:
	scripts/install-service.sh

bench: setup
	$(VENV)/bin/python bench/throughput.py --cameras 1 4 16 --precisions full half --ceilings
	$(VENV)/bin/python bench/python_budget.py
	$(VENV)/bin/python bench/trackers.py
	$(VENV)/bin/python bench/actions.py
	$(VENV)/bin/python bench/decode.py
	$(VENV)/bin/python bench/stuck_subscriber.py
	$(VENV)/bin/python bench/journal.py
	$(VENV)/bin/python bench/mqtt.py
	$(VENV)/bin/python bench/quantize.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .mypy-tree *.egg-info
