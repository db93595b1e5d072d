"""
What every training script shares: distributed init, data sharding, metric averaging, DDP / FSDP2
wrapping, the optimizer and schedule, and checkpoints that a run resumes from exactly.

One process or many, the scripts run the same code: under torchrun (RANK / WORLD_SIZE set) this
initializes a process group (NCCL on GPUs, gloo on CPU); otherwise it runs single-process on
cuda or cpu. Two files per checkpoint:
  NAME.safetensors   the score model alone, weights + metadata (model.py), for eval / the next stage
                     (reward_ft.py: the generator, or its LoRA)
  NAME.train.pt      optimizer, step, RNG states, data position and flags, for --resume
(gdso.py adds NAME.ref.safetensors, pi_ref). Each is written atomically (temp file, then rename)
by rank 0, so a crash never leaves a truncated file; the set is written file by file, so every file
records the step and --resume refuses a set whose steps differ (a kill between two writes).
"""

import argparse
import datetime
import math
import os
import random
import sys
import tempfile
import time
from contextlib import contextmanager

import numpy as np
import torch
import torch.distributed as dist

import tiny_world
from data import load_jsonl
from model import (ScoreModel, check_compatible, dedupe_tied, params_on_meta, read_checkpoint, verify_checksum,
                   write_checkpoint)
from model import load_weights as model_weights_into

# -----------------------------------------------------------------------------
# distributed


def under_torchrun():
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def dist_init(timeout_s=1800):
    """-> (rank, world_size, device). Same call in every script, with or without torchrun."""
    if under_torchrun():
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        if torch.cuda.is_available():
            local = int(os.environ.get("LOCAL_RANK", 0))
            torch.cuda.set_device(local)
            device = torch.device("cuda", local)
            backend = "nccl"
        else:
            device, backend = torch.device("cpu"), "gloo"
        if not dist.is_initialized():
            dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    else:
        rank, world, device = 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        # cuDNN's fused attention backward returns NaN gradients on Hopper for some shapes
        # (pytorch/pytorch#196678: with an attention mask, since torch 2.11). Seen here on an H200
        # (torch 2.11, 2026-11-30): reward_ft.py's bf16 LoRA step on a tiny FLUX pipeline stopped on
        # a NaN gradient, which anomaly mode traced to ScaledDotProductCudnnAttentionBackward0; the
        # same step ran in fp32 and with only the math backend. Flash and memory-efficient attention
        # take over (that combination itself has not run on a GPU yet).
        torch.backends.cuda.enable_cudnn_sdp(False)
    return rank, world, device


def dist_cleanup():
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def exit_worker():
    """The last line of every script: a torchrun worker leaves without the interpreter's teardown.

    destroy_process_group() does not stop the backend's threads: FSDP2's DTensor caches still hold
    the process group, so its gloo / NCCL threads live on into interpreter finalization, where a
    thread that needs the GIL is ended with pthread_exit and the process aborts if that unwinds
    through C++ ("terminate called without an active exception", SIGABRT, after every file and line of
    output was written). Every file is closed by now, so flush and exit. One process (no torchrun): a
    normal exit."""
    if under_torchrun():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def is_main():
    return not dist.is_initialized() or dist.get_rank() == 0


def print0(*args, **kwargs):
    if is_main():
        print(*args, **kwargs, flush=True)


def all_mean(values):
    """Average a dict of floats over ranks (one all-reduce)."""
    if not dist.is_initialized():
        return dict(values)
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    return {k: v / dist.get_world_size() for k, v in zip(keys, t.tolist())}


def all_sum(x):
    """Sum a float over ranks (the global token / sample count that normalizes a loss)."""
    if not dist.is_initialized():
        return float(x)
    t = torch.tensor([float(x)], dtype=torch.float64, device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t)
    return float(t.item())


def seed_all(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class Batches:
    """An endless, seeded, rank-sharded stream of mini-batches over a list of items.

    Each epoch is a fresh permutation of all items (the same on every rank), split into global
    batches of `global_batch`; rank r takes its slice. `state()` / `load_state()` make the
    position part of a checkpoint, so a resumed run sees exactly the batches it would have seen.
    """

    def __init__(self, items, global_batch, rank=0, world=1, seed=0):
        if global_batch % world:
            raise ValueError(f"global batch {global_batch} is not divisible by the world size {world}")
        if len(items) < global_batch:
            raise ValueError(f"{len(items)} items cannot fill one global batch of {global_batch}")
        self.items, self.global_batch, self.rank, self.world, self.seed = items, global_batch, rank, world, seed
        self.epoch, self.pos = 0, 0

    def _order(self):
        return np.random.RandomState(self.seed + self.epoch).permutation(len(self.items))

    def next(self):
        if self.pos + self.global_batch > len(self.items):
            self.epoch, self.pos = self.epoch + 1, 0
        order = self._order()[self.pos:self.pos + self.global_batch]
        self.pos += self.global_batch
        per = self.global_batch // self.world
        return [self.items[i] for i in order[self.rank * per:(self.rank + 1) * per]]

    def state(self):
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state(self, s):
        self.epoch, self.pos = s["epoch"], s["pos"]


# -----------------------------------------------------------------------------
# wrapping: DDP by default, FSDP2 behind --fsdp


def wrap(model, device, fsdp=False, bf16=False, checkpointing=False):
    """Wrap a ScoreModel for training; returns the module to call (forward goes through the wrapper).

    FSDP2: each decoder layer and each vision block is its own unit, then the root; the root keeps
    the (tied) embedding / LM head. DDP: find_unused_parameters, because a batch can leave a
    module unused; checkpointing is then non-reentrant.

    Mixed precision (--bf16): the parameters, their gradients and AdamW's state stay fp32 (master
    weights) and only the compute is bf16. bf16 keeps 8 significant bits, so an update of lr 1e-6
    to a weight of 0.1 (one bf16 step there is ~4e-4) rounds away: AdamW on bf16 weights barely
    moves the model at the recipes' learning rates. FSDP2 gathers each unit's parameters in bf16
    and reduces gradients in fp32 (MixedPrecisionPolicy); DDP and one process run the VLM body
    under autocast. The score head and the token log-probs run in fp32 either way.
    """
    if checkpointing:
        # transformers recomputes only in train mode (the scripts call train() before every update)
        enable = getattr(model.vlm, "activation_checkpointing_enable", None)  # transformers >= 5.24
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.vlm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if fsdp and dist.is_initialized():
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mesh = init_device_mesh(device.type, (dist.get_world_size(),))
        mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16
              else MixedPrecisionPolicy())
        # one unit at a time: cast to fp32 on the host, then fully_shard moves it to the device and
        # keeps this rank's shard, so the device never holds more than one whole unit
        for block in _units(model):
            fully_shard(block.float(), mesh=mesh, mp_policy=mp)
        _cast_unsharded(model, torch.float32)  # the root's own parameters (embeddings, LM head)
        fully_shard(model, mesh=mesh, mp_policy=mp)
        if getattr(model, "weight_files", None):  # built on meta (load_model(meta=True)): fill the shards
            fill_from_files(model, model.weight_files, device)
        return model.train()
    model.float().to(device)  # fp32 master weights, whatever dtype the checkpoint was stored in
    if bf16:
        autocast_body(model, device)
    if not dist.is_initialized():
        return model.train()
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(model.train(), device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=True)


def autocast_body(model, device):
    """Run the VLM body (vision tower + decoder) under bf16 autocast, the head outside it.

    The body's forward is replaced by itself under torch.autocast, so every call (training,
    generate, the checkpointed recompute) computes in bf16 while the parameters stay fp32; the
    hidden states come back fp32, so the score head and the fused log-prob stay full precision."""
    body = model.vlm.model
    run = torch.autocast(device.type, dtype=torch.bfloat16)(type(body).forward.__get__(body))

    def forward(*args, **kwargs):
        out = run(*args, **kwargs)
        out.last_hidden_state = out.last_hidden_state.float()
        return out

    body.forward = forward
    return model


@contextmanager
def grad_sync(model, sync):
    """Gradient accumulation under DDP: all-reduce only when `sync` (a step's last micro-batch);
    before it each rank accumulates its local gradient (no_sync), so a step all-reduces once.

    FSDP2 reduce-scatters every micro-batch on purpose: skipping it
    (set_requires_gradient_sync(False)) keeps each unit's whole unsharded gradient, accumulated
    in the fp32 reduce dtype, until the last micro-batch: a full fp32 gradient per rank (~100 GB
    for the 27B, memory_plan.py), against one shard of it. The reduce-scatter is one of three
    collectives per unit and micro-batch (two all-gathers of the parameters are the others)."""
    if sync or not dist.is_initialized() or not hasattr(model, "no_sync"):
        yield
    else:
        with model.no_sync():
            yield


@contextmanager
def seeded(device, *key):
    """Run a block with the torch RNG seeded from `key` (ints), then put the stream back: a rollout
    seeded by (seed, step, global micro-batch index) samples the same traces on any number of ranks."""
    state = np.random.SeedSequence([int(k) for k in key]).generate_state(2)
    devices = []  # the CUDA generators fork_rng saves and restores: this device's, on a GPU
    if device.type == "cuda":
        devices = [device.index if device.index is not None else torch.cuda.current_device()]
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(int(state[0]) << 32 | int(state[1]))
        yield


def wrap_frozen(model, device, fsdp=False, bf16=False):
    """A frozen model placed like the policy (pi_ref, a teacher): sharded under FSDP2, else replicated.
    Frozen, it may keep bf16 weights; sharded one unit at a time, as wrap does."""
    model.requires_grad_(False).eval()
    if bf16:
        model.to(torch.bfloat16)
    if fsdp and dist.is_initialized():
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(device.type, (dist.get_world_size(),))
        for block in _units(model):
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        if getattr(model, "weight_files", None):  # built on meta (load_model(meta=True)): fill the shards
            fill_from_files(model, model.weight_files, device)
        return model  # fully_shard moved each unit to the device
    return model.to(device)


def _cast_unsharded(model, dtype):
    """Cast the floating parameters and buffers that no FSDP2 unit has taken yet, one at a time."""
    for t in [*model.parameters(), *model.buffers()]:
        if type(t).__name__ != "DTensor" and t.is_floating_point() and t.dtype != dtype:
            t.data = t.data.to(dtype)


@torch.no_grad()
def copy_params(dst, src):
    """dst <- src, parameter by parameter (both placed alike: local shards copy under FSDP2)."""
    for pd, ps in zip(unwrap(dst).parameters(), unwrap(src).parameters()):
        pd.copy_(ps.detach())


def _units(model):
    """Decoder layers and vision blocks: the FSDP2 sharding units."""
    units = []
    for name, module in model.vlm.named_modules():
        if isinstance(module, torch.nn.ModuleList) and (name.endswith("layers") or name.endswith("blocks")):
            units.extend(module)
    return units


def unwrap(model):
    return model.module if hasattr(model, "module") and not hasattr(model, "vlm") else model


def full_state_dict(model):
    """The full model state dict on CPU; every rank must call it (FSDP2 gathers), rank 0 uses it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    inner = unwrap(model)
    if dist.is_initialized() and any(type(p).__name__ == "DTensor" for p in inner.parameters()):
        sd = get_model_state_dict(inner, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        sd = {k.removeprefix("vlm."): v for k, v in sd.items() if k.startswith("vlm.")}
    else:
        sd = {k: v.detach().cpu() for k, v in inner.vlm.state_dict().items()}
    if inner.vlm.get_output_embeddings().weight is inner.vlm.get_input_embeddings().weight:
        sd = {k: v for k, v in sd.items() if not k.endswith("lm_head.weight")}  # tied: rebuilt on load
    return sd


def load_model(spec, seed=0, dtype=None, meta=False):
    """--model: 'tiny' (the embedded default), a score-model .safetensors, or an HF folder / hub id.

    meta=True (for FSDP2): the parameters stay on the meta device, shapes only, and
    `model.weight_files` names the safetensors files that hold them; wrap / wrap_frozen shard the
    model, then fill each rank's shard from those files (fill_from_files). No rank ever holds the
    whole model in host memory: 8 ranks x a 27B model would be ~440 GB of host memory in bf16.
    """
    if spec == "tiny":
        return tiny_world.tiny_score_model(seed=seed)
    local = check_model_spec(spec)
    try:
        if meta:
            return build_on_meta(spec)
        if str(spec).endswith(".safetensors") or os.path.isfile(spec):  # a file is never a hub id
            return ScoreModel.load(spec, dtype=dtype)
        return ScoreModel.from_pretrained(spec, dtype=dtype)
    except ValueError as e:  # the file is not what it should be (model.read_checkpoint / check_compatible)
        fail(str(e))
    except OSError as e:
        if local:
            raise
        fail(f"{spec}: not a local folder or file, and not a hub model that could be fetched ({e})")


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")
IMAGE_PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")  # image_processor.save_pretrained


def check_model_spec(spec):
    """Refuse, naming the problem, a model that cannot load: a missing path, a folder without a
    config or tokenizer files, an unreadable (e.g. truncated) .safetensors. -> whether it is local."""
    spec = str(spec)
    if spec.endswith(".safetensors") or os.path.isfile(spec):
        if not os.path.isfile(spec):
            fail(f"{spec}: no such file")
        check_safetensors(spec)
        return True
    if os.path.isdir(spec):
        files = os.listdir(spec)
        if "config.json" not in files:
            fail(f"{spec}: no config.json; a model folder is what save_pretrained writes (config, weights, tokenizer, "
                 f"image processor)")
        if not any(f in files for f in TOKENIZER_FILES):
            fail(f"{spec}: no tokenizer files (one of {', '.join(TOKENIZER_FILES)}); save them into the folder "
                 f"with tokenizer.save_pretrained")
        if not any(f in files for f in IMAGE_PROCESSOR_FILES):
            fail(f"{spec}: no image-processor settings ({' or '.join(IMAGE_PROCESSOR_FILES)}); save them into the "
                 f"folder with image_processor.save_pretrained (or processor.save_pretrained)")
        for f in sorted(files):
            if f.endswith(".safetensors"):
                check_safetensors(os.path.join(spec, f))
        return True
    # a hub id is NAME or OWNER/NAME; anything else that does not exist is a missing path
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1 or os.sep != "/" and os.sep in spec:
        fail(f"{spec}: no such folder or file")
    return False


def check_safetensors(path):
    """Read the header of a .safetensors file: a truncated or foreign file is named here."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt"):
            pass
    except Exception as e:  # safetensors raises its own error type (SafetensorError) for a bad file
        fail(f"{path}: not a readable .safetensors file (truncated or corrupt?): {e}")


def sharded(fsdp):
    """Whether the scripts shard with FSDP2 (--fsdp under torchrun): then models load on meta."""
    return bool(fsdp) and dist.is_initialized()


GENERATOR_KEYS = ("format", "kind", "config", "base_fingerprint", "lora_rank")  # what a generator file must share


def check_resume(args, model, source):
    """--resume: refuse, in one line and before any weight is read, an --out that this run's model
    cannot continue from: a model of another architecture or config than the one built from `source`
    (the flag that named it, e.g. "--init X"), or a file whose tensors no longer match their checksum.
    Either would otherwise stop load_resume halfway, in a traceback. A missing --out is load_resume's
    to name. The checksum is read tensor by tensor, and not at all for a model on the meta device
    (FSDP2: each rank reads only its slices)."""
    if not getattr(args, "resume", False) or not os.path.isfile(args.out):
        return
    from safetensors import safe_open

    check_safetensors(args.out)
    inner = unwrap(model)
    with safe_open(args.out, framework="pt") as f:
        meta = f.metadata() or {}
    try:
        if hasattr(inner, "vlm"):
            check_compatible(meta, args.out, like=inner, like_name=source)
        else:  # a generator (reward_ft.py): its kind and config, or its LoRA's base and rank
            ours = inner.metadata()
            diff = [k for k in GENERATOR_KEYS if k in ours and meta.get(k) != ours[k]]
            if diff:
                k = diff[0]
                raise ValueError(f"{args.out} holds another generator than the one built from {source} (differs in "
                                 f"{diff}; {k} {str(meta.get(k))[:80]!r} in the file, {str(ours[k])[:80]!r} here)")
    except ValueError as e:
        fail(f"cannot resume: {e}; resume with the flags the run started with, or start over without --resume")
    if not any(p.device.type == "meta" for p in inner.parameters()):
        try:
            verify_checksum(args.out)
        except ValueError as e:
            fail(f"cannot resume: {e}")


# -----------------------------------------------------------------------------
# loading at scale: build on the meta device, shard, then fill each rank's shard from the files


def build_on_meta(spec):
    """A ScoreModel whose parameters are on the meta device (buffers, tokenizer and image processor
    real), from a score-model .safetensors (its metadata only) or an HF folder / hub id (its config)."""
    if str(spec).endswith(".safetensors") or os.path.isfile(spec):
        from safetensors import safe_open

        with safe_open(spec, framework="pt") as f:
            meta = f.metadata() or {}
        check_compatible(meta, spec)
        model = ScoreModel.from_metadata(meta)
        model.weight_files = [str(spec)]
        return model
    from transformers import AutoConfig, AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer

    folder = spec
    if not os.path.isdir(spec):  # a hub id: the config, processor files and weight shards, cached locally
        from huggingface_hub import snapshot_download

        folder = snapshot_download(spec, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja"])
    with params_on_meta():
        vlm = AutoModelForImageTextToText.from_config(AutoConfig.from_pretrained(folder))
    model = ScoreModel(vlm.eval(), AutoTokenizer.from_pretrained(folder),
                       AutoImageProcessor.from_pretrained(folder, backend="pil"), source=str(spec))
    model.weight_files = sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".safetensors"))
    return model


@torch.no_grad()
def fill_from_files(model, files, device, path=None):
    """Give every parameter of the VLM its values from safetensors `files`, reading only this rank's
    part: a DTensor shard reads its own rows of the file's tensor (safetensors slices come lazily
    from the memory map), a plain parameter the whole tensor. Parameters still on the meta device
    are allocated on `device` first (to_empty; the real buffers, e.g. rotary tables, are kept)."""
    from safetensors import safe_open
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    inner = unwrap(model)
    if any(p.device.type == "meta" for p in inner.parameters()):
        buffers = {n: b.detach().clone() for n, b in inner.named_buffers()}
        inner.to_empty(device=device)
        for n, b in inner.named_buffers():
            b.copy_(buffers[n])
    handles = [safe_open(f, framework="pt") for f in files]
    where = {k: h for h in handles for k in h.keys()}
    params = dict(inner.vlm.named_parameters())  # a tied LM head appears once, as the embedding
    missing = [n for n in params if n not in where]
    unexpected = [k for k in where
                  if k not in params and not k.endswith("lm_head.weight") and not k.startswith("mtp.")]
    if missing or unexpected:
        raise ValueError(f"{path or files[0]}: weights do not fit this model "
                         f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
    for name, p in params.items():
        if type(p).__name__ == "DTensor":
            shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
            local = p.to_local()
            if local.numel():
                local.copy_(where[name].get_slice(name)[tuple(slice(o, o + n) for o, n in zip(offset, shape))])
        else:
            p.copy_(where[name].get_tensor(name))


@contextmanager
def rollout_mode(model):
    """Full parameters on every rank for generation, no collectives inside (FSDP2: unshard all units
    and keep them unsharded across forwards; DDP / one process: nothing to do); eval mode."""
    inner = unwrap(model)
    fsdp_units = [m for m in inner.modules() if type(m).__name__.startswith("FSDP")]
    if fsdp_units:
        # generate() enters through the VLM, not through the root's forward: make the root claim
        # every unit first, or the first unit to run would make itself a root
        fsdp_units[0]._get_fsdp_state()._lazy_init()
    for m in fsdp_units:
        m.set_reshard_after_forward(False, recurse=False)
        m.unshard()
    was_training = inner.training
    inner.eval()
    try:
        yield inner
    finally:
        inner.train(was_training)
        for m in fsdp_units:
            m.reshard()
            m.set_reshard_after_forward(True, recurse=False)


# -----------------------------------------------------------------------------
# the flags every training script shares: defined here once, each script gives its defaults
#
# every value is checked by its argparse type as the command line is read, before any data or model
# loads: a count of 0 or -32 would otherwise reach the batch split ("a multiple of 1 x 1"), an lr of
# nan AdamW's constructor (a traceback) and an --out in a folder nobody can write the first save,
# after a step has trained


ROOT = os.path.dirname(os.path.abspath(__file__))  # the repository


def asset(name):
    """A shipped file of assets/ (a default --init, --student), found from the repository whatever the
    current folder: a relative default exists only when a script runs from the repository."""
    return os.path.join(ROOT, "assets", name)


def _number(text, kind):
    try:
        x = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {'a whole number' if kind is int else 'a number'}, "
                                         f"got {text!r}") from None
    if kind is float and not math.isfinite(x):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return x


def int_at_least(low, why=""):
    """An argparse type: a whole number >= low, e.g. int_at_least(2, "...") for gdso.py's --group."""
    def parse(text):
        n = _number(text, int)
        if n < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {n}" + (f" ({why})" if why else ""))
        return n
    parse.__name__ = f"int_at_least_{low}"
    return parse


positive_int = int_at_least(1)  # a count: steps, a batch, a group, traces
nonnegative_int = int_at_least(0)  # where 0 means off or all: --eval-every, --limit, --warmup; seeds


def positive_float(text):
    """An argparse type: a finite number above 0 (a learning rate, a clip norm)."""
    x = _number(text, float)
    if x <= 0:
        raise argparse.ArgumentTypeError(f"must be above 0, got {text}")
    return x


def nonnegative_float(text):
    """An argparse type: a finite number >= 0 (a weight, a temperature where 0 is greedy)."""
    x = _number(text, float)
    if x < 0:
        raise argparse.ArgumentTypeError(f"must be at least 0, got {text}")
    return x


def fraction(text):
    """An argparse type: a number in [0, 1]."""
    x = _number(text, float)
    if not 0 <= x <= 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {text}")
    return x


def writable_file(text):
    """An argparse type: a file path whose folder can be written (the nearest folder that exists, as
    the missing ones are made on write). Probed with an unnamed temporary file, which root's
    permissions and a read-only mount answer truthfully; nothing is left behind. '' (not given) passes."""
    if not text:
        return text
    path = os.path.abspath(os.path.expanduser(text))
    if os.path.isdir(path):
        raise argparse.ArgumentTypeError(f"{text} is a folder; give a file path")
    folder = os.path.dirname(path)
    while not os.path.exists(folder):
        folder = os.path.dirname(folder)
    if not os.path.isdir(folder):
        raise argparse.ArgumentTypeError(f"{text}: {folder} is a file, not a folder")
    try:
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as e:
        raise argparse.ArgumentTypeError(f"{text}: cannot write into {folder} ({e.strerror})") from None
    return text


def checkpoint_path(text):
    """An argparse type: --out, NAME.safetensors in a folder that can be written. The suffix is what
    the run's other files replace (NAME.train.pt, NAME.eval.json), and what --model / --init read as a
    score-model file rather than a Hugging Face folder or hub id."""
    if not text.endswith(".safetensors"):
        raise argparse.ArgumentTypeError(f"{text!r} must end in .safetensors (NAME.train.pt and the run's other "
                                         f"files go beside it)")
    return writable_file(text)


def device_flag(text):
    """An argparse type: a torch device that this machine has (cuda without a visible GPU is refused)."""
    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a torch device (cpu, cuda, cuda:N, mps)") from None
    if device.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if not n:
            raise argparse.ArgumentTypeError(f"{text}: torch sees no CUDA GPU on this machine; use --device cpu")
        if device.index is not None and device.index >= n:
            raise argparse.ArgumentTypeError(f"{text}: this machine has {n} CUDA GPU(s), cuda:0 to cuda:{n - 1}")
    elif device.type != "cpu":
        backend = getattr(torch.backends, device.type, None) or getattr(torch, device.type, None)
        if backend is None or not getattr(backend, "is_available", lambda: False)():
            raise argparse.ArgumentTypeError(f"{text}: torch has no {device.type} device here; use --device cpu")
    return text


RUN_FLAGS = {  # flag: (type, help); "flag" is a store_true switch
    "--data": (str, "a folder of JSONL records (README, Data), or world:n=200,seed=0 to render the synthetic world"),
    "--out": (checkpoint_path, "checkpoint path (.safetensors; .train.pt beside it)"),
    "--steps": (positive_int, "optimizer steps"),
    "--batch-size": (positive_int, "global batch per optimizer step"),
    "--micro-batch": (positive_int, "per forward per rank (gradient accumulation fills the rest of --batch-size)"),
    "--lr": (positive_float, "peak learning rate"),
    "--weight-decay": (nonnegative_float, "AdamW weight decay"),
    "--warmup": (nonnegative_int, "linear warmup steps, then cosine to 0.1x"),
    "--clip": (positive_float, "gradient-norm clip"),
    "--eval-every": (nonnegative_int, "evaluate every N steps (0 = only at the end)"),
    "--eval-limit": (nonnegative_int, "test records per evaluation (0 = all)"),
    "--save-every": (positive_int, "write the checkpoint every N steps"),
    "--resume": ("flag", "continue from --out (+ .train.pt) exactly: optimizer, step, RNG, data position"),
    "--stop-after": (nonnegative_int,
                     "stop (after saving) at this step, keeping the --steps schedule; --resume continues"),
    "--seed": (nonnegative_int, "seed for init, data order and sampling"),
    "--bf16": ("flag", "bfloat16 compute on fp32 master weights and optimizer state"),
    "--fsdp": ("flag", "shard with FSDP2 (fully_shard) instead of DDP replication"),
    "--checkpointing": ("flag", "activation checkpointing"),
}


def add_run_flags(p, defaults, notes=None, types=None):
    """Add RUN_FLAGS' flags named in `defaults` ({flag: default}; switches take False) to the parser p,
    with a script's own note after the shared help where it has one, and its own type where `types`
    gives one (reward_ft.py: --steps 0 only evaluates)."""
    notes, types = notes or {}, types or {}
    for flag, default in defaults.items():
        kind, text = RUN_FLAGS[flag]
        text = f"{text} ({notes[flag]})" if flag in notes else text
        if kind == "flag":
            p.add_argument(flag, action="store_true", help=text)
        else:
            p.add_argument(flag, type=types.get(flag, kind), default=default, help=text)


# -----------------------------------------------------------------------------
# user errors and the data contract (README "Data")


def fail(msg):
    """A user error (a flag, a file, a record): one line on stderr that names it, exit status 2, no
    traceback. A traceback is kept for bugs."""
    if is_main():
        print(f"error: {msg}", file=sys.stderr, flush=True)
    raise SystemExit(2)


WORLD_HINT = ("to use the synthetic world, render it first (python tiny_world.py render --out FOLDER) "
              "or pass --data world:n=200,seed=0")


def data_folder(spec):
    """--data: a folder of JSONL files, or 'world:n=N,seed=S[,dir=FOLDER]', which renders the
    synthetic world (default dir runs/world-nN-seedS; reused when that folder already holds the same
    world). Nothing is rendered otherwise: a missing folder or file is an error."""
    if spec == "world" or spec.startswith("world:"):  # the tiny world, rendered on request
        try:
            folder = tiny_world.render_on_request(spec, write=is_main(), log=print0)
        except ValueError as e:
            fail(str(e))
        if dist.is_initialized():
            dist.barrier()  # rank 0 renders, the others wait for its files
        return folder
    if os.path.isfile(spec):
        fail(f"--data {spec}: a file; --data takes the folder that holds it (README, Data)")
    if not os.path.isdir(spec):
        fail(f"--data {spec}: no such folder ({WORLD_HINT})")
    return spec


def data_files(spec, *names):
    """The paths of `names` (e.g. train.jsonl, test.jsonl) in the --data folder; a missing one is an
    error that names it and what the script expects."""
    folder = data_folder(spec)
    paths = [os.path.join(folder, n) for n in names]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        fail(f"--data {spec}: {' and '.join(missing)} not found; this script reads {' and '.join(names)} "
             f"from the folder (README, Data; {WORLD_HINT})")
    return paths


def load_records(path, labeled=True):
    """data.load_jsonl, with a bad record (named by file and line) or an empty file as a user error."""
    import warnings

    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            records = load_jsonl(path, labeled=labeled)
    except (ValueError, OSError) as e:
        fail(str(e))
    for w in caught:  # e.g. a score that disagrees with its annotations: once, on rank 0
        print0(f"warning: {w.message}")
    if not records:
        fail(f"{path} holds no records")
    return records


def warn_overlap(train, test, train_file, test_file):
    """Warn, on rank 0, when test records share an id or an image file with the training records: the
    test split is then not held out and its metrics read high. A warning, not an error: a set can
    rate one image on several dimensions across splits on purpose. -> (shared ids, shared images)."""
    ids = {r["id"] for r in train}
    images = {os.path.realpath(r["image_path"]) for r in train}
    same_id = [r for r in test if r["id"] in ids]
    same_image = [r for r in test if os.path.realpath(r["image_path"]) in images]
    if same_id or same_image:
        first = (same_id or same_image)[0]
        print0(f"warning: of the {len(test)} records of {test_file}, {len(same_id)} share an id and {len(same_image)} "
               f"an image file with {train_file} (first: id {first['id']!r}, image {first['image']}): the test split "
               f"is not held out, and its metrics read high")
    return len(same_id), len(same_image)


def check_batch(n, batch, flag, what, world=1):
    """A data set smaller than one global batch: say which flag to lower, before any model loads."""
    if n < batch:
        most = n - n % world
        fail(f"{flag} {batch} is more than the {n} {what} the training data holds: lower {flag} to at most {most}"
             + (f" (a multiple of the {world} ranks)" if world > 1 else ""))


def split_batch(batch, micro, world, flag="--batch-size", micro_flag="--micro-batch"):
    """(per-rank micro-batch, accumulation steps) of a global batch: each rank takes batch / world
    samples in forwards of `micro` (capped at the rank's share). Every script splits its batch here,
    so a batch that does not divide gets the same message everywhere."""
    micro = min(micro, batch // world)
    if micro < 1 or batch % (micro * world):
        fail(f"{flag} {batch} must be a multiple of {micro_flag} x ranks = {max(micro, 1)} x {world}")
    return micro, batch // (micro * world)


def open_images(records):
    """The RGB images of records (their resolved `image_path`), in order."""
    from PIL import Image

    return [Image.open(r["image_path"]).convert("RGB") for r in records]


def check_finite_step(step, grad_norm, loss=None):
    """Stop on a non-finite gradient norm (the global one: a NaN on any rank reaches every rank's
    norm), before the optimizer applies it; the checkpoint on disk is the last finite one."""
    if not math.isfinite(float(grad_norm)):
        raise SystemExit(f"error: step {step + 1}: the gradient norm is {float(grad_norm)}"
                         + (f" (loss {float(loss)})" if loss is not None else "")
                         + "; stopping before the update (the last checkpoint written is untouched)")


def context_length(model):
    cfg = model.vlm.config
    return getattr(getattr(cfg, "text_config", cfg), "max_position_embeddings", None)


def check_context(model, records, mode, answer=1, flag="--data"):
    """Stop before a record whose prompt (the rubric, the prompt text, its image's tokens) plus
    `answer` tokens does not fit the model's positions; names the record. A prompt is tokenized once
    per (prompt, dimension); images are measured only when the text comes close to the limit."""
    from PIL import Image

    limit = context_length(model)
    if not limit:
        return
    ip = model.image_processor
    unit = (getattr(ip, "patch_size", 14) * getattr(ip, "merge_size", 2)) ** 2
    size = getattr(ip, "size", None)
    most_pixels = (size.get("longest_edge") if isinstance(size, dict) else getattr(size, "longest_edge", None)) or 0
    text, grids = {}, {}
    for r in records:
        key = (r["prompt"], r["dimension"])
        if key not in text:
            text[key] = len(model.tokenizer.encode(model.prompt_text(*key, mode), add_special_tokens=False))
        n = text[key] + answer
        if n + most_pixels // unit <= limit:
            continue  # fits whatever the image
        with Image.open(r["image_path"]) as im:
            wh = im.size
        if wh not in grids:
            grids[wh] = int(model.pixels([Image.new("RGB", wh)])[1][0].prod()) // ip.merge_size ** 2
        n += grids[wh] - 1  # the placeholder counted in the text is one of the image's tokens
        if n > limit:
            fail(f"{flag}: record {r['id']!r} needs {n} positions (rubric, prompt, image, {answer} answer "
                 f"tokens), more than the model's {limit}: shorten its prompt ({len(r['prompt'])} characters)")


# -----------------------------------------------------------------------------
# optimizer and schedule


def build_optimizer(model, lr, weight_decay=0.01, betas=(0.9, 0.98), vision_lr_mult=1.0):
    """AdamW; no decay on norms / biases; the vision tower may get a larger lr (tiny world: 5x)."""
    groups = {}
    for name, p in unwrap(model).named_parameters():
        if not p.requires_grad:
            continue
        vision = ".visual." in name or name.startswith("vlm.model.visual")
        decay = p.ndim >= 2
        key = (vision, decay)
        groups.setdefault(key, []).append(p)
    param_groups = [{"params": ps, "lr": lr * (vision_lr_mult if v else 1.0), "lr_mult": vision_lr_mult if v else 1.0,
                     "weight_decay": weight_decay if d else 0.0} for (v, d), ps in sorted(groups.items())]
    fused = torch.cuda.is_available() and all(p.is_cuda for g in param_groups for p in g["params"])
    return torch.optim.AdamW(param_groups, lr=lr, betas=betas, fused=fused or None)


def lr_at(step, total, lr, warmup=30, final_frac=0.1):
    """Linear warmup, then cosine from lr to final_frac * lr at step `total`."""
    if step < warmup:
        return lr * (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return lr * (final_frac + (1 - final_frac) * 0.5 * (1 + math.cos(math.pi * t)))


def set_lr(optimizer, lr):
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("lr_mult", 1.0)


# -----------------------------------------------------------------------------
# checkpoints


def rng_state():
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(s):
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    torch.set_rng_state(s["torch"])
    if s.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def all_rng_states():
    """Every rank's RNG state, in rank order (collective): a resumed rank draws what it would have drawn."""
    if not dist.is_initialized():
        return [rng_state()]
    states = [None] * dist.get_world_size()
    dist.all_gather_object(states, rng_state())
    return states


def restore_rng_state(states, path):
    """This rank's RNG state from a .train.pt's list; refused unless the run had as many ranks."""
    if len(states) != (dist.get_world_size() if dist.is_initialized() else 1):
        raise ValueError(f"{path} was written by a run with {len(states)} ranks; resume with the same world size")
    set_rng_state(states[dist.get_rank() if dist.is_initialized() else 0])


def save_checkpoint(path, model, optimizer=None, step=0, batches=None, args=None, **meta):
    """Write NAME.safetensors (weights + metadata) and, with an optimizer, NAME.train.pt (for --resume).

    `model` is a ScoreModel, bare or wrapped (DDP, FSDP2), or a module that gives its own weights and
    metadata, trainable_state() and metadata(**extra) (reward_ft.py's generators). Collective: every rank
    calls it (FSDP2 gathers the weights and the optimizer state, and each rank's RNG state goes into the
    train state); rank 0 writes each file atomically.
    """
    inner = unwrap(model)
    score_model = hasattr(inner, "vlm")
    state = full_state_dict(model) if score_model else None
    optim_state = full_optimizer_state(model, optimizer) if optimizer is not None else None
    rngs = all_rng_states()
    if is_main():
        extra = {"step": step, "args": vars(args) if args is not None else {}, **meta}
        if score_model:
            write_checkpoint(path, dedupe_tied({k: v.contiguous() for k, v in state.items()}),
                             inner.metadata_dict(**extra))
        else:
            write_checkpoint(path, inner.trainable_state(), inner.metadata(**extra))
        if optimizer is not None:
            train = {"step": step, "optimizer": optim_state, "rng": rngs, "args": vars(args) if args else {},
                     "batches": batches.state() if batches is not None else None, "meta": meta}
            tmp = f"{train_path(path)}.tmp-{os.getpid()}"
            torch.save(train, tmp)
            os.replace(tmp, train_path(path))
    if dist.is_initialized():
        dist.barrier()


def full_optimizer_state(model, optimizer):
    """The optimizer's state dict, whole (collective under FSDP2, which gathers it to the CPU)."""
    if _is_sharded(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(unwrap(model), optimizer,
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return optimizer.state_dict()


def resume_step(args, model, optimizer, batches, frozen=None):
    """The step a run starts at: 0, or with --resume the step of the checkpoint set at --out, whose
    weights, optimizer, RNG and data position are loaded (and a frozen model's, e.g. GDSO's pi_ref,
    from its file beside it, refused unless written at the same step)."""
    if not args.resume:
        return 0
    step, _ = load_resume(args.out, model, optimizer, batches)
    if frozen is not None:
        load_frozen(frozen, ref_path(args.out), step)
    print0(f"resumed {args.out} at step {step}")
    return step


def after_step(step, args):
    """What a training loop does once optimizer step `step` is done: (save, stop, evaluate). It saves
    every --save-every steps, at the last step and at --stop-after, where it stops before evaluating."""
    stop = step == args.stop_after
    save = step % args.save_every == 0 or step == args.steps or stop
    evaluate = not stop and bool((args.eval_every and step % args.eval_every == 0) or step == args.steps)
    return save, stop, evaluate


def ref_path(path):
    return str(path).removesuffix(".safetensors") + ".ref.safetensors"


def save_frozen(model, path, step):
    """A frozen model's weights (pi_ref) beside the checkpoint, so --resume restores it too; it
    records the step of the set it belongs to."""
    save_checkpoint(path, model, step=step)


def check_step(path, meta, step):
    """One file of a checkpoint set against the set's step (the .train.pt's): a kill between two
    writes leaves a torn set, e.g. NAME.safetensors at step 3 beside NAME.train.pt at step 2."""
    import json

    if "step" in meta and json.loads(meta["step"]) != step:
        fail(f"cannot resume: torn checkpoint set: {path} is at step {json.loads(meta['step'])}, "
             f"{train_path(path.replace('.ref.safetensors', '.safetensors'))} at step {step} (a save was cut short "
             f"between its files); resume from an intact set, or start over without --resume")


def load_weights(model, meta, path):
    """A checkpoint's weights into `model`: a ScoreModel (refused unless the file holds the same
    architecture and config; under FSDP2 each rank reads its own slices of the file) or a module that
    checks and loads its own, load_trainable_state(meta, tensors, path) (reward_ft.py's generators)."""
    inner = unwrap(model)
    if not hasattr(inner, "vlm"):
        inner.load_trainable_state(meta, read_checkpoint(path)[1], path)
        return
    check_compatible(meta, path, like=inner)
    if _is_sharded(model):  # each rank reads its own slices of the file
        fill_from_files(model, [path], None, path)
    else:
        model_weights_into(inner.vlm, read_checkpoint(path)[1], path, assign=False)


def _is_sharded(model):
    return dist.is_initialized() and any(type(p).__name__ == "DTensor" for p in unwrap(model).parameters())


def _checkpoint_meta(path):
    from safetensors import safe_open

    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    with safe_open(path, framework="pt") as f:
        return f.metadata() or {}


def load_frozen(model, path, step=None):
    """A frozen model's weights from a checkpoint; with `step`, refused unless the file is at it."""
    meta = _checkpoint_meta(path)
    if step is not None:
        check_step(str(path), meta, step)
    load_weights(model, meta, path)


def train_path(path):
    return str(path).removesuffix(".safetensors") + ".train.pt"


def load_resume(path, model, optimizer, batches=None):
    """Restore weights, optimizer, RNG and data position from a checkpoint pair; -> (step, meta).

    The weights come from the .safetensors (load_weights), the rest from the .train.pt beside it. Refused,
    before any weight is read, when the two files are at different steps; and when the run had another
    number of ranks.
    """
    if not os.path.exists(path):
        fail(f"cannot resume: {path} not found (--resume continues the run that writes --out)")
    if not os.path.exists(train_path(path)):
        fail(f"cannot resume: {train_path(path)} (optimizer / RNG state) is missing beside {path}")
    meta = _checkpoint_meta(path)
    train = torch.load(train_path(path), map_location="cpu", weights_only=False)
    check_step(str(path), meta, train["step"])
    load_weights(model, meta, path)
    if _is_sharded(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(unwrap(model), optimizer, train["optimizer"],
                                 options=StateDictOptions(full_state_dict=True))
    else:
        optimizer.load_state_dict(train["optimizer"])
    restore_rng_state(train["rng"], path)
    if batches is not None and train["batches"] is not None:
        batches.load_state(train["batches"])
    return train["step"], train.get("meta", {})


def write_json(ckpt_path, kind, obj):
    """NAME.KIND.json beside the checkpoint (rank 0, atomic): e.g. the latest eval table; an eval is
    also appended to NAME.curve.jsonl (eval.py curves plots them)."""
    import json

    if is_main():
        path = f"{str(ckpt_path).removesuffix('.safetensors')}.{kind}.json"
        with open(path + ".tmp", "w") as f:
            json.dump(obj, f, indent=1)
        os.replace(path + ".tmp", path)
        if kind == "eval":  # and every evaluation of the run, one line each: the learning curve
            with open(f"{str(ckpt_path).removesuffix('.safetensors')}.curve.jsonl", "a") as f:
                f.write(json.dumps(obj) + "\n")


def peak_memory(device):
    """' | peak X GiB' (the most GPU memory allocated so far) on a GPU, '' on CPU: for the step lines."""
    if device.type != "cuda":
        return ""
    return f" | peak {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB"


class Timer:
    """ms per step, measured from the last call."""

    def __init__(self):
        self.t = time.perf_counter()

    def lap(self):
        now = time.perf_counter()
        dt, self.t = now - self.t, now
        return dt * 1000
