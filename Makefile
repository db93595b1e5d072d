# make test: install what the suite needs, then run it (CPU, a few minutes on 2 cores)
# make demo: the whole pipeline on the embedded tiny default, ending in an eval table
PY ?= python
OUT ?= runs/demo
export OMP_NUM_THREADS ?= 2

.PHONY: test demo install

install:
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -r requirements.txt

test: install
	$(PY) -m pytest -q

demo:
	$(PY) data.py --out $(OUT)/world --n 40 --seed 0
	$(PY) eval.py --ckpt tiny --data $(OUT)/world/test.jsonl
