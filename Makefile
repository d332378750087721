# fastattn: build, deps, test, test-gpu, sanitize, demo, bench, repl, install, clean (see README.md)
SHELL := /bin/bash
PREFIX ?= /usr/local
CC ?= gcc
NVCC ?= $(shell command -v nvcc 2>/dev/null || ls /usr/local/cuda/bin/nvcc 2>/dev/null)
# The CUDA kernels take minutes to compile, so they are built by default only where they can run: nvcc is
# found and an NVIDIA driver is present. FA_CUDA=1 forces them (.ci/run does, to compile-check every
# kernel), FA_CUDA=0 leaves them out. A library built with them still runs on the CPU without a GPU.
ifndef FA_CUDA
FA_GPU_DRIVER := $(shell (nvidia-smi -L >/dev/null 2>&1 || test -e /proc/driver/nvidia/version) && echo 1)
FA_CUDA := $(if $(and $(NVCC),$(FA_GPU_DRIVER)),1,0)
endif
ifeq ($(FA_CUDA),1)
ifeq ($(NVCC),)
$(error FA_CUDA=1 but nvcc was not found: put it on PATH or pass NVCC=/path/to/nvcc)
endif
endif
CUDA_HOME ?= $(patsubst %/bin/nvcc,%,$(NVCC))
LUAJIT ?= luajit

# No -march=native: the library must run on any x86-64 machine, not only the one that built it.
CFLAGS ?= -O3
CFLAGS += -std=gnu11 -fPIC -fopenmp -fno-math-errno -Wall -Wextra -Wno-unused-parameter -Ic -I/usr/include/x86_64-linux-gnu/openblas-pthread
LDLIBS := -lopenblas -lm -fopenmp
NVFLAGS ?= -O3
NVFLAGS += -std=c++17 -Xcompiler -fPIC -Ic --expt-relaxed-constexpr -lineinfo \
	-gencode=arch=compute_80,code=sm_80 -gencode=arch=compute_90a,code=sm_90a

C_SRC := $(wildcard c/*.c)
C_OBJ := $(patsubst c/%.c,build/c/%.o,$(C_SRC))
ifeq ($(FA_CUDA),1)
CU_SRC := $(wildcard cuda/*.cu)
CU_OBJ := $(patsubst cuda/%.cu,build/cuda/%.o,$(CU_SRC))
LDLIBS += -L$(CUDA_HOME)/lib64 -Wl,-rpath,$(CUDA_HOME)/lib64 -lcudart -lcublas -lcublasLt -lcurand -lstdc++
endif
LIB := build/libfastattn.so

BUSTED := busted
DEPS_PKGS := luajit libluajit-5.1-dev lua-busted libopenblas-dev rlwrap

.PHONY: all deps test test-gpu sanitize demo demo-convnet demo-triangle demo-deform2d demo-deform-sdpa bench bench-cpu repl install clean fixtures
all: $(LIB)

# build/fa_cuda.0 or .1 records the last choice, so switching FA_CUDA relinks the library
CONFIG := build/fa_cuda.$(FA_CUDA)
$(LIB): $(C_OBJ) $(CU_OBJ) $(CONFIG)
	$(CC) -shared -Wl,--no-undefined -o $@ $(C_OBJ) $(CU_OBJ) $(LDLIBS)
	@echo "built $@ $(if $(filter 1,$(FA_CUDA)),with the CUDA kernels (FA_CUDA=1),without the CUDA kernels (FA_CUDA=0; FA_CUDA=1 make adds them))"

$(CONFIG): | build/c
	rm -f build/fa_cuda.*
	touch $@

# every object depends on every header: a change to a shared or per-op header (c/*.h, cuda/*.cuh)
# rebuilds all that may include it
C_HDR := $(wildcard c/*.h)
CU_HDR := $(wildcard cuda/*.cuh)

build/c/%.o: c/%.c $(C_HDR) | build/c
	$(CC) $(CFLAGS) -c $< -o $@

build/cuda/%.o: cuda/%.cu $(C_HDR) $(CU_HDR) | build/cuda
	$(NVCC) $(NVFLAGS) -c $< -o $@

build/c build/cuda:
	mkdir -p $@

# Installs, only when missing, what the project needs (Debian/Ubuntu).
deps:
	@missing=""; for p in $(DEPS_PKGS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; SUDO=$$( [ $$(id -u) = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing; \
	fi

NPROC := $(shell nproc 2>/dev/null || echo 2)

test: deps
	$(MAKE) -j$(NPROC) all
	$(BUSTED) --exclude-tags=gpu spec

# every spec; the GPU ones skip with a message where no GPU is found
test-gpu:
	$(MAKE) -j$(NPROC) all
	$(BUSTED) spec

# ---- sanitize: compute-sanitizer (memcheck, racecheck, initcheck, synccheck) over every GPU spec (the
# tests tagged gpu), on the GPU machine; `make -j4 sanitize` runs the four tools at once. Logs in
# build/sanitize-<tool>.log. --show-backtrace device: the tool's host backtraces unwind through LuaJIT's VM
# frames and libgcc's unwinder aborts there (the process died with SIGABRT before any report); device
# backtraces still name the kernel and line. Tests tagged cuda_error provoke a CUDA error on purpose (an
# out-of-memory allocation), which the tool would count as an API error, so they are left out here.
SANITIZE_TOOLS := memcheck racecheck initcheck synccheck
SANITIZER ?= compute-sanitizer
SANITIZE_SPECS ?= spec
sanitize: $(addprefix sanitize-,$(SANITIZE_TOOLS))
sanitize-%: $(LIB)
	@$(SANITIZER) --tool $* --show-backtrace device --error-exitcode 3 \
	  $(LUAJIT) $$(command -v $(BUSTED)) -o TAP --tags=gpu --exclude-tags=cuda_error $(SANITIZE_SPECS) > build/sanitize-$*.log 2>&1; \
	  rc=$$?; echo "$*: $$(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' build/sanitize-$*.log | tail -1); \
	  $$(grep -c '^ok ' build/sanitize-$*.log) tests ok, $$(grep -c '^not ok ' build/sanitize-$*.log) not ok (exit $$rc)"; \
	  [ $$rc -eq 0 ]

# the default example: a small Deformable-DETR-style model (MSDA encoder) on synthetic blobs
demo: deps
	$(MAKE) -j$(NPROC) all
	bin/fastattn examples/train_msda.lua

demo-convnet: deps
	$(MAKE) -j$(NPROC) all
	bin/fastattn examples/train_convnet.lua

demo-triangle: deps
	$(MAKE) -j$(NPROC) all
	bin/fastattn examples/train_triangle.lua

demo-deform2d: deps
	$(MAKE) -j$(NPROC) all
	bin/fastattn examples/train_deform2d.lua

demo-deform-sdpa: deps
	$(MAKE) -j$(NPROC) all
	bin/fastattn examples/train_deform_sdpa.lua

# CPU benchmark against PyTorch on the CPU (same threads)
bench-cpu: $(LIB)
	bin/fastattn bench/cpu.lua

# GPU benchmarks (on the GPU machine): core ops, MSDA, triangle attention, DeformableAttention2D and the fused
# deformable SDPA, each with its peers in the same run
bench: $(LIB)
	bin/fastattn bench/gpu.lua
	bin/fastattn bench/msda.lua
	bin/fastattn bench/triangle_attention.lua
	bin/fastattn bench/deformable_attention2d.lua
	bin/fastattn bench/deform_sdpa.lua

repl: deps $(LIB)
	bin/fastattn

# regenerates the spec fixtures with PyTorch (Debian's python3-torch)
fixtures:
	cd spec/fixtures && for f in gen_*.py; do /usr/bin/python3 $$f || exit 1; done

# Installs the library in $(PREFIX)/lib, the Lua modules (and fastattn.h, which they read) in
# $(PREFIX)/share/lua/5.1/fastattn and the launcher in $(PREFIX)/bin; then prints the LUA_PATH line
# that lets a plain `luajit` find them from any directory (none where luajit already searches there).
LUADIR = $(PREFIX)/share/lua/5.1
install: $(LIB)
	install -d $(DESTDIR)$(PREFIX)/lib $(DESTDIR)$(LUADIR)/fastattn $(DESTDIR)$(PREFIX)/bin
	install -m 755 $(LIB) $(DESTDIR)$(PREFIX)/lib/libfastattn.so
	install -m 644 c/fastattn.h $(DESTDIR)$(LUADIR)/fastattn/fastattn.h
	cd lua && find fastattn -name '*.lua' | while read -r f; do install -D -m 644 "$$f" "$(DESTDIR)$(LUADIR)/$$f" || exit 1; done
	sed 's|^ROOT=.*|ROOT=$(LUADIR); LIBDIR=$(PREFIX)/lib|' bin/fastattn > $(DESTDIR)$(PREFIX)/bin/fastattn
	chmod 755 $(DESTDIR)$(PREFIX)/bin/fastattn
	-ldconfig 2>/dev/null
	@echo
	@if env -u LUA_PATH $(LUAJIT) -e "os.exit(package.path:find('$(LUADIR)/?.lua', 1, true) and 0 or 1)" 2>/dev/null; then \
	  echo "Installed in $(PREFIX). luajit already searches $(LUADIR): require 'fastattn' works from any directory."; \
	else \
	  echo "Installed in $(PREFIX). Add this line to your shell profile (~/.bashrc), then require 'fastattn' works"; \
	  echo "from any directory:"; \
	  echo; \
	  echo '  export LUA_PATH="$(LUADIR)/?.lua;$(LUADIR)/?/init.lua;;"'; \
	  echo; \
	fi

clean:
	rm -rf build
