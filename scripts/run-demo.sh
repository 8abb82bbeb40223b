#!/usr/bin/env bash
# Starts slabd on a private socket and instance, asks it for a story with
# slabctl, then stops it with SIGTERM. Usage: run-demo.sh BUILD_DIR MODEL_DIR
# [PROMPT]. Used by `make run`.
set -euo pipefail

build=$1
models=$2
prompt=${3:-Once upon a time}
workdir=$(mktemp -d "${TMPDIR:-/tmp}/slabd-demo.XXXXXX")
socket=$workdir/slabd.sock
instance=demo-$$
slabd_pid=

cleanup() {
	if [ -n "$slabd_pid" ] && kill -0 "$slabd_pid" 2>/dev/null; then
		kill -TERM "$slabd_pid"
		wait "$slabd_pid" || true
	fi
	"$build/slabd" --instance "$instance" --remove-segments >/dev/null 2>&1 || true
	rm -rf "$workdir"
}
trap cleanup EXIT

"$build/slabd" --model "$models/stories260K.bin" --tokenizer "$models/tok512.bin" \
	--socket "$socket" --instance "$instance" --log-level notice \
	2>"$workdir/slabd.log" &
slabd_pid=$!

# The socket appears once every worker has loaded the model.
for _ in $(seq 100); do
	if "$build/slabctl" --socket "$socket" health >/dev/null 2>&1; then
		break
	fi
	if ! kill -0 "$slabd_pid" 2>/dev/null; then
		echo "slabd exited during start-up; its log:" >&2
		cat "$workdir/slabd.log" >&2
		exit 1
	fi
	sleep 0.1
done

"$build/slabctl" --socket "$socket" generate --max-tokens 256 --verbose "$prompt"
