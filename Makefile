# Tally — the two commands: `make up` (start everything) and `make test` (run every test).
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

# Build output lives outside the clone so repeated runs (and fresh clones) reuse it.
export CARGO_TARGET_DIR ?= $(HOME)/.cache/tally/target
# `make up` runs release binaries; PROFILE=dev for a faster first build.
PROFILE ?= release
BIN_DIR := $(CARGO_TARGET_DIR)/$(if $(filter dev,$(PROFILE)),debug,$(PROFILE))
ENV := source deploy/local/env.sh

.PHONY: help up down test build lint fmt status load overload freshness bench-replay bench-read bench-alerts bench fuzz clean-data

help:
	@echo "make up      install what is missing, start Kafka, PostgreSQL, Redis and Tally, create a demo tenant"
	@echo "make test    run every test (lint, unit, end-to-end over real Kafka, PostgreSQL, Redis)"
	@echo "make down    stop everything (data is kept; 'make clean-data' deletes it)"
	@echo "make status  what is running"
	@echo "make load    run the load generator against 'make up' (EVENTS=200000 CONCURRENCY=8 BATCH=500 FORMAT=events|otlp SHAPE=backfill|live; PAUSE=1: the projector stopped while sending, then its drain timed alone)"
	@echo "make freshness  offer RATE=10000 events/s for SECONDS=60; time 202 → counted in the overview, peak memory of each service (after 'make up')"
	@echo "make overload  offer ingest-api twice the rate it sustains (FACTOR=2 SECONDS=30); report shedding, memory, exactly-once (after 'make up')"
	@echo "make bench-replay  produce REPLAY_EVENTS over REPLAY_DAYS to scratch topics, rebuild them with the projector's replay, compare with COPY (after 'make up')"
	@echo "make bench-read  load READ_EVENTS over READ_DAYS into a new tenant, time overview and time series (after 'make up'; READ_ARGS="--raw-days 2": raw rows and minute rollups of 2 days)"
	@echo "make bench-alerts  time budget crossings from the event's 202 to the signed webhook (after 'make up')"
	@echo "make bench   every benchmark (load: events backfill and live, OTLP; freshness; bench-replay; bench-read; bench-alerts; events and OTLP again with the projector paused while sending), then one table of figures, raw limits, ratios and goals"
	@echo "make fuzz    run every fuzz target for FUZZ_SECONDS each (default 300; FUZZ_TARGETS='jwt cursor' for some)"

up:
	deploy/local/prereqs.sh
	deploy/local/up.sh
	cargo build --profile $(PROFILE) --workspace --bins
	deploy/local/services.sh start $(BIN_DIR)
	deploy/local/demo.sh $(BIN_DIR)

down:
	deploy/local/services.sh stop
	deploy/local/down.sh

status:
	@deploy/local/status.sh
	@deploy/local/services.sh status

build:
	cargo build --profile $(PROFILE) --workspace --bins

lint:
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings

fmt:
	cargo fmt --all

test:
	deploy/local/prereqs.sh
	deploy/local/browser-prereqs.sh
	deploy/local/test-clients.sh
	deploy/local/fuzz-prereqs.sh
	deploy/local/up.sh
	$(MAKE) --no-print-directory lint
	# A fresh test database each run; the tests make their own topics and tenants in it.
	$(ENV) && psql -X -q -v ON_ERROR_STOP=1 "$$TALLY_DATABASE_URL" -f tests/reset-db.sql
	# The end-to-end tests run the real projector binary (to SIGKILL it): build the binaries.
	cargo build --workspace --bins
	$(ENV) && tests/summarize.sh tests/all.sh

EVENTS ?= 200000
CONCURRENCY ?= 8
BATCH ?= 500
FORMAT ?= events
SHAPE ?= backfill
PAUSE ?=
load:
	test -f .tally/demo.env || { echo "run 'make up' first"; exit 1; }
	cargo build --profile $(PROFILE) -p tally-tests --bin tally-load
	$(ENV) && source .tally/demo.env && \
		TALLY_BENCH_COMMAND="make load EVENTS=$(EVENTS) FORMAT=$(FORMAT) SHAPE=$(SHAPE)$(if $(filter 1,$(PAUSE)), PAUSE=1)" \
		$(BIN_DIR)/tally-load --events $(EVENTS) --concurrency $(CONCURRENCY) --batch $(BATCH) \
		--format $(FORMAT) --shape $(SHAPE) --baseline \
		$(if $(filter 1,$(PAUSE)),--pause-projector "$${TALLY_HOME:-.tally}/run/projector.pid")

FACTOR ?= 2
SECONDS ?= 30
overload:
	test -f .tally/demo.env || { echo "run 'make up' first"; exit 1; }
	cargo build --profile $(PROFILE) -p tally-tests --bin tally-overload
	$(ENV) && $(BIN_DIR)/tally-overload --factor $(FACTOR) --seconds $(SECONDS) \
		--pid-file "$${TALLY_HOME:-.tally}/run/ingest-api.pid"

# SECONDS is overload's too; freshness runs 60 s unless it is given.
RATE ?= 10000
FRESHNESS_SECONDS = $(if $(filter command line environment,$(origin SECONDS)),$(SECONDS),60)
freshness:
	test -f .tally/demo.env || { echo "run 'make up' first"; exit 1; }
	cargo build --profile $(PROFILE) -p tally-tests --bin tally-freshness
	$(ENV) && source .tally/demo.env && \
		TALLY_BENCH_COMMAND="make freshness RATE=$(RATE) SECONDS=$(FRESHNESS_SECONDS)" \
		$(BIN_DIR)/tally-freshness --rate $(RATE) --seconds $(FRESHNESS_SECONDS) \
		--pid-dir "$${TALLY_HOME:-.tally}/run"

# A rebuild from the log (projector replay, in process) of REPLAY_EVENTS produced straight to
# scratch topics, against COPY of the same raw rows; the rebuilt tenant is dropped after.
REPLAY_EVENTS ?= 1000000
REPLAY_DAYS ?= 7
bench-replay:
	test -f .tally/demo.env || { echo "run 'make up' first"; exit 1; }
	cargo build --profile $(PROFILE) -p tally-tests --bin tally-bench-replay
	$(ENV) && TALLY_BENCH_COMMAND="make bench-replay REPLAY_EVENTS=$(REPLAY_EVENTS) REPLAY_DAYS=$(REPLAY_DAYS)" \
		$(BIN_DIR)/tally-bench-replay --events $(REPLAY_EVENTS) --days $(REPLAY_DAYS)

# Budget crossings from the event's 202 to the signed webhook at a receiver on this host,
# with ALERT_BACKGROUND events/s into the demo tenant meanwhile.
CROSSINGS ?= 100
ALERT_BACKGROUND ?= 1000
bench-alerts:
	test -f .tally/demo.env || { echo "run 'make up' first"; exit 1; }
	cargo build --profile $(PROFILE) -p tally-tests --bin tally-bench-alerts
	$(ENV) && source .tally/demo.env && \
		TALLY_BENCH_COMMAND="make bench-alerts CROSSINGS=$(CROSSINGS) ALERT_BACKGROUND=$(ALERT_BACKGROUND)" \
		$(BIN_DIR)/tally-bench-alerts --crossings $(CROSSINGS) --background-rate $(ALERT_BACKGROUND)

# READ_ARGS="--raw-days 2" keeps raw rows and minute rollups of the last 2 days only, as a raw
# retention of 2 days does: for 100 M events, whose every minute would not fit on a small disk.
READ_EVENTS ?= 10000000
READ_DAYS ?= 30
READ_ARGS ?=
bench-read:
	test -f .tally/demo.env || { echo "run 'make up' first"; exit 1; }
	cargo build --profile $(PROFILE) -p tally-tests --bin tally-bench-read
	$(ENV) && TALLY_BENCH_COMMAND="make bench-read READ_EVENTS=$(READ_EVENTS) READ_DAYS=$(READ_DAYS)$(if $(READ_ARGS), READ_ARGS='$(READ_ARGS)')" \
		$(BIN_DIR)/tally-bench-read --events $(READ_EVENTS) --days $(READ_DAYS) $(READ_ARGS)

# The README's figures for one storage path (native partitions, or TimescaleDB where make up
# loaded it): every benchmark in turn, each recording its figures in BENCH_REPORT (one JSON
# line each), then one table of them all. A benchmark that fails does not stop the others; the
# run fails at the end, after the table.
ifndef BENCH_REPORT
BENCH_REPORT := .tally/bench-$(shell date -u +%Y%m%dT%H%M%SZ).jsonl
endif
BENCH_STEP = TALLY_BENCH_REPORT="$(abspath $(BENCH_REPORT))" $(MAKE) --no-print-directory
BENCH_FAILED = echo >>"$(BENCH_REPORT).failed"
bench:
	test -f .tally/demo.env || { echo "run 'make up' first"; exit 1; }
	mkdir -p "$(dir $(BENCH_REPORT))" && : >"$(BENCH_REPORT)" && rm -f "$(BENCH_REPORT).failed"
	# The demo tenant on the enterprise plan (5 000 requests a minute, not 1 000): the three
	# loads and make freshness send about 1 800 requests within a minute or two, and what is
	# measured is the pipeline, not the tenant's rate limit.
	$(ENV) && source .tally/demo.env && \
		$(BIN_DIR)/ingest-api admin tenant set-plan --id "$$TALLY_TENANT_ID" --plan enterprise
	$(BENCH_STEP) load FORMAT=events SHAPE=backfill || $(BENCH_FAILED) "make load"
	$(BENCH_STEP) load FORMAT=events SHAPE=live || $(BENCH_FAILED) "make load SHAPE=live"
	$(BENCH_STEP) load FORMAT=otlp SHAPE=backfill || $(BENCH_FAILED) "make load FORMAT=otlp"
	$(BENCH_STEP) freshness || $(BENCH_FAILED) "make freshness"
	$(BENCH_STEP) bench-replay || $(BENCH_FAILED) "make bench-replay"
	$(BENCH_STEP) bench-read || $(BENCH_FAILED) "make bench-read"
	$(BENCH_STEP) bench-alerts || $(BENCH_FAILED) "make bench-alerts"
	$(BENCH_STEP) load FORMAT=events SHAPE=backfill PAUSE=1 || $(BENCH_FAILED) "make load PAUSE=1"
	$(BENCH_STEP) load FORMAT=otlp SHAPE=backfill PAUSE=1 || $(BENCH_FAILED) "make load FORMAT=otlp PAUSE=1"
	@echo
	@deploy/local/bench-table.py "$(BENCH_REPORT)"
	@echo "(figures in $(BENCH_REPORT))"
	@if test -s "$(BENCH_REPORT).failed"; then echo "failed:"; cat "$(BENCH_REPORT).failed"; exit 1; fi

# The fuzz targets of fuzz/ (cargo-fuzz on the stable toolchain); `make test` runs them briefly.
FUZZ_SECONDS ?= 300
FUZZ_TARGETS ?=
fuzz:
	deploy/local/prereqs.sh
	deploy/local/fuzz-prereqs.sh
	deploy/local/fuzz.sh $(FUZZ_SECONDS) $(FUZZ_TARGETS)

clean-data:
	deploy/local/services.sh stop
	deploy/local/down.sh --purge
	rm -f .tally/demo.env
