# make setup: .venv/ with everything installed (a second run with nothing changed is a no-op).
# make test:  lint + test suite.   make demo: the embedded end-to-end run (METHOD=albef by default;
# another method's demo is scripts/demo_<method>.sh, e.g. make demo METHOD=xvlm).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup system-packages test lint demo clean

setup: system-packages $(STAMP)

# sshd and pdsh for the real multi-node tests (two loopback "nodes"); installed only when missing and
# running as root with apt-get, skipped quietly otherwise (those tests then skip and say why).
system-packages:
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	    { [ ! -x /usr/sbin/sshd ] || ! command -v pdsh >/dev/null 2>&1; }; then \
	    echo "installing openssh-server and pdsh (apt-get)"; \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -q openssh-server pdsh >/dev/null 2>&1 || \
	    { apt-get update -q >/dev/null 2>&1 && \
	      DEBIAN_FRONTEND=noninteractive apt-get install -y -q openssh-server pdsh >/dev/null; } || \
	    echo "warning: could not install openssh-server and pdsh; the multi-node tests will skip"; \
	fi

$(STAMP): requirements.txt requirements-test.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt -r requirements-test.txt
	@touch $(STAMP)

lint: setup
	$(VENV)/bin/ruff check .

test: lint
	$(PY) -m pytest -q tests

METHOD ?= albef

demo: setup
	bash scripts/$(if $(filter albef,$(METHOD)),demo.sh,demo_$(METHOD).sh)

clean:
	rm -rf runs data .pytest_cache
