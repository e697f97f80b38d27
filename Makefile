# kvrouter: `make demo` runs the stack on simulated engines; `make test` runs every test tier.
PYTHON ?= python3
VENV ?= .venv
ENGINE_VENV ?= .venv-engine
CONFIG ?= etc/kvrouter.yaml
HOST ?=
OUT ?= etc
KV := $(VENV)/bin/kvrouter
PY := $(VENV)/bin/python
SUPERVISORCTL := $(VENV)/bin/supervisorctl -c $(OUT)/supervisord.conf
PYTEST_ARGS ?=

.PHONY: install shims engine-env render demo demo-stop status test lint test-unit test-integration \
        test-systemd test-engine bench bench-kv bench-policy bench-replicas traces install-units clean

install: $(VENV)/.installed

$(VENV)/.installed: setup.cfg setup.py
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[test,bench]'
	touch $@

## `supervisorctl` and `kvrouter` on PATH in any shell (the card's `make render && supervisorctl
## start all`): small scripts in BINDIR (/usr/local/bin when writable, else ~/.local/bin) that
## run this checkout's venv; supervisorctl uses $(OUT)/supervisord.conf unless -c is given or a
## supervisord.conf is in the current folder. A command of the same name kvrouter did not put
## there is left alone.
BINDIR ?= $(shell test -w /usr/local/bin && echo /usr/local/bin || echo $(HOME)/.local/bin)
MARK := installed by kvrouter's make render
shims: install
	@mkdir -p $(BINDIR)
	@for cmd in supervisorctl kvrouter; do \
	  dest=$(BINDIR)/$$cmd; \
	  if [ -e $$dest ] && ! grep -q "$(MARK)" $$dest 2>/dev/null; then \
	    echo "$$dest exists and is not kvrouter's: left alone (use $(VENV)/bin/$$cmd)"; continue; fi; \
	  { echo '#!/bin/sh'; echo "# $(MARK) ($(CURDIR))"; \
	    echo '[ -x "$(CURDIR)/$(VENV)/bin/'$$cmd'" ] || { echo "'$$cmd': $(CURDIR)/$(VENV) is gone: run make render in your kvrouter checkout" >&2; exit 127; }'; \
	    if [ $$cmd = supervisorctl ]; then \
	      echo 'case " $$* " in *" -c "*|*" --configuration"*) exec "$(CURDIR)/$(VENV)/bin/supervisorctl" "$$@";; esac'; \
	      echo '[ -f supervisord.conf ] || [ -f etc/supervisord.conf ] && exec "$(CURDIR)/$(VENV)/bin/supervisorctl" "$$@"'; \
	      echo 'exec "$(CURDIR)/$(VENV)/bin/supervisorctl" -c "$(abspath $(OUT))/supervisord.conf" "$$@"'; \
	    else echo 'exec "$(CURDIR)/$(VENV)/bin/kvrouter" "$$@"'; fi; } > $$dest.tmp && \
	  chmod 755 $$dest.tmp && mv $$dest.tmp $$dest; \
	done
	@case ":$$PATH:" in *":$(BINDIR):"*) ;; *) echo "note: $(BINDIR) is not on PATH: add it, or use $(VENV)/bin/supervisorctl";; esac

## render CONFIG into $(OUT)/ and bring the stack to it: supervisord started (every engine and
## the router), or reread+update a running one; under process_manager: systemd, the units are
## installed and reloaded instead. On several hosts (cluster.hosts), each host renders its
## part: make render HOST=gpu-a
render: shims
	$(KV) render $(CONFIG) --out $(OUT) --apply $(if $(HOST),--host $(HOST))

## the demo: simulated engines + router under supervisord, one chat request through the router
demo: render
	$(SUPERVISORCTL) start all >/dev/null || true
	$(KV) wait-ready $(CONFIG) --timeout 60 --out $(OUT)
	@echo '$$ curl -s http://127.0.0.1:8080/v1/chat/completions -H "Content-Type: application/json" \'
	@echo '    -d '"'"'{"model": "llama", "max_tokens": 12, "messages": [{"role": "user", "content": "Hello!"}]}'"'"
	@curl -sS http://127.0.0.1:8080/v1/chat/completions -H "Content-Type: application/json" \
	    -d '{"model": "llama", "max_tokens": 12, "messages": [{"role": "user", "content": "Hello!"}]}' \
	    | $(PY) -m json.tool
	@echo
	@$(SUPERVISORCTL) status || true
	@echo
	@echo "Running under supervisord. Next:"
	@echo "  supervisorctl status          (on PATH now, in $(BINDIR); or $(VENV)/bin/supervisorctl -c $(OUT)/supervisord.conf status)"
	@echo "  curl -s localhost:8080/health/all ; curl -s localhost:8080/v1/models ; curl -s localhost:8080/traffic/stats"
	@echo "  tail -f $(OUT)/logs/kvrouter.log"
	@echo "  make demo-stop"

demo-stop:
	-$(SUPERVISORCTL) shutdown

status:
	$(SUPERVISORCTL) status

## every tier (the systemd and engine tiers must run, not skip), after ruff and mypy
test: install engine-env lint
	KVROUTER_REQUIRE_ENGINE=1 KVROUTER_REQUIRE_SYSTEMD=1 KVROUTER_REQUIRE_BROWSER=1 \
	    KVROUTER_REQUIRE_REDIS=1 \
	    $(PY) -m pytest -q tests/unit \
	    tests/integration tests/systemd tests/engine $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

test-unit: install
	$(PY) -m pytest -q tests/unit $(PYTEST_ARGS)

test-integration: install
	$(PY) -m pytest -q tests/integration $(PYTEST_ARGS)

## the rendered units under a real systemd --user and journald (tests/systemd/user_manager.py, as root)
test-systemd: install
	KVROUTER_REQUIRE_SYSTEMD=1 $(PY) -m pytest -q tests/systemd $(PYTEST_ARGS)

## a real vLLM (CPU build, tiny local model) under kvrouter's supervisord config
test-engine: install engine-env
	KVROUTER_REQUIRE_ENGINE=1 $(PY) -m pytest -q tests/engine $(PYTEST_ARGS)

engine-env:
	bash tests/engine/install_engine.sh $(ENGINE_VENV)

## speed figures: router (1 and N workers) vs direct, aiohttp and vllm-router (when PyPI has it), sim engine, load generator; the cluster's added latency, state propagation and leader failover (prints, no asserts)
bench: install
	@command -v wrk >/dev/null && command -v nginx >/dev/null || \
	    { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	      (apt-get install -y -q wrk nginx >/dev/null 2>&1 || \
	       (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q wrk nginx >/dev/null 2>&1)); } || \
	    echo "wrk/nginx not installed (apt install wrk nginx): built-in load, no nginx rows"
	@test -x .venv-peer/bin/vllm-router || ($(PYTHON) -m venv .venv-peer && \
	    .venv-peer/bin/pip install -q vllm-router) || echo "vllm-router not installable: no peer"
	VLLM_ROUTER=$$(test -x .venv-peer/bin/vllm-router && echo $(CURDIR)/.venv-peer/bin/vllm-router) \
	    $(PY) -m kvrouter.bench.speed --seconds 4 --runs 3 --out bench-results/speed.json
	$(PY) -m kvrouter.bench.cluster --out bench-results/cluster.json

## the KV arbiter vs a static equal split of one simulated GPU (about 2.5 minutes; prints)
bench-kv: install
	$(PY) -m kvrouter.bench.arbiter --out bench-results/kv-arbiter.json

## public traces into bench-results/traces (Azure LLM inference 2023 code and conversation,
## Mooncake's conversations); each kept once downloaded; the shipped excerpts stand in when offline
AZURE_URL ?= https://raw.githubusercontent.com/Azure/AzurePublicDataset/master/data
MOONCAKE_URL ?= https://raw.githubusercontent.com/kvcache-ai/Mooncake/main/FAST25-release/traces/conversation_trace.jsonl
traces:
	@mkdir -p bench-results/traces
	@for f in AzureLLMInferenceTrace_code.csv AzureLLMInferenceTrace_conv.csv; do \
	    test -s bench-results/traces/$$f || curl -fsSL -o bench-results/traces/$$f $(AZURE_URL)/$$f || \
	    { rm -f bench-results/traces/$$f; echo "$$f not downloaded: its shipped excerpt is used"; }; done
	@test -s bench-results/traces/conversation_trace.jsonl || \
	    curl -fsSL -o bench-results/traces/conversation_trace.jsonl $(MOONCAKE_URL) || \
	    { rm -f bench-results/traces/conversation_trace.jsonl; echo "Mooncake trace not downloaded: the shipped excerpt is used"; }

## the policy lab: every sleep policy against fair baselines on a training and a held-out test
## set of traces (docs/policy-lab.md; simulated; about 40 minutes on 2 cores)
bench-policy: install traces
	$(VENV)/bin/pip install -q -e '.[plot]'
	$(PY) -m kvrouter.lab.suite --out bench-results/policy-lab

## replicas: scaling, routing policies on the Mooncake conversation trace (downloaded once), elastic vs always awake (the lab; seconds; prints tables)
bench-replicas: install traces
	$(PY) -m kvrouter.bench.replicas --out bench-results/replicas.json

## copy the rendered systemd user units and reload: then `systemctl --user start kvrouter`
install-units: install
	$(KV) render $(CONFIG) --out $(OUT) --only systemd
	mkdir -p $(HOME)/.config/systemd/user
	cp $(OUT)/systemd/*.service $(OUT)/systemd/*.target $(HOME)/.config/systemd/user/
	systemctl --user daemon-reload

clean:
	-$(SUPERVISORCTL) shutdown 2>/dev/null
	rm -rf $(OUT)/supervisord.conf $(OUT)/systemd $(OUT)/logs $(OUT)/run $(OUT)/.kvrouter-render.json
