# `make demo` and `make test` do all set-up on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

# Pretrains a tiny CLIP on the synthetic world (demo_output/clip, reused on a rerun), then trains
# the synthetic zero-shot config on it (frozen CLIP, prompts + head) on CPU, evaluates and prints
# seen / unseen / hIoU; pictures land in demo_output/eval. Rerunning resumes from demo_output.
demo: $(STAMP)
	$(PY) -m otseg_jax.data.synthetic_clip --out demo_output/clip
	$(PY) train.py --config configs/synthetic.py --workdir demo_output

test: $(STAMP)
	$(PY) -m pytest -q --durations=20 tests

bench: $(STAMP)
	$(PY) benchmarks/bench_model.py
	$(PY) benchmarks/bench_train.py
	$(PY) benchmarks/bench_data.py
	$(PY) benchmarks/bench_scaling.py
	$(PY) benchmarks/bench_memory.py

clean:
	rm -rf $(VENV) demo_output
