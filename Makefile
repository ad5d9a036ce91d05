# containerd-daxfs: build, test and demo targets. Run as root on Debian with Go.
GO        ?= go
FUZZTIME  ?= 10s
BIN       := bin/containerd-daxfs-grpc
# Build tags: "isal" links ISA-L (libisal-dev, installed by deps) for the
# gzip inflater; `make TAGS=` builds pure Go. Exported through GOFLAGS, so
# the binaries the end-to-end tests build carry them too.
TAGS      ?= isal
export GOFLAGS := $(strip $(GOFLAGS) -tags=$(TAGS))
# Packages with goroutines or cross-process state run under the race detector.
RACE_PKGS := ./converter/... ./daxmem/... ./mounter/... ./snapshotter/...

.PHONY: all build deps check test unit guests fuzz bench demo clean

all: build

build:
	$(GO) build -o $(BIN) ./cmd/containerd-daxfs-grpc

deps:
	scripts/deps.sh

LINT      := .cache/bin/golangci-lint

# check fails on unformatted files, vet findings and golangci-lint
# findings (.golangci.yml: the linters containerd enables), in both builds
# of the gzip reader. scripts/deps.sh installs the pinned golangci-lint.
check:
	@out=$$(gofmt -l $$(git ls-files '*.go')); if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi
	$(GO) vet ./...
	GOFLAGS= $(GO) vet ./converter/gunzip/
	@test -x $(LINT) || { echo "$(LINT) is missing: run make deps"; exit 1; }
	$(LINT) run ./...
	GOFLAGS= $(LINT) run ./converter/gunzip/

# test is the whole suite: what CI runs (.ci/run) and what the README says.
test: deps check build unit guests fuzz

unit:
	$(GO) test -count=1 -race -timeout 15m $(RACE_PKGS)
	$(GO) test -count=1 -timeout 20m $$($(GO) list ./... | grep -v -e /converter -e /daxmem -e /mounter -e /snapshotter -e /tests/guests)
	# The gzip reader in both builds: ISA-L above, pure Go here.
	GOFLAGS= $(GO) test -count=1 -race ./converter/gunzip/

# guests boots real kernels under QEMU, sharing one memory (tests/guests;
# the kernel, module and guest root are built once by scripts/guest-kit.sh
# and cached under /var/cache). Verbose: the figures they measure, or why
# they skip where QEMU or the kernel packages are out of reach, are in the
# output.
guests:
	$(GO) test -count=1 -race -v -timeout 40m ./tests/guests/

# fuzz runs every fuzz target of the module for FUZZTIME each (see the
# script for how it treats the fuzzing engine's deadline endings).
fuzz:
	GO=$(GO) FUZZTIME=$(FUZZTIME) scripts/fuzz.sh

bench: deps build
	$(GO) test -run '^$$' -bench . -benchtime 1x -timeout 60m ./...

demo: deps build
	scripts/demo.sh

clean:
	rm -rf bin
