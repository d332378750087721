# fastattn: build, deps, test, test-gpu, demo, bench, repl, install, clean (see README.md)
SHELL := /bin/bash
PREFIX ?= /usr/local
CC ?= gcc
NVCC ?= $(shell command -v nvcc 2>/dev/null || ls /usr/local/cuda/bin/nvcc 2>/dev/null)
FA_CUDA ?= $(if $(NVCC),1,0)
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

.PHONY: all deps test test-gpu demo demo-convnet bench bench-cpu repl install clean fixtures
all: $(LIB)

$(LIB): $(C_OBJ) $(CU_OBJ)
	$(CC) -shared -Wl,--no-undefined -o $@ $^ $(LDLIBS)

build/c/%.o: c/%.c c/fastattn.h c/internal.h | build/c
	$(CC) $(CFLAGS) -c $< -o $@

build/cuda/%.o: cuda/%.cu c/fastattn.h c/internal.h $(wildcard cuda/*.cuh) | build/cuda
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

# the default example: a small Deformable-DETR-style model (MSDA encoder) on synthetic blobs
demo: deps
	$(MAKE) -j$(NPROC) all
	bin/fastattn examples/train_msda.lua

demo-convnet: deps
	$(MAKE) -j$(NPROC) all
	bin/fastattn examples/train_convnet.lua

# CPU benchmark against PyTorch on the CPU (same threads)
bench-cpu: $(LIB)
	bin/fastattn bench/cpu.lua

# GPU benchmarks (on the GPU machine): core ops and MSDA, each with its PyTorch peer in the same run
bench: $(LIB)
	bin/fastattn bench/gpu.lua
	bin/fastattn bench/msda.lua

repl: deps $(LIB)
	bin/fastattn

# regenerates the spec fixtures with PyTorch (Debian's python3-torch)
fixtures:
	cd spec/fixtures && for f in gen_*.py; do /usr/bin/python3 $$f || exit 1; done

install: $(LIB)
	install -d $(DESTDIR)$(PREFIX)/lib $(DESTDIR)$(PREFIX)/share/lua/5.1/fastattn/nn $(DESTDIR)$(PREFIX)/bin
	install -m 755 $(LIB) $(DESTDIR)$(PREFIX)/lib/libfastattn.so
	install -m 644 c/fastattn.h $(DESTDIR)$(PREFIX)/share/lua/5.1/fastattn/fastattn.h
	install -m 644 lua/fastattn/*.lua $(DESTDIR)$(PREFIX)/share/lua/5.1/fastattn/
	install -m 644 lua/fastattn/nn/*.lua $(DESTDIR)$(PREFIX)/share/lua/5.1/fastattn/nn/
	sed 's|^ROOT=.*|ROOT=$(PREFIX)/share/lua/5.1; LIBDIR=$(PREFIX)/lib|' bin/fastattn > $(DESTDIR)$(PREFIX)/bin/fastattn
	chmod 755 $(DESTDIR)$(PREFIX)/bin/fastattn
	-ldconfig 2>/dev/null

clean:
	rm -rf build
