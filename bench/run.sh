#!/usr/bin/env bash
# Benchmarks of slabd, each figure measured in this one run next to its
# reference and printed with the ratio. Usage:
#   bench/run.sh BUILD_DIR MODEL_DIR [TOKENIZER_DIR]
# MODEL_DIR holds stories260K.bin and tok512.bin; TOKENIZER_DIR holds
# tokenizer.bin (the 32000-piece vocabulary) for the synthetic models of the
# stories15M and stories110M shapes, which are written with random weights.
set -euo pipefail

build=$1
models=$2
tokenizers=${3:-$2}
threads=2
# Rounds of each measurement; tables print their medians.
rounds=${BENCH_ROUNDS:-3}
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

# Medians of each column of FILE, whose lines are rounds of one measurement.
medians() {
	awk '{ for (i = 1; i <= NF; i++) v[i, NR] = $i; if (NF > n) n = NF }
	     END {
		for (i = 1; i <= n; i++) {
			m = 0
			for (r = 1; r <= NR; r++) c[++m] = v[i, r]
			for (x = 1; x <= m; x++)
				for (y = x + 1; y <= m; y++)
					if (c[y] < c[x]) { t = c[x]; c[x] = c[y]; c[y] = t }
			printf "%s%s", (m % 2 ? c[(m + 1) / 2] : (c[m / 2] + c[m / 2 + 1]) / 2), (i < n ? " " : "\n")
		}
	     }' "$1"
}

# Rate printed by slab-run for one stage ("prefill" or "decode").
rate() {
	awk -v stage="$1:" '$1 == stage { print $(NF-1) }' "$2"
}

# Bytes of weights one decode step reads: the whole file, less the token
# embedding table when the file has a classifier of its own (quantized
# files always do), since a step reads one row of it per token.
# Arguments: FILE TYPE VOCAB DIM.
bytes_per_token() {
	local size
	size=$(stat -c %s "$1")
	if [ "$2" = f32 ]; then
		echo "$size"
	else
		echo $((size - $3 * $4 * 4))
	fi
}

# Multiply-adds of the weight matrices per token: DIM HIDDEN LAYERS KV_DIM.
matmul_flops() {
	awk -v d="$1" -v h="$2" -v l="$3" -v kv="$4" \
		'BEGIN { printf "%.0f", 2 * l * (2 * d * d + 2 * d * kv + 3 * d * h) }'
}

start_service() { # MODEL TOKENIZER WORKERS THREADS_PER_WORKER [SLABD_OPTION...]
	"$build/slabd" --model "$1" --tokenizer "$2" --socket "$work/s.sock" \
		--instance "$instance" --workers "$3" --threads-per-worker "$4" \
		--log-level "${log_level:-warning}" "${@:5}" 2>"$work/slabd.log" &
	slabd_pid=$!
	for _ in $(seq 400); do
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

service_decode_rate() { # prints the decode tokens/s of one 200-token generation
	"$build/slabctl" --socket "$work/s.sock" generate --verbose --no-echo \
		--max-tokens 200 "Once" 2>"$work/service" >/dev/null
	grep -o 'decode [0-9.]* tokens/s' "$work/service" | awk '{ print $2 }'
}

# Runs slab-probe and sets read_gbps and fma_gflops. The memory bandwidth
# of a shared machine changes from minute to minute, so every row is
# compared with probes run just before and just after it (probe, then
# probe_again), and the higher figure of the two counts.
probe() {
	"$build/slab-probe" > "$work/probe"
	read_gbps=$(awk '$1 == "read_gbps" { print $2 }' "$work/probe")
	fma_gflops=$(awk '$1 == "fma_gflops" { print $2 }' "$work/probe")
}

probe_again() {
	local read=$read_gbps fma=$fma_gflops

	probe
	read_gbps=$(awk -v a="$read" -v b="$read_gbps" 'BEGIN { print (a > b ? a : b) }')
	fma_gflops=$(awk -v a="$fma" -v b="$fma_gflops" 'BEGIN { print (a > b ? a : b) }')
}

echo "machine: $(nproc) CPUs, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), $(date -u +%Y-%m-%d)"
probe
echo "probe: read ${read_gbps} GB/s, float32 FMA ${fma_gflops} GFLOP/s, $(nproc) threads"
echo

"$build/slab-synth" --out "$work/s15.f32" --dim 288 --hidden-dim 768 --layers 6 \
	--heads 6 --vocab 32000 --seq-len 512
"$build/slab-synth" --out "$work/s110.f32" --dim 768 --hidden-dim 2048 --layers 12 \
	--heads 12 --vocab 32000 --seq-len 512
cp "$models/stories260K.bin" "$work/s260.f32"
for m in s260 s15 s110; do
	for type in q8_0 q4_0; do
		"$build/slab-quantize" "$work/$m.f32" "$work/$m.$type" --type "$type" \
			>/dev/null 2>&1
	done
done
# Write the new model files out now: the kernel's write-back of about a
# gigabyte would otherwise compete with the measurements below.
sync
long_prompt=$(printf 'the little dog ran to the park and played %.0s' $(seq 25))

# name file-stem tokenizer dim hidden layers kv_dim vocab
shapes=(
	"stories260K s260 $models/tok512.bin 64 172 5 32 512"
	"stories15M-shape s15 $tokenizers/tokenizer.bin 288 768 6 288 32000"
	"stories110M-shape s110 $tokenizers/tokenizer.bin 768 2048 12 768 32000"
)

echo "1. slab-run, one session, $threads threads (medians of $rounds rounds)"
printf '%-18s %-5s %10s %9s %6s %8s %11s %7s %8s\n' model type "decode/s" "GB/s" probe "of read" "prefill/s" probe "of FMA"
for shape in "${shapes[@]}"; do
	read -r name stem tokenizer dim hidden layers kv vocab <<<"$shape"
	flops=$(matmul_flops "$dim" "$hidden" "$layers" "$kv")
	for type in f32 q8_0 q4_0; do
		model="$work/$stem.$type"
		bytes=$(bytes_per_token "$model" "$type" "$vocab" "$dim")
		: > "$work/rounds"
		for _ in $(seq "$rounds"); do
			probe
			"$build/slab-run" --model "$model" --tokenizer "$tokenizer" --threads $threads \
				--prompt "Once" --max-tokens 200 2>"$work/decode" >/dev/null
			"$build/slab-run" --model "$model" --tokenizer "$tokenizer" --threads $threads \
				--prompt "$long_prompt" --max-tokens 1 2>"$work/prefill" >/dev/null
			probe_again
			awk -v d="$(rate decode "$work/decode")" -v p="$(rate prefill "$work/prefill")" \
				-v b="$bytes" -v f="$flops" -v r="$read_gbps" -v peak="$fma_gflops" \
				'BEGIN { gb = d * b / 1e9;
				         print d, gb, r, gb / r, p, peak, p * f / 1e9 / peak }' >> "$work/rounds"
		done
		medians "$work/rounds" | awk -v n="$name" -v t="$type" \
			'{ printf "%-18s %-5s %10.1f %9.1f %6.1f %8.2f %11.1f %7.0f %8.2f\n",
			          n, t, $1, $2, $3, $4, $5, $6, $7 }'
	done
done
echo "(GB/s: weight bytes read per token times tokens/s, a model that fits in the"
echo " last-level cache can exceed the read probe; FMA: 2 FLOP per matrix weight per token;"
echo " probe: the higher read GB/s and FMA GFLOP/s of slab-probe runs just before"
echo " and just after each round; every column is the median of its rounds)"
echo

echo "2. decode through the service, one session, next to slab-run on the same threads (medians of $rounds rounds)"
printf '%-18s %-5s %8s %14s %14s %7s %6s %8s\n' model type workers "service tok/s" "slab-run tok/s" ratio probe "of read"
for shape in "${shapes[@]}"; do
	read -r name stem tokenizer dim hidden layers kv vocab <<<"$shape"
	runs="f32:$threads f32:1"
	[ "$stem" = s110 ] && runs="f32:$threads q8_0:$threads q4_0:$threads"
	for run in $runs; do
		type=${run%%:*}
		worker_threads=${run##*:}
		model="$work/$stem.$type"
		bytes=$(bytes_per_token "$model" "$type" "$vocab" "$dim")
		start_service "$model" "$tokenizer" 1 "$worker_threads"
		: > "$work/rounds"
		for _ in $(seq "$rounds"); do
			probe
			service=$(service_decode_rate)
			"$build/slab-run" --model "$model" --tokenizer "$tokenizer" --threads "$worker_threads" \
				--prompt "Once" --max-tokens 200 2>"$work/decode" >/dev/null
			probe_again
			awk -v s="$service" -v l="$(rate decode "$work/decode")" -v b="$bytes" -v r="$read_gbps" \
				'BEGIN { print s, l, s / l, r, s * b / 1e9 / r }' >> "$work/rounds"
		done
		stop_service
		medians "$work/rounds" | awk -v n="$name" -v t="$type" -v w="1x$worker_threads" \
			'{ printf "%-18s %-5s %8s %14.1f %14.1f %7.2f %6.1f %8.2f\n",
			          n, t, w, $1, $2, $3, $4, $5 }'
	done
done
echo "(ratio and of read: medians of each round's own figures)"
echo

echo "3. aggregate decode through the service, stories110M shape, q8_0, 1 worker x $threads threads (medians of $rounds rounds)"
printf '%-5s %-10s %14s %8s %16s %8s\n' kv sessions "wall tok/s" "vs one" "decode tok/s" "vs one"
for kv_type in f32 f16; do
	start_service "$work/s110.q8_0" "$tokenizers/tokenizer.bin" 1 $threads --kv-type "$kv_type"
	: > "$work/rounds"
	for _ in $(seq "$rounds"); do
		line=
		for sessions in 1 4 16; do
			pids=()
			started=$(date +%s.%N)
			for i in $(seq "$sessions"); do
				"$build/slabctl" --socket "$work/s.sock" generate --no-echo --verbose \
					--max-tokens 128 "Session $i starts here" >/dev/null 2>"$work/agg.$i" &
				pids+=($!)
			done
			wait "${pids[@]}"
			ended=$(date +%s.%N)
			wall=$(awk -v n="$sessions" -v a="$started" -v b="$ended" 'BEGIN { printf "%.1f", n * 128 / (b - a) }')
			decode=$(cat "$work"/agg.* | grep -o 'decode [0-9.]* tokens/s' | awk '{ sum += $2 } END { printf "%.1f", sum }')
			rm -f "$work"/agg.*
			line="$line $wall $decode"
		done
		# wall and decode for 1, 4 and 16 sessions, then the ratios to one
		echo "$line" | awk '{ print $0, $3 / $1, $4 / $2, $5 / $1, $6 / $2 }' >> "$work/rounds"
	done
	stop_service
	medians "$work/rounds" | awk -v k="$kv_type" \
		'{ printf "%-5s %-10s %14.1f %8.2f %16.1f %8.2f\n", k, 1, $1, 1, $2, 1;
		   printf "%-5s %-10s %14.1f %8.2f %16.1f %8.2f\n", k, 4, $3, $7, $4, $8;
		   printf "%-5s %-10s %14.1f %8.2f %16.1f %8.2f\n", k, 16, $5, $9, $6, $10 }'
done
echo "(wall: 128 tokens per session over the wall time of all slabctl runs, start-up"
echo " and prompt included; decode: the sum of each session's decode rate, which"
echo " counts only the time after its first token; kv: the KV cache element type;"
echo " vs one: the median of each round's ratio to its own one-session figure)"
echo

echo "4. memory, stories110M shape, q8_0, 2 workers"
start_service "$work/s110.q8_0" "$tokenizers/tokenizer.bin" 2 1
"$build/slabctl" --socket "$work/s.sock" generate --no-echo --max-tokens 32 "warm up" >/dev/null
model_bytes=$(stat -c %s "$work/s110.q8_0")
awk 'BEGIN { printf "KV cache: %d bytes per session-token in float32, %d in float16\n", 2 * 12 * 768 * 4, 2 * 12 * 768 * 2 }'
for pid in $(cat "/proc/$slabd_pid/task/$slabd_pid/children"); do
	# Anonymous private memory only: KV pages a worker alone has touched
	# count as Private_* in smaps too, though they live in shared memory.
	anonymous=$(awk '/^Anonymous:/ { kb += $2 } END { print kb * 1024 }' "/proc/$pid/smaps_rollup")
	private=$(awk '/^Private_(Clean|Dirty):/ { kb += $2 } END { print kb * 1024 }' "/proc/$pid/smaps_rollup")
	awk -v p="$pid" -v a="$anonymous" -v pr="$private" -v m="$model_bytes" \
		'BEGIN { printf "worker pid %s: %.1f MB anonymous (%.3f of the model), %.1f MB Private_*\n", p, a / 1e6, a / m, pr / 1e6 }'
done
echo

echo "5. recovery: SIGKILL of the worker serving a session, stories15M shape, 2 workers"
stop_service
log_level=info start_service "$work/s15.f32" "$tokenizers/tokenizer.bin" 2 1
for attempt in 1 2 3; do
	# The scheduler gives a lone session's steps to worker 0 first.
	worker=$(grep -o 'worker 0 (pid [0-9]*) ready' "$work/slabd.log" | tail -1 | grep -o '[0-9]*)' | tr -d ')')
	"$build/slab-recovery" "$work/s.sock" "$worker" 100
	sleep 0.5
done
echo "(longest gap between two tokens after the kill; a replacement worker starts meanwhile)"
stop_service
