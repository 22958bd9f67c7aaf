# Development commands. `make demo` and `make test` work on a fresh clone:
# they create the virtual environments they need on first use.

PYTHON ?= python3
VENV := .venv
VENV_313 := .venv-313
TEST_DEPS := -e '.[test]' 'django>=5.2,<5.3' 'django-tasks>=0.8' gunicorn uwsgi
TEST_DEPS_313 := -e '.[test]' 'django>=6,<7' gunicorn uwsgi

.PHONY: demo test test-311 test-313 lint bench profile clean

demo: $(VENV)/.installed
	$(VENV)/bin/python demo/census.py

test: test-311 test-313

test-311: $(VENV)/.installed
	@echo "== Python 3.11 + Django 5.2 =="
	$(VENV)/bin/python -m pytest tests -q -rs

test-313:
	@scripts/test-python313.sh $(VENV_313) $(TEST_DEPS_313)

lint: $(VENV)/.installed
	$(VENV)/bin/pip install -q ruff mypy django-stubs
	$(VENV)/bin/ruff check stagehand stagehand_django
	$(VENV)/bin/ruff format --check stagehand stagehand_django
	$(VENV)/bin/mypy stagehand stagehand_django

bench: $(VENV)/.installed
	$(VENV)/bin/pip install -q -e '.[bench]'
	$(VENV)/bin/python -m bench

# py-spy ships as a compiled wheel; where none installs, bench.profile falls
# back to cProfile in one thread.
profile: $(VENV)/.installed
	$(VENV)/bin/pip install -q py-spy || echo "py-spy did not install; using cProfile"
	$(VENV)/bin/python -m bench.profile

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q $(TEST_DEPS)
	touch $@

clean:
	rm -rf $(VENV) $(VENV_313) .pytest_cache
