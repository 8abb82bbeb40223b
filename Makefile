# slabd build: every module folder becomes a static library in $(BUILD), the
# programs link against those, and each tests/test_*.c is one Criterion binary.
#
#   make                 build everything into build/
#   make test            build and run every Criterion suite
#   make run             build, fetch the default model, generate through the service
#   make SANITIZE=address,undefined test
#                        the same with sanitizers, built into build/sanitize/
#   make models          copy (or download) the model files and check their sha256

CC ?= gcc
SANITIZE ?=
BUILD ?= build$(if $(SANITIZE),/sanitize$(if $(findstring thread,$(SANITIZE)),-thread))
PREFIX ?= /usr/local

# Directory the model files are copied from before falling back to a download.
MODEL_MIRROR ?= ../shared/models
# Directory `make models` fills and `make run` reads.
MODEL_DIR ?= $(BUILD)/models
MODEL_URL ?= https://huggingface.co/karpathy/tinyllamas/resolve/main/stories260K

DEB_PACKAGES := liburing-dev libprotobuf-c-dev protobuf-c-compiler \
	libcriterion-dev pkg-config libsystemd-dev valgrind

CFLAGS ?= -O2 -g
# -fPIC so that the client objects can also go into libslab.so.
override CFLAGS += -std=c17 -Wall -Wextra -Werror -D_GNU_SOURCE -pthread \
	-fPIC -MMD -MP -I. -I$(BUILD)
LDLIBS := -pthread -lm
ifneq ($(SANITIZE),)
override CFLAGS += -fsanitize=$(SANITIZE) -fno-omit-frame-pointer \
	-fno-sanitize-recover=all
LDFLAGS += -fsanitize=$(SANITIZE)
endif

PKG_LIBS = $(shell pkg-config --libs liburing libprotobuf-c libsystemd 2>/dev/null)
CRITERION_LIBS = $(shell pkg-config --libs criterion 2>/dev/null || echo -lcriterion)

# Module libraries. A program's main() lives in a file named in MAIN_SOURCES
# so the rest of each folder can be linked into any program or test.
MAIN_SOURCES := worker/slab_run.c worker/worker_main.c client/slabctl.c \
	broker/main.c bench/synth_model.c bench/quantize.c bench/probe.c bench/recovery.c
ENGINE_SRC := $(filter-out $(MAIN_SOURCES),$(wildcard worker/*.c))
SHM_SRC := $(filter-out $(MAIN_SOURCES),$(wildcard shm/*.c))
PROTO_DEFS := $(wildcard proto/*.proto)
PROTO_GEN := $(patsubst proto/%.proto,$(BUILD)/proto/%.pb-c.c,$(PROTO_DEFS))
PROTO_HDR := $(PROTO_GEN:.c=.h)
PROTO_SRC := $(filter-out $(MAIN_SOURCES),$(wildcard proto/*.c))
CLIENT_SRC := $(filter-out $(MAIN_SOURCES),$(wildcard client/*.c))
BROKER_SRC := $(filter-out $(MAIN_SOURCES),$(wildcard broker/*.c))
TEST_SRC := $(wildcard tests/test_*.c)
# The allocation-counting test replaces malloc, which sanitizers own.
ifneq ($(SANITIZE),)
TEST_SRC := $(filter-out tests/test_alloc.c,$(TEST_SRC))
endif

objects = $(patsubst %.c,$(BUILD)/obj/%.o,$(1))

LIB_ENGINE := $(BUILD)/libslab_engine.a
LIB_SHM := $(BUILD)/libslab_shm.a
LIB_PROTO := $(BUILD)/libslab_proto.a
LIB_CLIENT := $(BUILD)/libslab.a
LIB_BROKER := $(BUILD)/libslab_broker.a
# Link order: dependents first.
ALL_LIBS := $(LIB_BROKER) $(LIB_CLIENT) $(LIB_PROTO) $(LIB_SHM) $(LIB_ENGINE)

PROGRAMS := $(BUILD)/slab-run $(BUILD)/slab-synth $(BUILD)/slab-probe \
	$(BUILD)/slab-recovery
ifneq ($(wildcard worker/worker_main.c),)
PROGRAMS += $(BUILD)/slabd-worker
endif
ifneq ($(wildcard broker/main.c),)
PROGRAMS += $(BUILD)/slabd
endif
ifneq ($(wildcard client/slabctl.c),)
PROGRAMS += $(BUILD)/slabctl
endif
ifneq ($(wildcard bench/quantize.c),)
PROGRAMS += $(BUILD)/slab-quantize
endif
TESTS := $(patsubst tests/%.c,$(BUILD)/tests/%,$(TEST_SRC))

.PHONY: all deps test run models clean install bench fuzz fuzz-deps check-memory \
	check-golden
# Generated protobuf code is kept between builds.
.SECONDARY:
.DEFAULT_GOAL := all

all: $(PROGRAMS) $(TESTS)

# Installs the Debian packages the build needs when run as root; otherwise
# prints the apt-get line to run and fails.
deps:
	@missing=""; \
	for p in $(DEB_PACKAGES); do \
		dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q 'install ok installed' || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
		if [ "$$(id -u)" = 0 ]; then \
			echo "installing:$$missing"; \
			apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing; \
		else \
			echo "missing Debian packages; run as root:"; \
			echo "  apt-get install -y$$missing"; \
			exit 1; \
		fi; \
	fi

$(PROGRAMS) $(TESTS) $(ALL_LIBS): | deps

$(BUILD)/proto/%.pb-c.c $(BUILD)/proto/%.pb-c.h: proto/%.proto | deps
	@mkdir -p $(BUILD)/proto
	protoc-c --proto_path=proto --c_out=$(BUILD)/proto $<

$(BUILD)/obj/$(BUILD)/proto/%.pb-c.o: $(BUILD)/proto/%.pb-c.c
	@mkdir -p $(@D)
	$(CC) $(CFLAGS) -Wno-unused-parameter -c -o $@ $<

# Every object may include a generated protobuf header.
$(BUILD)/obj/%.o: %.c | $(PROTO_HDR) deps
	@mkdir -p $(@D)
	$(CC) $(CFLAGS) -c -o $@ $<

$(LIB_ENGINE): $(call objects,$(ENGINE_SRC))
$(LIB_SHM): $(call objects,$(SHM_SRC))
$(LIB_PROTO): $(call objects,$(PROTO_SRC) $(PROTO_GEN))
$(LIB_CLIENT): $(call objects,$(CLIENT_SRC))
$(LIB_BROKER): $(call objects,$(BROKER_SRC))
$(ALL_LIBS):
	@mkdir -p $(@D)
	rm -f $@
	$(if $^,ar rcs $@ $^,ar rcs $@)

$(BUILD)/slab-run: $(call objects,worker/slab_run.c) $(ALL_LIBS)
$(BUILD)/slab-synth: $(call objects,bench/synth_model.c) $(ALL_LIBS)
$(BUILD)/slab-probe: $(call objects,bench/probe.c) $(ALL_LIBS)
$(BUILD)/slab-recovery: $(call objects,bench/recovery.c) $(ALL_LIBS)
$(BUILD)/slabd-worker: $(call objects,worker/worker_main.c) $(ALL_LIBS)
$(BUILD)/slabd: $(call objects,broker/main.c) $(ALL_LIBS)
$(BUILD)/slabctl: $(call objects,client/slabctl.c) $(ALL_LIBS)
$(BUILD)/slab-quantize: $(call objects,bench/quantize.c) $(ALL_LIBS)
$(PROGRAMS):
	$(CC) $(LDFLAGS) -o $@ $< $(ALL_LIBS) $(PKG_LIBS) $(LDLIBS)

$(BUILD)/tests/%: $(call objects,tests/%.c) $(ALL_LIBS)
	@mkdir -p $(@D)
	$(CC) $(LDFLAGS) -o $@ $< $(ALL_LIBS) $(PKG_LIBS) $(CRITERION_LIBS) $(LDLIBS)

# Tests find programs and models through these variables.
export SLAB_BUILD_DIR := $(abspath $(BUILD))
export SLAB_MODELS ?= $(abspath $(MODEL_MIRROR))
# The Criterion runner itself leaks a few bytes when it runs tests in
# parallel; the suppression keeps LeakSanitizer to the tested code.
export LSAN_OPTIONS ?= suppressions=$(abspath tests/lsan.supp):print_suppressions=0

# Runs every suite. Test brokers name their instances test-PID-N after the
# test process; a segment of such an instance whose process is gone was
# left behind, which fails the run. Segments of processes still running
# (another test run, say) are not this run's to judge.
test: all
	@failed=0; \
	for t in $(TESTS); do \
		echo "== $$t"; \
		$$t --jobs=2 || failed=1; \
	done; \
	leaked=""; \
	for segment in $$(ls /dev/shm | grep '^slabd-test-[0-9]*-' || true); do \
		pid=$${segment#slabd-test-}; pid=$${pid%%-*}; \
		kill -0 "$$pid" 2>/dev/null || leaked="$$leaked $$segment"; \
	done; \
	if [ -n "$$leaked" ]; then echo "shared memory left behind:$$leaked"; failed=1; fi; \
	exit $$failed

# The golden generation under valgrind memcheck (no errors, no definite
# leaks) and, on two threads, under ThreadSanitizer.
GOLDEN_PROMPT := Once upon a time
GOLDEN_TEXT := $(SLAB_MODELS)/../golden/stories260K-once-upon-a-time.n200.txt
GOLDEN_ARGS = --model $(SLAB_MODELS)/stories260K.bin --tokenizer $(SLAB_MODELS)/tok512.bin \
	--prompt "$(GOLDEN_PROMPT)" --max-tokens 196 --threads 2
# The golden generation, compared byte for byte with llama2.c's output.
check-golden: $(BUILD)/slab-run
	$(BUILD)/slab-run $(GOLDEN_ARGS) 2>/dev/null | cmp - $(GOLDEN_TEXT)
	@echo "check-golden: the text equals the reference"

check-memory: $(BUILD)/slab-run
	@command -v valgrind >/dev/null || { echo "valgrind is not installed; apt-get install valgrind"; exit 1; }
	valgrind -q --error-exitcode=9 --leak-check=full --errors-for-leak-kinds=definite \
		$(BUILD)/slab-run $(GOLDEN_ARGS) > $(BUILD)/golden-valgrind.txt 2>/dev/null
	cmp $(BUILD)/golden-valgrind.txt $(GOLDEN_TEXT)
	$(MAKE) SANITIZE=thread build/sanitize-thread/slab-run
	TSAN_OPTIONS=halt_on_error=1 build/sanitize-thread/slab-run $(GOLDEN_ARGS) \
		> $(BUILD)/golden-tsan.txt
	cmp $(BUILD)/golden-tsan.txt $(GOLDEN_TEXT)
	@echo "check-memory: valgrind and ThreadSanitizer runs are clean"

# Builds, copies the default model, starts slabd on a private socket,
# generates a story through it with slabctl and stops the service.
run: all models
	@scripts/run-demo.sh $(abspath $(BUILD)) $(abspath $(MODEL_DIR)) "$(PROMPT)"

# Measures the machine, slab-run and the service; see bench/README.md.
bench: all models
	bench/run.sh $(abspath $(BUILD)) $(abspath $(MODEL_DIR)) $(abspath $(MODEL_MIRROR))

# libFuzzer harnesses (clang): make fuzz FUZZ_SECONDS=60 runs each for that
# long from the seeds in tests/fuzz/corpus/, plus the real tokenizer as a
# seed when the model directory has it. New inputs go to build/fuzz/corpus/.
FUZZ_SECONDS ?= 30
# clang 15 or later: clang 14 has no _Float16 on x86.
FUZZ_CC ?= clang-16
FUZZ_PACKAGES := clang-16 libclang-rt-16-dev
FUZZ_BUILD := build/fuzz
FUZZ_HARNESSES := frame checkpoint tokenizer handle
FUZZ_FLAGS := -std=c17 -g -O1 -D_GNU_SOURCE -pthread -I. -I$(FUZZ_BUILD) \
	-fsanitize=fuzzer,address,undefined -fno-sanitize-recover=all
FUZZ_SOURCES_frame := proto/frame.c proto/envelope.c \
	$(FUZZ_BUILD)/proto/slabd.pb-c.c $(FUZZ_BUILD)/proto/worker.pb-c.c
FUZZ_SOURCES_checkpoint := worker/model.c worker/quant.c worker/tokenizer.c
FUZZ_SOURCES_tokenizer := worker/model.c worker/quant.c worker/tokenizer.c
FUZZ_SOURCES_handle := $(SHM_SRC)

$(FUZZ_BUILD)/proto/%.pb-c.c: proto/%.proto | deps
	@mkdir -p $(@D)
	protoc-c --proto_path=proto --c_out=$(@D) $<

fuzz-deps:
	@if ! command -v $(FUZZ_CC) >/dev/null; then \
		if [ "$$(id -u)" = 0 ]; then \
			apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $(FUZZ_PACKAGES); \
		else \
			echo "$(FUZZ_CC) is missing; run as root: apt-get install -y $(FUZZ_PACKAGES)"; exit 1; \
		fi; \
	fi

$(FUZZ_BUILD)/fuzz_%: tests/fuzz/fuzz_%.c $(FUZZ_BUILD)/proto/slabd.pb-c.c \
		$(FUZZ_BUILD)/proto/worker.pb-c.c | fuzz-deps
	$(FUZZ_CC) $(FUZZ_FLAGS) -o $@ $< $(FUZZ_SOURCES_$*) \
		$$(pkg-config --libs libprotobuf-c) -lrt -lm

fuzz: $(foreach h,$(FUZZ_HARNESSES),$(FUZZ_BUILD)/fuzz_$(h))
	@for h in $(FUZZ_HARNESSES); do \
		mkdir -p $(FUZZ_BUILD)/corpus/$$h; \
		if [ $$h = tokenizer ] && [ -f "$(SLAB_MODELS)/tok512.bin" ]; then \
			{ printf '\377\001'; cat "$(SLAB_MODELS)/tok512.bin"; printf '\377\377Once upon a time'; } \
				> $(FUZZ_BUILD)/corpus/$$h/seed-tok512; \
		fi; \
		echo "== fuzz_$$h for $(FUZZ_SECONDS) s"; \
		$(FUZZ_BUILD)/fuzz_$$h -max_total_time=$(FUZZ_SECONDS) -print_final_stats=1 \
			-artifact_prefix=$(FUZZ_BUILD)/crash-$$h- \
			$(FUZZ_BUILD)/corpus/$$h tests/fuzz/corpus/$$h 2>&1 | \
			grep -E 'stat::number_of_executed_units|ERROR|SUMMARY|Done' || true; \
		if ls $(FUZZ_BUILD)/crash-$$h-* >/dev/null 2>&1; then \
			echo "fuzz_$$h found a crash: $$(ls $(FUZZ_BUILD)/crash-$$h-*)"; exit 1; \
		fi; \
	done

# The client library for installation: libslab.a and libslab.so hold the
# client and the protocol code.
DIST := $(BUILD)/dist
$(DIST)/libslab.a: $(call objects,$(CLIENT_SRC) $(PROTO_SRC) $(PROTO_GEN))
	@mkdir -p $(@D)
	rm -f $@
	ar rcs $@ $^
$(DIST)/libslab.so: $(call objects,$(CLIENT_SRC) $(PROTO_SRC) $(PROTO_GEN))
	@mkdir -p $(@D)
	$(CC) $(LDFLAGS) -shared -Wl,-soname,libslab.so.0 -o $@ $^ \
		$$(pkg-config --libs libprotobuf-c)

SYSTEMD_UNIT_DIR ?= $(PREFIX)/lib/systemd/system
install: all $(DIST)/libslab.a $(DIST)/libslab.so
	install -d $(DESTDIR)$(PREFIX)/bin $(DESTDIR)$(PREFIX)/lib/pkgconfig \
		$(DESTDIR)$(PREFIX)/include $(DESTDIR)$(SYSTEMD_UNIT_DIR)
	install -m 755 $(BUILD)/slabd $(BUILD)/slabd-worker $(BUILD)/slabctl \
		$(BUILD)/slab-run $(DESTDIR)$(PREFIX)/bin/
	install -m 644 $(DIST)/libslab.a $(DESTDIR)$(PREFIX)/lib/
	install -m 755 $(DIST)/libslab.so $(DESTDIR)$(PREFIX)/lib/libslab.so.0
	ln -sf libslab.so.0 $(DESTDIR)$(PREFIX)/lib/libslab.so
	install -m 644 client/slab.h $(DESTDIR)$(PREFIX)/include/slab.h
	sed 's|@PREFIX@|$(PREFIX)|g' client/slab.pc.in > $(DESTDIR)$(PREFIX)/lib/pkgconfig/slab.pc
	sed 's|@PREFIX@|$(PREFIX)|g' scripts/slabd.service.in > $(DESTDIR)$(SYSTEMD_UNIT_DIR)/slabd.service

# Copies each model file from MODEL_MIRROR, or downloads it, and checks its
# sha256 either way.
MODEL_FILES := \
	stories260K.bin:b0a507e7ad0f626624f17112325e66691f9076d622e1d3274d103d00299f2696 \
	tok512.bin:037cb335abb25d1fa9e8ecae30ed2a3a8ace9302862ebcdc05d51a6bbb10c312
models:
	@mkdir -p $(MODEL_DIR)
	@for entry in $(MODEL_FILES); do \
		name=$${entry%%:*}; sum=$${entry##*:}; dest=$(MODEL_DIR)/$$name; \
		if [ -f "$$dest" ] && echo "$$sum  $$dest" | sha256sum -c --quiet - 2>/dev/null; then continue; fi; \
		if [ -f "$(MODEL_MIRROR)/$$name" ]; then \
			cp "$(MODEL_MIRROR)/$$name" "$$dest.tmp"; \
		else \
			echo "downloading $$name from $(MODEL_URL)"; \
			curl -fsSL -o "$$dest.tmp" "$(MODEL_URL)/$$name" || { rm -f "$$dest.tmp"; echo "failed to download $$name; put it in MODEL_MIRROR=DIR"; exit 1; }; \
		fi; \
		if ! echo "$$sum  $$dest.tmp" | sha256sum -c --quiet -; then \
			rm -f "$$dest.tmp"; echo "$$name: sha256 mismatch, expected $$sum"; exit 1; \
		fi; \
		mv "$$dest.tmp" "$$dest"; echo "$$dest: ok"; \
	done

clean:
	rm -rf build

-include $(shell find $(BUILD)/obj -name '*.d' 2>/dev/null)
