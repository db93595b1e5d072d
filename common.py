"""
What every training script shares: distributed init, data sharding, metric averaging, DDP / FSDP2
wrapping, the optimizer and schedule, and checkpoints that a run resumes from exactly.

One process or many, the scripts run the same code: under torchrun (RANK / WORLD_SIZE set) this
initializes a process group (NCCL on GPUs, gloo on CPU); otherwise it runs single-process on
cuda or cpu. A checkpoint is a set of files in its own folder, NAME.ckpt/step-00000012/:
  model.safetensors  the score model alone, weights + metadata (model.py), for eval / the next stage
                     (reward_ft.py: the generator, or its LoRA); NAME.safetensors is a hard link to
                     the newest set's
  train.pt           optimizer, step, RNG states, data position and flags, for --resume
(gdso.py adds ref.safetensors, pi_ref). Rank 0 writes a set into a temp folder and renames it, so a
kill at any point leaves the last intact set; the last --keep sets are kept, and --resume continues
the newest intact one, refusing changed flags that would change the run (check_resume).
"""

import argparse
import datetime
import math
import os
import random
import re
import sys
import tempfile
import time
from contextlib import contextmanager

import numpy as np
import torch
import torch.distributed as dist

import tiny_world
from data import load_jsonl
from model import (ScoreModel, StreamedCheckpoint, check_compatible, dedupe_tied, params_on_meta, read_checkpoint,
                   verify_checksum, write_checkpoint)
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

    FSDP2: each decoder layer and each vision block is its own unit; so are the embeddings and the
    LM head when they are untied (Qwen3.5-9B / 27B; _head_units), each gathered only while it
    computes, not from the root's forward to the end of its backward (~10 GiB at 27B,
    memory_plan.py); then the root, which keeps a tied embedding / LM head and the final norm.
    DDP: find_unused_parameters, because a batch can leave a module unused; checkpointing is then
    non-reentrant.

    Mixed precision (--bf16): the parameters, their gradients and AdamW's state stay fp32 (master
    weights) and only the compute is bf16. bf16 keeps 8 significant bits, so an update of lr 1e-6
    to a weight of 0.1 (one bf16 step there is ~4e-4) rounds away: AdamW on bf16 weights barely
    moves the model at the recipes' learning rates. FSDP2 gathers each unit's parameters in bf16
    and reduces gradients in fp32 (MixedPrecisionPolicy); DDP and one process run the VLM body
    under autocast.

    The heads: the score head computes its K bin logits and their softmax in fp32 (model.score_logits
    casts its inputs), and the token log-probs accumulate in fp32 (zr_kernels/logprob.py). Their
    inputs differ: the hidden state is bf16-rounded either way (the body computes in bf16), and the
    LM head's rows are fp32 master weights under DDP / one process but bf16 as FSDP2 gathers them,
    whose gradient is then bf16 until FSDP2 reduces it in fp32, as every unit's is. Gathering the LM
    head in fp32 would double its bytes (5 GB at 27B) for an error no larger than the hidden state's
    own rounding: docs/REAL_SCALE.md, "Memory and precision", has the measurement.
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
        for block in _units(model) + _head_units(model):
            fully_shard(block.float(), mesh=mesh, mp_policy=mp)
        if _head_units(model):
            _register_head(model.vlm.get_output_embeddings())
        _cast_unsharded(model, torch.float32)  # the root's own parameters (final norm; a tied embedding)
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
    reshard(dst)
    reshard(src)
    for pd, ps in zip(unwrap(dst).parameters(), unwrap(src).parameters()):
        pd.copy_(ps.detach())


def reshard(model):
    """FSDP2: free every gathered unit of `model`, back to this rank's shards (else nothing to do).

    FSDP2 keeps the root's parameters (the final norm, a tied embedding / LM head; a frozen model's
    embeddings and LM head, which wrap_frozen leaves in the root) gathered from its forward to the
    end of the backward; a frozen model has no backward, so after its forward they would stay gathered,
    and its parameters() would be the gathered tensors, not the shards, until its next forward."""
    for m in unwrap(model).modules():
        if type(m).__name__.startswith("FSDP"):
            m.reshard()


def _units(model):
    """Decoder layers and vision blocks: the FSDP2 sharding units."""
    units = []
    for name, module in model.vlm.named_modules():
        if isinstance(module, torch.nn.ModuleList) and (name.endswith("layers") or name.endswith("blocks")):
            units.extend(module)
    return units


def _head_units(model):
    """The input embeddings and the LM head, as FSDP2 units of their own, when they are two tensors
    (an untied model); [] when tied: one tensor cannot be in two units, and the root keeps it."""
    embed, head = model.vlm.get_input_embeddings(), model.vlm.get_output_embeddings()
    if head is None or head.weight is embed.weight:
        return []
    return [embed, head]


def _apply_head(head, fn, *args):
    return fn(head.weight, getattr(head, "bias", None), *args)


def _register_head(head):
    """Give the sharded LM head a method, apply_head(fn, *args) = fn(weight, bias, *args), that FSDP2
    treats as a forward (register_fsdp_forward_method): the score head and the fused log-prob use the
    head's weight directly, not through its forward, and FSDP2 gathers a unit and reduces its
    gradient only around a forward it sees (ScoreModel.with_head calls it)."""
    import types

    from torch.distributed.fsdp import register_fsdp_forward_method

    head.apply_head = types.MethodType(_apply_head, head)
    register_fsdp_forward_method(head, "apply_head")


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


def check_resume_model(args, model, source):
    """--resume: refuse, in one line and before any weight is read, a checkpoint that this run's model
    cannot continue from: a model of another architecture or config than the one built from `source`
    (the flag that named it, e.g. "--init X"), or a file whose tensors no longer match their checksum.
    Either would otherwise stop load_resume halfway, in a traceback. The file is the one --resume
    continues (the newest intact set's weights, resume_source). The checksum is read tensor by
    tensor, and not at all for a model on the meta device (FSDP2: each rank reads only its slices)."""
    if not getattr(args, "resume", False):
        return
    from safetensors import safe_open

    path = resume_source(args.out)[0]
    check_safetensors(path)
    inner = unwrap(model)
    with safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
    try:
        if hasattr(inner, "vlm"):
            check_compatible(meta, path, like=inner, like_name=source)
        else:  # a generator (reward_ft.py): its kind and config, or its LoRA's base and rank
            ours = inner.metadata()
            diff = [k for k in GENERATOR_KEYS if k in ours and meta.get(k) != ours[k]]
            if diff:
                k = diff[0]
                raise ValueError(f"{path} holds another generator than the one built from {source} (differs in "
                                 f"{diff}; {k} {str(meta.get(k))[:80]!r} in the file, {str(ours[k])[:80]!r} here)")
    except ValueError as e:
        fail(f"cannot resume: {e}; resume with the flags the run started with, or start over without --resume")
    if not any(p.device.type == "meta" for p in inner.parameters()):
        try:
            verify_checksum(path)
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
    params = dict(inner.vlm.named_parameters())  # a tied LM head appears once, as the embedding
    rename = file_key_renamer(inner.vlm, params)
    where = {rename(k): (h, k) for h in handles for k in h.keys()}  # parameter name -> (file, key in it)
    missing = [n for n in params if n not in where]
    unexpected = [key for name, (_, key) in where.items()
                  if name not in params and not name.endswith("lm_head.weight") and not key.startswith("mtp.")]
    if missing or unexpected:
        raise ValueError(f"{path or files[0]}: weights do not fit this model "
                         f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
    for name, p in params.items():
        h, key = where[name]
        if type(p).__name__ == "DTensor":
            shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
            local = p.to_local()
            if local.numel():
                local.copy_(h.get_slice(key)[tuple(slice(o, o + n) for o, n in zip(offset, shape))])
        else:
            p.copy_(h.get_tensor(key))


def file_key_renamer(vlm, params):
    """A function from a weight file's key to the parameter name of `vlm` it loads into. transformers
    writes some families in a legacy layout (Qwen2.5-VL: `model.embed_tokens`, `visual.*`) that its
    own from_pretrained renames on load with the model's conversion mapping; sharded loading reads
    the raw keys, so it renames them the same way. A key that a conversion would merge or split
    (not a rename) is refused: no rank could read its slice of it from the file."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key
    except ImportError:  # a transformers without conversion mappings: file keys are parameter names
        return lambda key: key
    transforms = get_model_conversion_mapping(vlm)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]

    def rename(key):
        if key in params:
            return key
        name, converted_by = rename_source_key(key, renamings, converters, vlm.base_model_prefix, params)
        if converted_by is not None:
            raise ValueError(f"{key}: this checkpoint's layout needs a tensor conversion ({converted_by}) that "
                             "sharded loading cannot slice; load it once without --fsdp and save it again")
        return name

    return rename


@contextmanager
def rollout_mode(model, layerwise=False):
    """Eval mode for generation and scoring without gradients; FSDP2: parameters gathered for it.

    Fast path (default): every unit is unsharded once and kept so across the rollout's forwards,
    with no collectives inside: the whole model in bf16 on every rank (memory_plan.py's rollout
    column). DDP / one process: nothing to gather.

    layerwise=True (gdso.py --layerwise-rollout, FSDP2): only the root's own parameters (the final
    norm; a tied embedding / LM head) are gathered for the rollout; every other unit (decoder layers,
    vision blocks, untied embeddings and LM head) is gathered by its own forward hook and freed after
    it, so a rank holds about one unit at a time, at the price of an all-gather of the whole model
    per generated token. Every rank must then run the same forwards: the
    model's generate keeps finished ranks stepping (transformers' synced_gpus) until all are done,
    and callers give every rank the same number of batches. The same weights are gathered in the
    same precision either way, so the tokens are the fast path's."""
    inner = unwrap(model)
    fsdp_units = [m for m in inner.modules() if type(m).__name__.startswith("FSDP")]
    if fsdp_units:
        # generate() enters through the VLM, not through the root's forward: make the root claim
        # every unit first, or the first unit to run would make itself a root
        fsdp_units[0]._get_fsdp_state()._lazy_init()
    gathered = [inner] if layerwise and fsdp_units else fsdp_units  # the root: its forward never runs
    for m in gathered:
        m.set_reshard_after_forward(False, recurse=False)
        m.unshard()
    was_training, was_synced = inner.training, inner.synced
    inner.synced = bool(layerwise and fsdp_units and dist.get_world_size() > 1)
    inner.eval()
    try:
        yield inner
    finally:
        inner.train(was_training)
        inner.synced = was_synced
        for m in gathered:
            m.reshard()
            m.set_reshard_after_forward(True, recurse=False)


class Offload:
    """gdso.py --offload: tensors that a phase of the step does not use wait in host memory (pinned on a
    GPU machine) and come back, bit for bit, before the phase that uses them.

    Built with named groups, each a function giving its tensors now (AdamW's state exists only after
    the first update): offload.keep("ref") brings group "ref" to the device and sends every other
    group to the host; keep() sends them all. A tensor moves by its storage: the bytes are copied to
    the host and the device storage is resized to 0, then resized back and refilled, so every
    holder of the tensor (the optimizer's state dict, a module, FSDP2's sharded parameter, whose
    local tensor views its padded shard) sees the same tensor again. Disabled, keep() does nothing.
    """

    def __init__(self, device, enabled=True, **groups):
        self.device, self.enabled, self.groups = device, enabled, groups
        self.away = {}  # group -> [(storage, host copy)]

    def keep(self, *names):
        if not self.enabled:
            return
        unknown = set(names) - set(self.groups)
        assert not unknown, f"no offload group {sorted(unknown)}"
        for name in self.groups:
            if name in names:
                self._back(name)
            else:
                self._send(name)

    @torch.no_grad()
    def _storages(self, name):
        by_ptr = {}
        for t in self.groups[name]():
            local = getattr(t, "_local_tensor", t)  # a DTensor's shard on this rank
            if torch.is_tensor(local) and local.device == self.device and local.untyped_storage().nbytes():
                by_ptr.setdefault(local.untyped_storage().data_ptr(), []).append(local)
        storages = []
        for views in by_ptr.values():
            s = views[0].untyped_storage()
            if not s.resizable():  # e.g. weights loaded on the CPU from a file's memory: move them to one that is
                new = torch.UntypedStorage(s.nbytes(), device=s.device)
                _bytes_of(new).copy_(_bytes_of(s))
                for t in views:
                    t.set_(new, t.storage_offset(), t.size(), t.stride())
                s = new
            storages.append(s)
        return storages

    @torch.no_grad()
    def _send(self, name):
        if name in self.away:
            return
        parked = []
        for s in self._storages(name):
            host = torch.empty(s.nbytes(), dtype=torch.uint8, pin_memory=self.device.type == "cuda")
            host.copy_(_bytes_of(s))
            s.resize_(0)
            parked.append((s, host))
        self.away[name] = parked

    @torch.no_grad()
    def _back(self, name):
        for s, host in self.away.pop(name, []):
            s.resize_(host.numel())
            _bytes_of(s).copy_(host)

    def bytes_away(self):
        return sum(host.numel() for parked in self.away.values() for _, host in parked)


def _bytes_of(storage):
    """A flat uint8 tensor over all of an untyped storage."""
    return torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage)


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
    "--out": (checkpoint_path, "checkpoint path (.safetensors; its checkpoint sets go in NAME.ckpt/ beside it)"),
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
    "--resume": ("flag", "continue the newest intact checkpoint set of --out exactly: weights, optimizer, step, "
                         "RNG, data position"),
    "--stop-after": (nonnegative_int,
                     "stop (after saving) at this step, keeping the --steps schedule; --resume continues"),
    "--seed": (nonnegative_int, "seed for init, data order and sampling"),
    "--bf16": ("flag", "bfloat16 compute on fp32 master weights and optimizer state"),
    "--fsdp": ("flag", "shard with FSDP2 (fully_shard) instead of DDP replication"),
    "--checkpointing": ("flag", "activation checkpointing"),
    "--keep": (positive_int, "checkpoint sets kept in NAME.ckpt/ (at least 1; the newest is NAME.safetensors)"),
    "--resume-override": (str, "with --resume: continue although these flags changed (comma-separated, e.g. "
                               "lr,data); flags that change the run are refused otherwise"),
}


def add_run_flags(p, defaults, notes=None, types=None):
    """Add RUN_FLAGS' flags named in `defaults` ({flag: default}; switches take False) to the parser p,
    with a script's own note after the shared help where it has one, and its own type where `types`
    gives one (reward_ft.py: --steps 0 only evaluates). A script that resumes saves checkpoint sets,
    so it also gets --keep (how many) and --resume-override (what may change on --resume)."""
    notes, types = notes or {}, types or {}
    if "--resume" in defaults:
        defaults = dict(defaults)
        defaults.setdefault("--keep", 2)
        defaults.setdefault("--resume-override", "")
    for flag, default in defaults.items():
        kind, text = RUN_FLAGS[flag]
        text = f"{text} ({notes[flag]})" if flag in notes else text
        if kind == "flag":
            p.add_argument(flag, action="store_true", help=text)
        else:
            p.add_argument(flag, type=types.get(flag, kind), default=default, help=text)


def regex(text):
    """argparse type: a Python regular expression (--train-only)"""
    try:
        re.compile(text)
    except re.error as e:
        raise argparse.ArgumentTypeError(f"{text!r} is not a regular expression: {e}")
    return text


def add_freeze_flags(p, whose="the model"):
    """--freeze-vision and --train-only, for the scripts that train a score model (sft.py, tiny_base.py,
    risd.py, gdso.py); freeze() applies them."""
    p.add_argument("--freeze-vision", action=argparse.BooleanOptionalAction, default=True,
                   help=f"keep {whose}'s vision tower frozen (default)")
    p.add_argument("--train-only", type=regex, default="", metavar="REGEX",
                   help=f"train only {whose}'s parameters whose names match REGEX (re.search on the names of "
                        "model.named_parameters(), e.g. '^(?!.*(linear_attn|self_attn))' for everything but "
                        "attention); the rest stay as loaded (docs/LOG.md: on the tiny world's 2,560 training "
                        "records the one-token student keeps its alignment reading through SFT and RISD only with "
                        "its attention frozen)")


def freeze(model, args):
    """Apply --freeze-vision and --train-only to a bare ScoreModel before it is wrapped; a --train-only
    that leaves nothing to train is a user error that shows what the names look like."""
    if args.freeze_vision:
        model.vision_tower().requires_grad_(False)
    if not args.train_only:
        return
    pattern = re.compile(args.train_only)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    kept = [p for n, p in trainable if pattern.search(n)]
    if not kept:
        example = next((n for n, _ in trainable if ".mlp." in n), trainable[0][0] if trainable else "")
        fail(f"--train-only {args.train_only!r} matches none of the {len(trainable)} trainable parameters"
             + (" (--freeze-vision keeps the vision tower frozen)" if args.freeze_vision else "")
             + (f"; names look like {example}" if example else ""))
    for _, p in trainable:
        p.requires_grad_(False)
    for p in kept:
        p.requires_grad_(True)
    print0(f"--train-only {args.train_only}: {len(kept)} of {len(trainable)} tensors trainable "
           f"({sum(p.numel() for p in kept):,} parameters)")


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
#
# A training run saves checkpoint sets, each in its own folder beside --out, and never writes into one
# that is already there:
#   NAME.ckpt/step-00000012/   model.safetensors, train.pt (gdso.py: ref.safetensors, pi_ref), set.json
#   NAME.safetensors           a hard link to the newest set's model.safetensors: what eval.py and the
#                              next stage read (no second copy of the bytes)
# A save writes NAME.ckpt/step-00000012.tmp-PID/, renames it to step-00000012 (the commit: a kill
# before it leaves the earlier sets as they were), points NAME.safetensors at it (a link under a temp
# name, then a rename over the old one), then removes the sets beyond --keep (each renamed to .del-PID
# first). --resume continues the newest set whose files are all there and agree on its step; a run
# starts by removing the temp files and folders a killed save left at its --out.

SET_FORMAT = "zreward-checkpoint-set-1"
MANIFEST = "set.json"  # written last into a set: its step, commit number and files (with sizes)
FAULT_ENV = "ZR_FAULT_AFTER"
SHARDS = "shards"  # a sharded set's folder of torch.distributed.checkpoint files (save_sharded)
# every point of a save, in order, where tests/test_checkpoints.py kills the process (fault_point);
# 'shards' only under FSDP2, 'aside' only when a set of the same step is already there, 'ref' only
# with a frozen model outside FSDP2 (a sharded set keeps it in its shards)
SAVE_POINTS = ("folder", SHARDS, "model", "train", "ref", "manifest", "aside", "commit", "link", "pointer", "unlist",
               "prune", "legacy")


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
    """This rank's RNG state from a train.pt's list; refused unless the run had as many ranks."""
    if len(states) != (dist.get_world_size() if dist.is_initialized() else 1):
        raise ValueError(f"{path} was written by a run with {len(states)} ranks; resume with the same world size")
    set_rng_state(states[dist.get_rank() if dist.is_initialized() else 0])


def save_checkpoint(path, model, optimizer=None, step=0, batches=None, args=None, frozen=None, **meta):
    """With an optimizer: a checkpoint set for --resume (above): the weights + metadata, the train state
    (optimizer, step, every rank's RNG, data position, flags) and, given `frozen`, a frozen model's
    weights (gdso.py's pi_ref), which the set restores too. Without one: the weights alone, written
    atomically to the file `path` (an init, a base).

    `model` is a ScoreModel, bare or wrapped (DDP, FSDP2), or a module that gives its own weights and
    metadata, trainable_state() and metadata(**extra) (reward_ft.py's generators). Collective: every rank
    calls it (FSDP2 gathers the weights and the optimizer state, and each rank's RNG state goes into the
    train state); rank 0 writes, and every rank leaves once the set is committed.

    Under FSDP2 a set is written sharded (save_sharded): no process gathers the model or the
    optimizer state.
    """
    if optimizer is not None and _is_sharded(model):
        save_sharded(path, model, optimizer, step, batches, args, frozen, **meta)
        return
    state = _gathered_weights(model)
    frozen_state = _gathered_weights(frozen) if frozen is not None else None
    optim_state = full_optimizer_state(model, optimizer) if optimizer is not None else None
    rngs = all_rng_states()
    if is_main():
        extra = _weights_meta(step, args, meta)
        if optimizer is None:
            _write_weights(path, model, state, extra)
        else:
            train = _train_state(step, rngs, args, batches, meta, optimizer=optim_state)
            writers = [("model.safetensors", lambda f: _write_weights(f, model, state, extra)),
                       ("train.pt", lambda f: torch.save(train, f))]
            if frozen is not None:  # the step it belongs to, as every file of a set records
                writers.append(("ref.safetensors",
                                lambda f: _write_weights(f, frozen, frozen_state, {"step": step, "args": {}})))
            write_set(path, step, writers, keep=getattr(args, "keep", 2))
    if dist.is_initialized():
        dist.barrier()


def save_sharded(path, model, optimizer, step, batches, args, frozen=None, **meta):
    """save_checkpoint under FSDP2: a set whose training state every rank writes and reads as its shards.

    In the set folder: shards/ (torch.distributed.checkpoint: each rank writes its own slices of the
    policy's weights, AdamW's state and the frozen model's weights to its own file, rank 0 the
    index), train.pt (step, every rank's RNG, data position, flags: a few KB) and model.safetensors,
    the whole score model for eval.py and --init, streamed (stream_weights: one tensor gathered at a
    time). Rank 0 makes the temp folder, everyone writes, rank 0 commits: the set's guarantees are
    write_set's."""
    import torch.distributed.checkpoint as dcp

    reshard(model)
    if frozen is not None:
        reshard(frozen)
    rngs = all_rng_states()
    tmp = [begin_set(path, step) if is_main() else None]
    dist.broadcast_object_list(tmp)
    tmp = tmp[0]
    dcp.save(_sharded_state(model, optimizer, frozen), checkpoint_id=os.path.join(tmp, SHARDS))
    if is_main():
        fault_point(SHARDS, step)
    stream_weights(os.path.join(tmp, "model.safetensors"), model, _weights_meta(step, args, meta))
    if is_main():
        fault_point("model", step)
        train = _train_state(step, rngs, args, batches, meta, format=SHARDS)
        finish_set(path, step, tmp, [("train.pt", lambda f: torch.save(train, f))], keep=getattr(args, "keep", 2))
    dist.barrier()


def _weights_meta(step, args, meta):
    """What a set's model.safetensors records beside the score model's own metadata."""
    return {"step": step, "args": vars(args) if args is not None else {}, **meta}


def _train_state(step, rngs, args, batches, meta, **fields):
    """A set's train.pt: step, every rank's RNG state, flags, data position, the script's metadata, and
    `fields` (the whole optimizer state, or format=SHARDS where the shards hold it)."""
    return {"step": step, "rng": rngs, "args": vars(args) if args else {},
            "batches": batches.state() if batches is not None else None, "meta": meta, **fields}


def _sharded_state(model, optimizer, frozen=None):
    """What a sharded set holds, as torch.distributed.checkpoint reads and writes it in place: the
    policy's and the optimizer's state dicts (this rank's shards) and the frozen model's."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    weights, optim = get_state_dict(unwrap(model), optimizer)
    state = {"model": weights, "optim": optim}
    if frozen is not None:
        state["ref"] = get_model_state_dict(unwrap(frozen))
    return state


def load_sharded(folder, model, optimizer, frozen=None):
    """A sharded set's shards/ into the policy, AdamW and `frozen`: each rank reads its own slices."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_state_dict

    state = _sharded_state(model, optimizer, frozen)
    dcp.load(state, checkpoint_id=os.path.join(folder, SHARDS))
    set_state_dict(unwrap(model), optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    if frozen is not None:
        set_model_state_dict(unwrap(frozen), state["ref"])


def stream_weights(path, model, extra):
    """The whole score model into one .safetensors (rank 0 writes), gathered one tensor at a time: no
    rank holds more than the largest tensor (the embeddings: ~5 GB in fp32 for the 27B) beside its
    shards. Collective under FSDP2: every rank gathers each tensor in the same order."""
    inner = unwrap(model)
    state, seen = {}, set()
    tied = inner.vlm.get_output_embeddings().weight is inner.vlm.get_input_embeddings().weight
    for name, t in inner.vlm.state_dict(keep_vars=True).items():
        if id(t) in seen or (tied and name.endswith("lm_head.weight")):  # tied: rebuilt on load
            continue
        seen.add(id(t))
        state[name] = t
    writer = None
    if is_main():
        writer = StreamedCheckpoint(path, {n: (t.dtype, tuple(t.shape)) for n, t in state.items()},
                                    inner.metadata_dict(**extra))
    for name in sorted(state):
        t = state[name].detach()
        full = t.full_tensor() if type(t).__name__ == "DTensor" else t
        if writer is not None:
            writer.add(name, full.cpu())
        del full
    if writer is not None:
        writer.close()


def _gathered_weights(model):
    """A ScoreModel's full state dict on the CPU (collective under FSDP2); None for a module that
    gives its own (trainable_state, on rank 0 when it writes)."""
    return full_state_dict(model) if hasattr(unwrap(model), "vlm") else None


def _write_weights(file, model, state, extra):
    inner = unwrap(model)
    if state is not None:
        write_checkpoint(file, dedupe_tied({k: v.contiguous() for k, v in state.items()}), inner.metadata_dict(**extra))
    else:
        write_checkpoint(file, inner.trainable_state(), inner.metadata(**extra))


def fault_point(name, step):
    """The tests' kill switch: with ZR_FAULT_AFTER=NAME@STEP (or NAME: at every step) the process dies
    here by SIGKILL, as on a lost node, after point NAME of a save (SAVE_POINTS) and before the next."""
    want = os.environ.get(FAULT_ENV)
    if want and want in (name, f"{name}@{step}"):
        import signal

        sys.stdout.flush()
        os.kill(os.getpid(), signal.SIGKILL)


def write_set(path, step, writers, keep=2):
    """Rank 0's part of a save: each (name, write(file)) of `writers` into a temp folder, the commit
    rename, NAME.safetensors pointed at the new set, then the sets beyond `keep` removed. Until the
    rename the earlier sets are untouched; after it the new set is whole."""
    finish_set(path, step, begin_set(path, step), writers, keep)


def begin_set(path, step):
    """Rank 0: the temp folder a set of `step` is written into (save_sharded: every rank writes there)."""
    import shutil

    tmp = f"{set_folder(path, step)}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)  # this process id's own leftover (a save that raised)
    os.makedirs(tmp)
    fault_point("folder", step)
    return tmp


def finish_set(path, step, tmp, writers, keep=2):
    """Rank 0: `writers` into the temp folder, then the manifest of every file in it (sizes), the
    commit rename, the pointer and the pruning (write_set)."""
    import json
    import shutil

    root, final = sets_dir(path), set_folder(path, step)
    for name, write in writers:
        write(os.path.join(tmp, name))
        _fsync(os.path.join(tmp, name))
        fault_point(name.split(".")[0], step)
    files = {}
    for where, _, names in os.walk(tmp):
        for name in names:
            rel = os.path.relpath(os.path.join(where, name), tmp)
            files[rel] = os.path.getsize(os.path.join(tmp, rel))
        _fsync(where)
    # the commit number orders the sets: a run started over at --out commits after the old run's sets
    seq = 1 + max((m.get("seq", 0) for m in map(read_manifest, committed_sets(path)) if m), default=0)
    with open(os.path.join(tmp, MANIFEST), "w") as f:
        json.dump({"format": SET_FORMAT, "step": step, "seq": seq, "files": files}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    _fsync(tmp)
    fault_point("manifest", step)
    aside = f"{final}.del-{os.getpid()}"
    if os.path.exists(final):  # a set of this step from a run started over, or one resume passed over
        os.rename(final, aside)
        fault_point("aside", step)
    os.rename(tmp, final)  # the commit
    _fsync(root)
    fault_point("commit", step)
    point_to(path, os.path.join(final, "model.safetensors"), step)
    shutil.rmtree(aside, ignore_errors=True)
    prune_sets(path, keep, step)


def point_to(path, target, step=0):
    """NAME.safetensors <- the set's weights, atomically: a hard link under a temp name renamed over it
    (a relative symbolic link where the file system has no hard links). No bytes are copied."""
    tmp = f"{path}.tmp-{os.getpid()}"
    if os.path.lexists(tmp):
        os.remove(tmp)
    try:
        os.link(target, tmp)
    except OSError:
        os.symlink(os.path.relpath(target, os.path.dirname(os.path.abspath(path))), tmp)
    fault_point("link", step)
    os.replace(tmp, path)
    _fsync(os.path.dirname(os.path.abspath(path)))
    fault_point("pointer", step)


def prune_sets(path, keep, step=0):
    """Remove the sets beyond the `keep` newest (each renamed to .del-PID first, so that a kill while
    it is deleted leaves a temp folder, not a set with files missing), then an old-style pair's
    NAME.train.pt and NAME.ref.safetensors, which no longer belong to NAME.safetensors."""
    import shutil

    for folder in committed_sets(path)[keep:]:
        gone = f"{folder}.del-{os.getpid()}"
        os.rename(folder, gone)
        fault_point("unlist", step)
        shutil.rmtree(gone)
        fault_point("prune", step)
    old = [f for f in (train_path(path), ref_path(path)) if os.path.exists(f)]
    for f in old:
        os.remove(f)
    if old:
        fault_point("legacy", step)


def _fsync(path):
    """Flush a file or a folder (its entries: a rename) to the disk, so a power cut keeps what a commit names."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on a folder
        pass
    finally:
        os.close(fd)


def full_optimizer_state(model, optimizer):
    """The optimizer's state dict, whole (collective under FSDP2, which gathers it to the CPU)."""
    if _is_sharded(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(unwrap(model), optimizer,
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return optimizer.state_dict()


def sets_dir(path):
    return str(path).removesuffix(".safetensors") + ".ckpt"


def set_folder(path, step):
    return os.path.join(sets_dir(path), f"step-{step:08d}")


def train_path(path):
    """An old-style checkpoint's train state, NAME.train.pt beside NAME.safetensors (before sets)."""
    return str(path).removesuffix(".safetensors") + ".train.pt"


def ref_path(path):
    """An old-style checkpoint's frozen model (gdso.py's pi_ref), NAME.ref.safetensors."""
    return str(path).removesuffix(".safetensors") + ".ref.safetensors"


def read_manifest(folder):
    import json

    try:
        with open(os.path.join(folder, MANIFEST)) as f:
            m = json.load(f)
        return m if isinstance(m, dict) and isinstance(m.get("files"), dict) else None
    except (OSError, ValueError):
        return None


def committed_sets(path):
    """The committed set folders at --out (step-N, no temp suffix), newest commit first; a folder
    without a readable set.json sorts last."""
    import re

    root = sets_dir(path)
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        if re.fullmatch(r"step-\d+", name) and os.path.isdir(os.path.join(root, name)):
            m = read_manifest(os.path.join(root, name)) or {}
            found.append((m.get("seq", -1), int(name[5:]), os.path.join(root, name)))
    return [folder for _, _, folder in sorted(found, reverse=True)]


def set_problem(folder):
    """Why a committed set cannot be resumed (set.json or a file missing or cut short, a file at
    another step), or None. The train.pt's own step is checked when it is loaded (load_resume)."""
    import json

    m = read_manifest(folder)
    if m is None:
        return f"{MANIFEST} missing or unreadable"
    for name, size in m["files"].items():
        file = os.path.join(folder, name)
        if not os.path.isfile(file):
            return f"{name} missing"
        if os.path.getsize(file) != size:
            return f"{name} holds {os.path.getsize(file)} bytes, {size} when written"
        if name.endswith(".safetensors"):
            try:
                meta = _checkpoint_meta(file)
            except Exception as e:  # safetensors' own error type: a foreign or damaged header
                return f"{name} unreadable ({e})"
            if "step" in meta and json.loads(meta["step"]) != m["step"]:
                return f"{name} is at step {json.loads(meta['step'])}, the set at step {m['step']}"
    return None


def newest_set(path, log=None):
    """The newest intact set folder at --out, or None; `log` hears why each newer one was passed over."""
    for folder in committed_sets(path):
        problem = set_problem(folder)
        if problem is None:
            return folder
        if log is not None:
            log(f"resume: passing over {folder}: {problem}")
    return None


def remove_orphans(path):
    """What killed saves left at this --out (no other): NAME.ckpt/*.tmp-PID and *.del-PID folders, and
    NAME.safetensors.tmp-PID (and an old-style NAME.train.pt.tmp-PID, NAME.ref.safetensors.tmp-PID).
    -> the paths removed."""
    import glob
    import shutil

    patterns = [glob.escape(f) + ".tmp-*" for f in (str(path), train_path(path), ref_path(path))]
    patterns += [os.path.join(glob.escape(sets_dir(path)), "step-*." + kind + "-*") for kind in ("tmp", "del")]
    removed = sorted(f for p in patterns for f in glob.glob(p))
    for f in removed:
        if os.path.isdir(f) and not os.path.islink(f):
            shutil.rmtree(f, ignore_errors=True)
        else:
            os.remove(f)
    return removed


def resume_source(path, log=None):
    """What --resume continues at --out: (weights file, train.pt, frozen model's file, where) of the
    newest intact set, else of an old-style pair (NAME.safetensors + NAME.train.pt, written in place
    before sets: still resumed, refused if torn); a user error if there is neither."""
    folder = newest_set(path, log)
    if folder is not None:
        files = [os.path.join(folder, f) for f in ("model.safetensors", "train.pt", "ref.safetensors")]
        return (*files, folder)
    if os.path.exists(train_path(path)):
        return str(path), train_path(path), ref_path(path), f"the old-style pair {path} + {train_path(path)}"
    if committed_sets(path):
        fail(f"cannot resume: no intact checkpoint set in {sets_dir(path)} (each one has a file missing or cut "
             f"short, above); start over without --resume")
    fail(f"cannot resume: no checkpoint at {path} ({sets_dir(path)} holds no set; --resume continues the run that "
         f"writes --out)")


# flags that may differ on --resume: they change when a run evaluates, saves or stops and what it
# only reports, not what it computes. Every other flag, a new one too, changes the run and is
# refused unless --resume-override names it.
RESUME_HARMLESS = frozenset({
    "out", "steps", "resume", "resume_override", "keep", "save_every", "stop_after", "eval_every", "eval_limit",
    "checkpointing",  # recomputes the same activations
    "offload", "layerwise_rollout",  # gdso.py: where tensors wait, how the rollout gathers; the same numbers
    "eval_prompts", "eval_samples", "same_margin", "grid_every", "grid_prompts", "judge", "baseline",  # reward_ft.py
    "eval_teacher", "throughput",  # risd.py
})
# flags added after checkpoint sets were already being written, with the value that runs as they did before the
# flag existed: a set that did not record one resumes under that value as if it had
RESUME_ADDED = {"train_only": ""}


def flag_name(key):
    return "--" + key.replace("_", "-")


def resume_changes(saved, new, override=()):
    """Compare a checkpoint's flags (`saved`, as its metadata's JSON) with this run's (`new`, a dict)
    -> (allowed, overridden, refused): lists of '--flag old -> new'. Allowed: RESUME_HARMLESS ones;
    overridden: the others that `override` names (flag names without '--', '-' or '_'); refused: the rest.
    A RESUME_ADDED flag that the set did not record is no change at its old-behaviour value."""
    import json

    new = json.loads(json.dumps(new, default=str))  # as the checkpoint recorded them
    allowed, overridden, refused = [], [], []
    for key in [*new, *(k for k in saved if k not in new)]:
        old, now = saved.get(key, "(not recorded)"), new.get(key, "(none)")
        if old == now or key == "resume":  # set on every resume
            continue
        if key not in saved and key in RESUME_ADDED and now == RESUME_ADDED[key]:
            continue
        change = f"{flag_name(key)} {old} -> {now}"
        (allowed if key in RESUME_HARMLESS else overridden if key in override else refused).append(change)
    return allowed, overridden, refused


def override_keys(text, known):
    """--resume-override 'lr,data' (or '--lr,batch-size') -> {'lr', 'data'}; a name that is not one of
    this script's flags (`known`) is a user error."""
    keys = {n.strip().lstrip("-").replace("-", "_") for n in text.split(",") if n.strip()}
    unknown = sorted(k for k in keys if k not in known)
    if unknown:
        fail(f"--resume-override: {', '.join(flag_name(k) for k in unknown)}: not a flag of this script")
    return keys


def check_resume(args, quiet=False):
    """Before any model loads: remove what killed saves left at --out (rank 0) and, with --resume, find
    what to continue and compare its flags with this run's: a flag that changes the run (resume_changes)
    is refused unless --resume-override names it, --steps below the saved step is refused, and the
    harmless changes are printed. -> the weights file --resume continues (None without --resume)."""
    import json

    say = (lambda *a: None) if quiet else print0
    if is_main():
        removed = remove_orphans(args.out)
        if removed:
            say(f"removed what a killed save left: {', '.join(removed)}")
    if dist.is_initialized():
        dist.barrier()
    if not args.resume:
        if committed_sets(args.out):
            say(f"starting over at {args.out}: the earlier run's sets in {sets_dir(args.out)} are replaced as "
                f"this run saves (--resume continues them instead)")
        return None
    weights, _, _, where = resume_source(args.out, say)
    meta = _checkpoint_meta(weights)
    step, saved = json.loads(meta.get("step", "0")), json.loads(meta.get("args", "{}"))
    new = vars(args)
    keys = override_keys(getattr(args, "resume_override", "") or "", set(new) | set(saved))
    if saved:  # a checkpoint saved without its flags (by hand) has nothing to compare
        allowed, overridden, refused = resume_changes(saved, new, keys)
        if refused:
            names = ",".join(c.split()[0].removeprefix("--") for c in refused)
            fail(f"--resume: {', '.join(refused)}: {'these change' if len(refused) > 1 else 'this changes'} the "
                 f"run; pass --resume-override {names} to continue anyway")
        steps = [c for c in allowed if c.startswith("--steps ")]
        allowed = [c for c in allowed if c not in steps]
        if allowed:
            say(f"resume: {', '.join(allowed)} (when the run evaluates, saves or stops, not what it computes)")
        if steps:
            say(f"resume: {steps[0]} (the lr schedule now ends at step {args.steps})")
        if overridden:
            say(f"resume: {', '.join(overridden)} (changes the run; --resume-override)")
    if args.steps < step:
        fail(f"--resume: {where} is at step {step}, past --steps {args.steps}: pass --steps {step} or more")
    stop_after = getattr(args, "stop_after", 0)
    if stop_after and stop_after <= step:
        fail(f"--resume: {where} is at step {step}, already past --stop-after {stop_after}")
    if args.steps == step:
        say(f"resume: {where} is at step {step} of --steps {step}: nothing left to train (raise --steps to continue)")
    return weights


def resume_step(args, model, optimizer, batches, frozen=None):
    """The step a run starts at: 0, or with --resume the step of the newest intact set at --out, whose
    weights, optimizer, RNG and data position are loaded (and a frozen model's, e.g. GDSO's pi_ref)."""
    check_resume(args, quiet=True)  # again, for a script that did not call it first: nothing to remove by now
    if not args.resume:
        return 0
    step, _ = load_resume(args.out, model, optimizer, batches, frozen=frozen)
    print0(f"resumed {args.out} at step {step} (from {resume_source(args.out)[3]})")
    return step


def after_step(step, args):
    """What a training loop does once optimizer step `step` is done: (save, stop, evaluate). It saves
    every --save-every steps, at the last step and at --stop-after, where it stops before evaluating."""
    stop = step == args.stop_after
    save = step % args.save_every == 0 or step == args.steps or stop
    evaluate = not stop and bool((args.eval_every and step % args.eval_every == 0) or step == args.steps)
    return save, stop, evaluate


def check_step(path, meta, step, train_file):
    """One file of a checkpoint against the step of its train state: an old-style pair written in
    place, file after file, is torn by a kill between two writes (NAME.safetensors at step 3 beside
    NAME.train.pt at step 2)."""
    import json

    if "step" in meta and json.loads(meta["step"]) != step:
        fail(f"cannot resume: torn checkpoint set: {path} is at step {json.loads(meta['step'])}, {train_file} at "
             f"step {step} (a save was cut short between its files); start over without --resume")


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


def frozen_meta(path, step, train_file):
    """The metadata of a frozen model's file (gdso.py's pi_ref), refused unless it is there and at `step`."""
    if not os.path.exists(path):
        fail(f"cannot resume: {path} (the frozen model, gdso.py's pi_ref) is missing; the run saved none")
    meta = _checkpoint_meta(path)
    check_step(str(path), meta, step, train_file)
    return meta


def load_resume(path, model, optimizer, batches=None, frozen=None):
    """Restore weights, optimizer, RNG and data position (and `frozen`'s weights) from what --resume
    continues at `path` (resume_source); -> (step, meta).

    Refused, before any weight is read, when the files are at different steps; and when the run had
    another number of ranks.
    """
    weights, train_file, ref, _ = resume_source(path)
    meta = _checkpoint_meta(weights)
    train = torch.load(train_file, map_location="cpu", weights_only=False)
    check_step(str(weights), meta, train["step"], train_file)
    world = dist.get_world_size() if dist.is_initialized() else 1
    if len(train["rng"]) != world:  # before any weight is read
        fail(f"cannot resume: {train_file} was written by a run with {len(train['rng'])} ranks, this one has "
             f"{world}; resume with the same world size")
    if train.get("format") == SHARDS:  # saved by save_sharded: every rank reads its own shards
        if not _is_sharded(model):
            fail(f"cannot resume: {train_file}'s set was saved sharded (--fsdp, {world} ranks); resume it with "
                 f"--fsdp on {world} ranks")
        check_compatible(meta, weights, like=unwrap(model))
        try:
            load_sharded(os.path.dirname(train_file), model, optimizer, frozen)
        except (ValueError, KeyError, RuntimeError) as e:
            fail(f"cannot resume: {os.path.join(os.path.dirname(train_file), SHARDS)} does not fit this run's "
                 f"model, optimizer or pi_ref ({str(e).splitlines()[0][:160]}); resume with the flags the run "
                 f"started with")
    else:  # the whole state in train.pt and the set's .safetensors files
        if frozen is not None:
            ref_meta = frozen_meta(ref, train["step"], train_file)
        load_weights(model, meta, weights)
        try:
            if _is_sharded(model):
                from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

                set_optimizer_state_dict(unwrap(model), optimizer, train["optimizer"],
                                         options=StateDictOptions(full_state_dict=True))
            else:
                optimizer.load_state_dict(train["optimizer"])
        except (ValueError, KeyError, RuntimeError) as e:  # e.g. --freeze-vision changed under --resume-override
            fail(f"cannot resume: the optimizer state in {train_file} does not fit this run's trainable parameters "
                 f"({str(e).splitlines()[0][:120]}); resume with the flags the run started with")
        if frozen is not None:
            load_weights(frozen, ref_meta, ref)
    restore_rng_state(train["rng"], train_file)
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
