# message-sender: `make` alone lists the targets.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
RUN_STAMP := $(VENV)/.installed-run
# pytest workers of `make test` (pytest-xdist; 0 runs in one process). Each test has its own sandbox, and
# each worker its own private servers, so two workers never see each other. Three on two cores: most tests
# wait on processes and servers, not on the CPU (2026-12-03 on the slower EPYC host: 10:20 with three).
TEST_WORKERS ?= 3

.DEFAULT_GOAL := help
.PHONY: help install run test lint bench bench-instructions chaos demo migrate services up down clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-18s %s\n", $$1, $$2}'

# What running needs (make run, demo, migrate); everything else adds the test extras on top (pytest,
# playwright, schemathesis, mypy...): a user who only runs the system never installs the test tools.
$(RUN_STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e .
	touch $(RUN_STAMP)

$(STAMP): $(RUN_STAMP)
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP) ## create .venv and install the project with its test extras

services: ## make sure MariaDB, Redis and RabbitMQ answer on localhost (start them if installed but stopped)
	@bash deploy/local-services.sh ensure

run: $(RUN_STAMP) ## run gateway, producer, consumer and the local webhook stand-in (Ctrl-C stops all)
	@$(BIN)/python -m deploy.run

test: $(STAMP) services ## lint, types and the whole test suite against the real MySQL, Redis and RabbitMQ
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/pytest -m "not chaos" -n $(TEST_WORKERS)

chaos: $(STAMP) services ## the long fault-injection suite
	$(BIN)/pytest -m chaos

lint: $(STAMP) ## ruff and mypy
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

bench: $(STAMP) services ## throughput, API latency and memory benchmark (prints a table)
	$(BIN)/python -m bench

bench-instructions: $(STAMP) services ## a consumer's instructions per drained message, by callgrind (for A/B tests)
	$(BIN)/python -m bench.instructions

demo: $(RUN_STAMP) ## insert sample messages for a running system
	$(BIN)/message-sender demo

migrate: $(RUN_STAMP) ## apply the schema migrations
	$(BIN)/message-sender migrate

.PHONY: images test-images
images: $(STAMP) ## build every service image from deploy/Dockerfile (podman if installed, else docker)
	$(BIN)/python deploy/images.py build

test-images: $(STAMP) ## build the images, prove each container alone and docker-compose.yml end to end
	$(BIN)/python deploy/images.py prove

# The stack in containers (docker compose, or podman-compose where only podman exists). SERVERS=compose: the
# MySQL, Redis and RabbitMQ of docker-compose.yml; SERVERS=host: this host's (deploy/compose.host.yml).
# Plain python3: a user with only a container engine needs no venv (podman-compose: `make install` or pip).
.PHONY: docker-build docker-down test-docker
SERVERS ?= compose
DOCKER_PY := $(if $(wildcard $(BIN)/python),$(BIN)/python,$(PY))

docker-build: ## build the images and start the whole stack (SERVERS=host: against this host's servers)
	$(DOCKER_PY) deploy/images.py up --servers $(SERVERS)

docker-down: ## stop and remove the stack's containers (the same SERVERS as docker-build)
	$(DOCKER_PY) deploy/images.py down --servers $(SERVERS)

test-docker: ## make test inside the project's test image, against the servers on this host (host networking)
	$(DOCKER_PY) deploy/images.py test

up: docker-build ## the same as docker-build

down: docker-down ## the same as docker-down

clean: ## remove the venv and caches
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache build *.egg-info
