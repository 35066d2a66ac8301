#!/usr/bin/env bash
# Artifact throughput of the two storage backends side by side, in one run: the traffic of
# one task from fetch to mux (a streamed put of the input, two whole reads, a put of the
# result, ranged reads of it) on the JetStream object store of a local nats-server and on
# a local S3-compatible server (lipsync-s3-test-server), both on this machine's disk.
# STORAGE_BENCH_MB sets the input size (default 512 MiB).
set -euo pipefail
cd "$(dirname "$0")/.."
. ./.local/env.sh
cargo build -q -p lipsync-tests --bin artifact-bench --bin lipsync-s3-test-server
target/debug/artifact-bench --mb "${STORAGE_BENCH_MB:-512}"
