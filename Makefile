# pgwarden — see README.md.
GO       ?= go
DEV_DIR  ?= .dev
DEV_PORT ?= 6432
DEV_METRICS_PORT ?= 9632
# Integration tests start real PostgreSQL and Vault; 2 cores, so few packages at once.
TEST_FLAGS ?= -race -count=1 -timeout 30m -p 2
# What `pgwarden version` prints; the Dockerfile stamps its VERSION build
# argument the same way.
VERSION ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
LDFLAGS  = -X main.buildVersion=$(VERSION)
IMAGE   ?= pgwarden:$(VERSION)

.PHONY: all build dev test test-short lint fmt bench fuzz deps vault clean image compose-config

all: build

## build: bin/pgwarden, bin/devtoken, bin/devstack, and the image's bin/devissuer and bin/healthprobe
build:
	$(GO) build -ldflags '$(LDFLAGS)' -o bin/pgwarden ./cmd/pgwarden
	$(GO) build -o bin/devtoken ./testenv/cmd/devtoken
	$(GO) build -o bin/devstack ./testenv/cmd/devstack
	$(GO) build -o bin/devissuer ./testenv/cmd/devissuer
	$(GO) build -o bin/healthprobe ./deploy/cmd/healthprobe

## deps: install Debian's PostgreSQL, its client and PgBouncer when missing (as root), else say what to install
deps:
	@scripts/deps.sh

## vault: build bin/vault once from testenv/vaultbin (cached; rebuilt when the pin changes)
vault:
	@scripts/vault.sh

## dev: run the whole stack until Ctrl-C; writes $(DEV_DIR)/env when ready
dev: deps vault build
	bin/devstack -dir $(DEV_DIR) -port $(DEV_PORT) -metrics-port $(DEV_METRICS_PORT)

## test: lint, then every test with -race against real PostgreSQL, Vault and an OIDC issuer
test: deps vault lint build
	$(GO) test $(TEST_FLAGS) ./...

## test-short: unit tests only (integration tests skip outside CI)
test-short:
	$(GO) test -short -race ./...

## lint: gofmt and go vet must be clean
lint:
	@out=$$(gofmt -l $$(git ls-files '*.go') 2>&1); if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi
	$(GO) vet ./...

fmt:
	gofmt -w $$(git ls-files '*.go')

## bench: pgwarden beside direct PostgreSQL and PgBouncer; BENCH=quick (under 10 minutes) or full
BENCH ?= quick
bench: deps vault build
	$(GO) run ./bench -profile $(BENCH) -out bench/results

## fuzz: run each fuzzer of untrusted input for FUZZTIME
# (minimizing each new input is capped, so the time goes to fuzzing)
FUZZTIME ?= 30s
FUZZFLAGS = -run '^$$' -fuzztime $(FUZZTIME) -fuzzminimizetime 5s
fuzz:
	$(GO) test $(FUZZFLAGS) -fuzz '^FuzzStartup$$' ./proxy
	$(GO) test $(FUZZFLAGS) -fuzz '^FuzzStartupSettings$$' ./proxy
	$(GO) test $(FUZZFLAGS) -fuzz '^FuzzCopyFrame$$' ./wire

## image: the container image (needs a Docker engine; see README, Deploying)
image:
	docker build --build-arg VERSION=$(VERSION) -t $(IMAGE) .

## compose-config: docker-compose.yml as Compose reads it (go test ./deploy checks it too)
compose-config:
	@if docker compose version >/dev/null 2>&1; then docker compose config -q; else docker-compose config -q; fi && echo "docker-compose.yml: ok"

clean:
	rm -rf bin/pgwarden bin/devtoken bin/devstack bin/devissuer bin/healthprobe $(DEV_DIR)
