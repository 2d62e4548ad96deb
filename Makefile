# pg_ihub: the two set-up commands are `make run` and `make test`.
PG_CONFIG ?= /usr/lib/postgresql/15/bin/pg_config
SUDO := $(if $(filter 0,$(shell id -u)),,--sudo)

.PHONY: run test bench soak deps install stop fmt

## Build, install, start a local cluster with the demo and show it working.
run: install
	demo/run

## Install what is missing, then run every test (unit, in-database, end to end).
test: deps
	tests/run

## Throughput, latency and writer-overhead figures.
bench: install
	bench/run

## Five minutes of mixed load with crashes and faults, then the accounting (issue 10).
soak: install
	tests/soak/run $(or $(IHUB_SOAK_SECS),300)

deps:
	scripts/deps

install: deps
	cargo pgrx install --release --pg-config $(PG_CONFIG) $(SUDO) >/dev/null

## Stop the demo cluster and receiver.
stop:
	demo/run stop

fmt:
	cargo fmt --all
