# make test:    install what the suite needs, then run it (CPU; a few minutes on 2 cores)
# make demo:    the whole pipeline on the embedded tiny model, CPU, under 10 minutes
# make results: the paper's comparison in the tiny world, 3 seeds (CPU, ~20 minutes on 2 cores)
# make base:    regenerate the shipped tiny base, assets/tiny_base.safetensors (CPU, ~8 minutes)
PY ?= python
WORLD ?= runs/world
DEMO ?= runs/demo
RESULTS ?= runs/results
SEEDS ?= 0 1 2
STEPS ?= 60
export OMP_NUM_THREADS ?= 2

.PHONY: test demo results base install

install:
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -r requirements.txt
# optional, only for reward_ft.py --generator FOLDER; the suite tests it on tiny random pipelines (~7 MB of wheels, ~75 MB installed, seconds)
	$(PY) -m pip install --quiet diffusers==0.42.1 peft==0.21.2

test: install
	$(PY) -m pytest -q

demo:
	$(PY) data.py --out $(WORLD) --n 200 --seed 0
	@echo "== zero-shot: the shipped tiny base, reasoning mode"
	$(PY) eval.py --ckpt assets/tiny_base.safetensors --data $(WORLD)/test.jsonl --mode reasoning --limit 256
	@echo "== SFT baseline: direct score token"
	$(PY) sft.py --init assets/tiny_base.safetensors --data $(WORLD) --out $(DEMO)/sft.safetensors --steps 60 --eval-every 0 --eval-limit 256
	@echo "== GDSO teacher"
	$(PY) gdso.py --data $(WORLD) --out $(DEMO)/gdso.safetensors --steps 20 --eval-every 0 --eval-limit 256
	@echo "== RISD student: one direct token, distilled from the GDSO teacher"
	$(PY) risd.py --teacher $(DEMO)/gdso.safetensors --data $(WORLD) --out $(DEMO)/risd.safetensors --steps 100 --eval-every 0 --eval-limit 256
	@echo "== reward fine-tuning: a short generator pretraining run, then the shipped tiny generator tuned through the RISD student"
	$(PY) reward_ft.py --stage pretrain --steps 300 --out $(DEMO)/gen_pretrain.safetensors
	$(PY) reward_ft.py --init assets/tiny_gen.safetensors --reward $(DEMO)/risd.safetensors --judge $(DEMO)/gdso.safetensors --out $(DEMO)/gen_rft.safetensors

results:
	$(PY) data.py --out $(WORLD) --n 200 --seed 0
	mkdir -p $(RESULTS)
	$(PY) eval.py --ckpt assets/tiny_base.safetensors --data $(WORLD)/test.jsonl --mode reasoning --method zero-shot --json $(RESULTS)/zeroshot.eval.json
	$(PY) eval.py --ckpt count-only --data $(WORLD)/test.jsonl --method count-only --json $(RESULTS)/countonly.eval.json
	for s in $(SEEDS); do \
	  $(PY) sft.py --init assets/tiny_base.safetensors --data $(WORLD) --out $(RESULTS)/sft-$$s.safetensors --steps $(STEPS) --seed $$s --eval-every 0 --eval-limit 0 && \
	  $(PY) gdso.py --method grpo --data $(WORLD) --out $(RESULTS)/grpo-$$s.safetensors --steps $(STEPS) --seed $$s --eval-every 0 --eval-limit 0 && \
	  $(PY) gdso.py --data $(WORLD) --out $(RESULTS)/gdso-$$s.safetensors --steps $(STEPS) --seed $$s --eval-every 0 --eval-limit 0 && \
	  $(PY) risd.py --teacher $(RESULTS)/gdso-$$s.safetensors --data $(WORLD) --out $(RESULTS)/risd-$$s.safetensors --seed $$s --eval-every 0 --eval-limit 0 && \
	  $(PY) risd.py --opd --teacher $(RESULTS)/gdso-$$s.safetensors --data $(WORLD) --out $(RESULTS)/opd-$$s.safetensors --steps $(STEPS) --seed $$s --eval-every 0 --eval-limit 0 || exit 1; \
	done
	$(PY) eval.py summarize $(RESULTS)/*.eval.json

base:
	$(PY) data.py --out $(WORLD) --n 200 --seed 0
	$(PY) data.py --out runs/pretrain --n 400 --seed 1
	$(PY) sft.py --stage base --data runs/pretrain --holdout $(WORLD)/test.jsonl --out assets/tiny_base.safetensors
