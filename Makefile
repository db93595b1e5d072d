# make test:    install what the suite needs, then run it (CPU; a few minutes on 2 cores)
# make demo:    the whole pipeline on the embedded tiny model, CPU, ~6 minutes (short runs)
# make results: the paper's comparison in the tiny world, 3 seeds, GRPO and GDSO 5 (CPU: 39.6 minutes as OMP_NUM_THREADS=1 make -j3 results)
# make base:    regenerate the shipped tiny bases, assets/tiny_base.safetensors and assets/tiny_student_base.safetensors (CPU, ~50 minutes)
PY ?= python
WORLD ?= runs/world
DEMO ?= runs/demo
RESULTS ?= runs/results
SEEDS ?= 0 1 2
# GRPO and GDSO also run these two: over 3 seeds their difference did not resolve
RL_EXTRA_SEEDS ?= 3 4
SFT_STEPS ?= 400
SFT_LR ?= 3e-3
STUDENT_LR ?= 3e-3
RL_STEPS ?= 60
STUDENT_STEPS ?= 1200
STUDENT_EVAL_EVERY ?= 100
EVAL_EVERY ?= 20
CURVES ?= docs/curves.png
# the bases every method starts from (make base writes them to assets/)
TEACHER_BASE ?= assets/tiny_base.safetensors
STUDENT_BASE ?= assets/tiny_student_base.safetensors
export OMP_NUM_THREADS ?= 2

.PHONY: test test-latest demo results base install

# make install: the exact versions the suite last passed with (requirements-pinned.txt). A torch that
# is already installed (your CUDA build, say) is kept; without one, the pinned CPU-or-CUDA wheel of PyPI.
install:
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet $$(grep '^torch==' requirements-pinned.txt)
	$(PY) -m pip install --quiet $$(grep -vE '^(#|torch==|$$)' requirements-pinned.txt)

test: install
	$(PY) -m pytest -q

# make test-latest: the suite in a throwaway virtual environment with the newest release of every
# dependency, torch included (where PyPI has no CPU build of the newest torch, that is a CUDA build
# of several GB). Run it to see the next break before a user does; README, Dependencies.
LATEST_VENV ?= /tmp/zreward-test-latest
test-latest:
	rm -rf $(LATEST_VENV) && python3 -m venv $(LATEST_VENV)
	$(LATEST_VENV)/bin/python -m pip install --quiet --upgrade -r requirements.txt diffusers peft pyarrow
	$(LATEST_VENV)/bin/python -m pip list 2>/dev/null | grep -iE '^(torch|transformers|tokenizers|huggingface.hub|kernels|triton|safetensors|pillow|numpy|tqdm|pytest|diffusers|peft|pyarrow) '
	$(LATEST_VENV)/bin/python -m pytest -q

demo: install
	$(PY) tiny_world.py render --out $(WORLD) --n 200 --seed 0
	@echo "== zero-shot: the shipped tiny base, reasoning mode"
	$(PY) eval.py --ckpt $(TEACHER_BASE) --data $(WORLD)/test.jsonl --mode reasoning --limit 256
	@echo "== SFT baseline: direct score token, 400 steps as in make results"
	$(PY) sft.py --init $(TEACHER_BASE) --data $(WORLD) --out $(DEMO)/sft.safetensors --steps 400 --lr 3e-3 --eval-every 0 --eval-limit 256
	@echo "== GDSO teacher"
	$(PY) gdso.py --init $(TEACHER_BASE) --data $(WORLD) --out $(DEMO)/gdso.safetensors --steps 30 --eval-every 0 --eval-limit 256
	@echo "== RISD student: the tiny student base, one direct token, distilled from the GDSO teacher"
	$(PY) risd.py --teacher $(DEMO)/gdso.safetensors --data $(WORLD) --out $(DEMO)/risd.safetensors --steps 600 --lr 3e-3 --teacher-temperature 0 \
	  --cache $(DEMO)/risd.qT.safetensors --rebuild-cache --eval-every 0 --eval-limit 256
	@echo "== reward fine-tuning: a short generator pretraining run, then the shipped tiny generator tuned through the RISD student"
	$(PY) reward_ft.py --stage pretrain --data $(WORLD) --steps 300 --out $(DEMO)/gen_pretrain.safetensors
	$(PY) reward_ft.py --init assets/tiny_gen.safetensors --data $(WORLD) --reward $(DEMO)/risd.safetensors --judge $(DEMO)/gdso.safetensors --out $(DEMO)/gen_rft.safetensors

# every method from the shipped bases for each seed; `make -j2 results` runs two seeds at once
# (then set OMP_NUM_THREADS=1). SFT takes 400 steps at lr 3e-3 (measured: lr 1e-3 had reached
# only .63 HPA at 300 steps), the one-token students 1,200 (at 400 they still rose); RISD reads the teacher's greedy trace (sampled at T = 1 the
# GDSO teacher left a third of its traces without a score); GRPO, GDSO and OPD take 60 steps, GRPO
# and GDSO at gdso.py's default lr 5e-5 (at 2e-4 GDSO's sampled traces lost the format).
results: $(addprefix results-seed-,$(SEEDS)) $(addprefix results-rl-seed-,$(RL_EXTRA_SEEDS)) $(RESULTS)/zero-shot.eval.json
	$(PY) eval.py summarize $(RESULTS)/*.eval.json
	$(PY) eval.py curves $(CURVES) $(RESULTS)/*.curve.jsonl || echo "(no learning-curve picture: pip install matplotlib)"

$(RESULTS)/zero-shot.eval.json: $(WORLD)/test.jsonl
	mkdir -p $(RESULTS)
	$(PY) eval.py --ckpt count-only --data $(WORLD)/test.jsonl --json $(RESULTS)/count-only.eval.json
	$(PY) eval.py --ckpt $(STUDENT_BASE) --data $(WORLD)/test.jsonl --mode reasoning --json $(RESULTS)/student-zero-shot.eval.json
	$(PY) eval.py --ckpt $(TEACHER_BASE) --data $(WORLD)/test.jsonl --mode reasoning --json $@

$(WORLD)/test.jsonl:
	$(PY) tiny_world.py render --out $(WORLD) --n 200 --seed 0

# a seed's GRPO and GDSO first (RISD and OPD distill that seed's GDSO teacher), then the rest
results-seed-%: results-rl-seed-%
	rm -f $(foreach m,sft rewarddance student-rewarddance student-sft risd opd,$(RESULTS)/$(m)-$*.curve.jsonl)
	$(PY) sft.py --init $(TEACHER_BASE) --data $(WORLD) --out $(RESULTS)/sft-$*.safetensors --steps $(SFT_STEPS) --lr $(SFT_LR) --seed $* --eval-every $(EVAL_EVERY) --eval-limit 0
	$(PY) sft.py --stage rewarddance --init $(TEACHER_BASE) --data $(WORLD) --out $(RESULTS)/rewarddance-$*.safetensors --steps $(SFT_STEPS) --lr $(SFT_LR) --seed $* --eval-every $(EVAL_EVERY) --eval-limit 0
	$(PY) sft.py --stage rewarddance --init $(STUDENT_BASE) --data $(WORLD) --out $(RESULTS)/student-rewarddance-$*.safetensors --steps $(STUDENT_STEPS) --lr $(STUDENT_LR) --seed $* --eval-every $(STUDENT_EVAL_EVERY) --eval-limit 0
	$(PY) sft.py --init $(STUDENT_BASE) --data $(WORLD) --out $(RESULTS)/student-sft-$*.safetensors --steps $(STUDENT_STEPS) --lr $(STUDENT_LR) --seed $* --eval-every $(STUDENT_EVAL_EVERY) --eval-limit 0
	$(PY) risd.py --teacher $(RESULTS)/gdso-$*.safetensors --student $(STUDENT_BASE) --data $(WORLD) --out $(RESULTS)/risd-$*.safetensors --steps $(STUDENT_STEPS) --lr $(STUDENT_LR) --teacher-temperature 0 \
	  --cache $(RESULTS)/risd-$*.qT.safetensors --rebuild-cache --seed $* --eval-every $(STUDENT_EVAL_EVERY) --eval-limit 0
	$(PY) risd.py --opd --teacher $(RESULTS)/gdso-$*.safetensors --student $(STUDENT_BASE) --data $(WORLD) --out $(RESULTS)/opd-$*.safetensors --steps $(RL_STEPS) --seed $* --eval-every $(EVAL_EVERY) --eval-limit 0

results-rl-seed-%: $(WORLD)/test.jsonl
	mkdir -p $(RESULTS)
	rm -f $(RESULTS)/grpo-$*.curve.jsonl $(RESULTS)/gdso-$*.curve.jsonl
	$(PY) gdso.py --method grpo --init $(TEACHER_BASE) --data $(WORLD) --out $(RESULTS)/grpo-$*.safetensors --steps $(RL_STEPS) --seed $* --eval-every $(EVAL_EVERY) --eval-limit 0
	$(PY) gdso.py --init $(TEACHER_BASE) --data $(WORLD) --out $(RESULTS)/gdso-$*.safetensors --steps $(RL_STEPS) --seed $* --eval-every $(EVAL_EVERY) --eval-limit 0

# the shipped tiny bases (assets/): vision tower on scene labels, then captions and traces whose score
# lines follow the generic rubric, on a pretraining world without the labeled world's test prompts;
# prompts v1, the image first (docs/TINY_WORLD.md)
base:
	$(PY) tiny_world.py render --out $(WORLD) --n 200 --seed 0
	$(PY) tiny_world.py render --out runs/pretrain --n 4000 --seed 1 --trace-rubric generic --test-frac 0.02
	mkdir -p runs/base
	for size in teacher student; do \
	  $(PY) tiny_world.py tower --size $$size --prompt-version zr-rubric-v1 --out runs/base/tower-$$size.safetensors && \
	  $(PY) tiny_base.py --init runs/base/tower-$$size.safetensors --data runs/pretrain --holdout $(WORLD)/test.jsonl \
	    --steps 3000 --eval-every 0 --eval-limit 128 --out runs/base/base-$$size.safetensors && \
	  $(PY) tiny_base.py --init runs/base/base-$$size.safetensors --data runs/pretrain --holdout $(WORLD)/test.jsonl \
	    --steps 1500 --lr 1e-3 --seed 1 --eval-every 0 --eval-limit 128 --out runs/base/base2-$$size.safetensors || exit 1; \
	done
	cp runs/base/base2-teacher.safetensors assets/tiny_base.safetensors
	cp runs/base/base2-student.safetensors assets/tiny_student_base.safetensors
	$(PY) tiny_world.py check --ckpt assets/tiny_base.safetensors --data $(WORLD)/test.jsonl --limit 0
	$(PY) tiny_world.py check --ckpt assets/tiny_student_base.safetensors --data $(WORLD)/test.jsonl --limit 0

# make gpu-check: on a machine with a CUDA GPU (~5 minutes): the kernel tests on the GPU (no
# interpreter), bench.py --quick, then a few bf16 steps of sft, gdso --fsdp, also with --micro-samples (torchrun over the
# GPUs present), risd and reward_ft on the tiny model, and reward_ft --generator on a tiny random
# FLUX pipeline (diffusers + peft, a LoRA step), each step line with ms/step and peak GPU memory.
# Record device, date and numbers in BENCHMARKS.md. Without a GPU it says so and stops.
GPU_CHECK ?= runs/gpu-check
.PHONY: gpu-check
gpu-check:
	@$(PY) -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" || \
	  { echo "gpu-check: no CUDA GPU on this machine (torch.cuda.is_available() is False): nothing was checked"; exit 2; }
	@$(PY) -c "import torch; print('gpu-check:', torch.cuda.get_device_name(0), 'x', torch.cuda.device_count(), '| torch', torch.__version__)"; date -u
	TRITON_INTERPRET= $(PY) -m pytest -q tests/test_kernels.py
	$(PY) bench.py --quick
	$(PY) tiny_world.py render --out $(GPU_CHECK)/world --n 40 --seed 0
	$(PY) sft.py --init assets/tiny_base.safetensors --data $(GPU_CHECK)/world --out $(GPU_CHECK)/sft.safetensors \
	  --bf16 --checkpointing --steps 20 --eval-every 0 --eval-limit 64
	torchrun --standalone --nproc_per_node=$$($(PY) -c "import torch; print(torch.cuda.device_count())") gdso.py \
	  --data $(GPU_CHECK)/world --out $(GPU_CHECK)/gdso.safetensors --bf16 --fsdp --checkpointing --steps 5 \
	  --eval-every 0 --eval-limit 64
	torchrun --standalone --nproc_per_node=$$($(PY) -c "import torch; print(torch.cuda.device_count())") gdso.py \
	  --data $(GPU_CHECK)/world --out $(GPU_CHECK)/gdso-chunks.safetensors --bf16 --fsdp --checkpointing --steps 5 \
	  --micro-samples 4 --eval-every 0 --eval-limit 64
	# the 80 GB flags (the step lines print ms and peak GiB: compare with the two runs above), then a
	# resume of the sharded set it saved at step 3
	torchrun --standalone --nproc_per_node=$$($(PY) -c "import torch; print(torch.cuda.device_count())") gdso.py \
	  --data $(GPU_CHECK)/world --out $(GPU_CHECK)/gdso-offload.safetensors --bf16 --fsdp --checkpointing --steps 5 \
	  --micro-samples 4 --offload --layerwise-rollout --save-every 3 --stop-after 3 --eval-every 0 --eval-limit 64
	torchrun --standalone --nproc_per_node=$$($(PY) -c "import torch; print(torch.cuda.device_count())") gdso.py \
	  --data $(GPU_CHECK)/world --out $(GPU_CHECK)/gdso-offload.safetensors --bf16 --fsdp --checkpointing --steps 5 \
	  --micro-samples 4 --offload --layerwise-rollout --save-every 3 --eval-every 5 --eval-limit 64 --resume
	$(PY) risd.py --teacher $(GPU_CHECK)/gdso.safetensors --data $(GPU_CHECK)/world --out $(GPU_CHECK)/risd.safetensors \
	  --bf16 --checkpointing --steps 20 --eval-every 0 --eval-limit 64
	$(PY) reward_ft.py --reward $(GPU_CHECK)/risd.safetensors --data $(GPU_CHECK)/world --out $(GPU_CHECK)/rft.safetensors \
	  --bf16 --steps 10 --eval-prompts 8 --eval-samples 1
	$(PY) tests/test_diffusers.py $(GPU_CHECK)/pipes
	$(PY) reward_ft.py --generator $(GPU_CHECK)/pipes/flux --resolution 32 --lora-rank 4 --reward $(GPU_CHECK)/risd.safetensors \
	  --data $(GPU_CHECK)/world --out $(GPU_CHECK)/flux.safetensors --bf16 --steps 3 --sample-steps 3 --grad-steps 2 \
	  --stop-range 2 --batch-size 2 --micro-batch 2 --eval-prompts 2 --eval-samples 1 --grid-prompts 2
