#!/usr/bin/env bash
# Benchmarks of slabd, each figure measured in this one run next to its
# reference. Usage: bench/run.sh BUILD_DIR MODEL_DIR [TOKENIZER_DIR]
# TOKENIZER_DIR holds tokenizer.bin (the 32000-piece vocabulary) for the
# synthetic models of the stories15M and stories110M shapes.
set -euo pipefail

build=$1
models=$2
tokenizers=${3:-$2}
threads=2
work=$(mktemp -d "${TMPDIR:-/tmp}/slabd-bench.XXXXXX")
slabd_pid=
instance=bench-$$

cleanup() {
	if [ -n "$slabd_pid" ] && kill -0 "$slabd_pid" 2>/dev/null; then
		kill -TERM "$slabd_pid"
		wait "$slabd_pid" || true
	fi
	"$build/slabd" --instance "$instance" --remove-segments >/dev/null 2>&1 || true
	rm -rf "$work"
}
trap cleanup EXIT

# Rate printed by slab-run for one stage ("prefill" or "decode").
rate() {
	awk -v stage="$1:" '$1 == stage { print $(NF-1) }' "$2"
}

echo "machine: $(nproc) CPUs, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), $(date -u +%Y-%m-%d)"
"$build/slab-probe" > "$work/probe"
read_gbps=$(awk '$1 == "read_gbps" { print $2 }' "$work/probe")
fma_gflops=$(awk '$1 == "fma_gflops" { print $2 }' "$work/probe")
echo "probe: read ${read_gbps} GB/s, float32 FMA ${fma_gflops} GFLOP/s ($(nproc) threads)"
echo

"$build/slab-synth" --out "$work/s15.bin" --dim 288 --hidden-dim 768 --layers 6 \
	--heads 6 --vocab 32000 --seq-len 512
"$build/slab-synth" --out "$work/s110.bin" --dim 768 --hidden-dim 2048 --layers 12 \
	--heads 12 --vocab 32000 --seq-len 512
long_prompt=$(printf 'the little dog ran to the park and played %.0s' $(seq 25))

printf '%-24s %12s %12s %10s %12s %10s\n' model "decode tok/s" "GB/s read" "of probe" "prefill tok/s" "of FMA"
for entry in "stories260K:$models/stories260K.bin:$models/tok512.bin" \
	"stories15M-shape:$work/s15.bin:$tokenizers/tokenizer.bin" \
	"stories110M-shape:$work/s110.bin:$tokenizers/tokenizer.bin"; do
	IFS=: read -r name model tokenizer <<<"$entry"
	bytes=$(stat -c %s "$model")
	"$build/slab-run" --model "$model" --tokenizer "$tokenizer" --threads $threads \
		--prompt "Once" --max-tokens 200 2>"$work/decode" >/dev/null
	"$build/slab-run" --model "$model" --tokenizer "$tokenizer" --threads $threads \
		--prompt "$long_prompt" --max-tokens 1 2>"$work/prefill" >/dev/null
	decode=$(rate decode "$work/decode")
	prefill=$(rate prefill "$work/prefill")
	awk -v n="$name" -v d="$decode" -v p="$prefill" -v b="$bytes" -v r="$read_gbps" -v f="$fma_gflops" \
		'BEGIN { gb = d * b / 1e9; fl = p * 2 * b / 4 / 1e9;
		         printf "%-24s %12.1f %12.1f %10.2f %12.1f %10.2f\n", n, d, gb, gb / r, p, fl / f }'
done
echo

# The service: one session, then concurrent sessions, on the same models.
start_service() {
	"$build/slabd" --model "$1" --tokenizer "$2" --socket "$work/s.sock" \
		--instance "$instance" --workers 2 --threads-per-worker 1 --log-level warning \
		2>"$work/slabd.log" &
	slabd_pid=$!
	for _ in $(seq 200); do
		"$build/slabctl" --socket "$work/s.sock" health >/dev/null 2>&1 && return 0
		sleep 0.05
	done
	echo "slabd did not start:" >&2
	cat "$work/slabd.log" >&2
	return 1
}

stop_service() {
	kill -TERM "$slabd_pid"
	wait "$slabd_pid" || true
	slabd_pid=
}

printf '%-24s %14s %14s %8s\n' model "service tok/s" "slab-run tok/s" ratio
for entry in "stories260K:$models/stories260K.bin:$models/tok512.bin" \
	"stories15M-shape:$work/s15.bin:$tokenizers/tokenizer.bin"; do
	IFS=: read -r name model tokenizer <<<"$entry"
	start_service "$model" "$tokenizer"
	"$build/slabctl" --socket "$work/s.sock" generate --verbose --no-echo \
		--max-tokens 200 "Once" 2>"$work/service" >/dev/null
	stop_service
	"$build/slab-run" --model "$model" --tokenizer "$tokenizer" --threads 1 \
		--prompt "Once" --max-tokens 200 2>"$work/decode" >/dev/null
	service=$(grep -o 'decode [0-9.]* tokens/s' "$work/service" | awk '{ print $2 }')
	local_rate=$(rate decode "$work/decode")
	awk -v n="$name" -v s="$service" -v l="$local_rate" \
		'BEGIN { printf "%-24s %14.1f %14.1f %8.2f\n", n, s, l, s / l }'
done
echo "(service: one worker step per token, the worker on 1 thread; slab-run on 1 thread)"
echo

start_service "$work/s15.bin" "$tokenizers/tokenizer.bin"
printf '%-10s %16s %8s\n' sessions "aggregate tok/s" "vs one"
one=
for sessions in 1 4 16; do
	started=$(date +%s.%N)
	for i in $(seq "$sessions"); do
		"$build/slabctl" --socket "$work/s.sock" generate --no-echo --max-tokens 100 \
			"Session $i starts here" >/dev/null &
	done
	wait $(jobs -p | grep -v "^$slabd_pid\$") 2>/dev/null || true
	ended=$(date +%s.%N)
	aggregate=$(awk -v n="$sessions" -v a="$started" -v b="$ended" 'BEGIN { printf "%.1f", n * 100 / (b - a) }')
	[ -n "$one" ] || one=$aggregate
	awk -v n="$sessions" -v a="$aggregate" -v o="$one" 'BEGIN { printf "%-10s %16.1f %8.2f\n", n, a, a / o }'
done
echo "(stories15M shape, float32, 2 workers of 1 thread, 100 tokens per session)"
echo

# Memory: KV bytes per position and each worker's private memory.
kv_bytes=$(awk 'BEGIN { print 2 * 6 * 288 * 4 }')
echo "KV cache, stories15M shape, float32: $kv_bytes bytes per session-token"
model_bytes=$(stat -c %s "$work/s15.bin")
for pid in $(cat "/proc/$slabd_pid/task/$slabd_pid/children"); do
	private=$(awk '/^Private_(Clean|Dirty):/ { kb += $2 } END { print kb * 1024 }' "/proc/$pid/smaps_rollup")
	awk -v p="$pid" -v b="$private" -v m="$model_bytes" \
		'BEGIN { printf "worker pid %s: %.1f MB private, %.3f of the model size\n", p, b / 1e6, b / m }'
done
stop_service
