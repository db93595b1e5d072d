"""
Differentiable reward fine-tuning of a text-to-image generator with the Z-Reward student (Sec. 5).

1. The generator is a rectified flow, as in SD3 / FLUX / Z-Image: x_sigma = (1 - sigma) x + sigma eps,
   velocity v = eps - x, and sampling integrates dx / dsigma = v with Euler steps from sigma = 1
   (noise) to 0 (image). Two implementations share one interface (encode the prompts, velocity,
   decode to [0, 1] pixels): the embedded TinyGenerator, a ~1.5M-parameter DiT over 8x8 patches of a
   64x64 RGB image whose prefix is the prompt's tokens (the tiny world's tokenizer, two convolutions
   so that "top left" carries "red circle"), predicting the clean image from which v follows; and
   DiffusersGenerator, any diffusers flow-matching pipeline with a peft LoRA (optional imports).
2. --stage pretrain (the tiny world only) trains the TinyGenerator with the flow-matching loss on
   images rendered on the fly by tiny_world.py for fresh prompts (never a held-out one): by default the
   candidates whose objects are the prompt's, with every other defect of the world (noise, blur,
   blocky artifacts, clutter, low contrast, off-center, hovering, floating or sunk objects) at the
   world's rates; --pretrain-data world also keeps the near misses and random candidates. It is
   stopped early: this is the tiny world's deliberately imperfect "SFT generator".
3. --stage finetune (the default): ReFL / DRaFT-K. Sample noise, integrate the ODE without grad up
   to a random late step, then keep the graph for the last K steps (K = 1 is ReFL, K > 1 the paper's
   "earlier denoising steps"); the last kept step jumps straight to sigma = 0 (the x0 prediction),
   so a stop before the final step is ReFL's early stop and a stop at the end is DRaFT-K. Each kept
   step is gradient-checkpointed. The image goes through the student's differentiable preprocessing
   and R = sum_d w_d mu_phi(p, I, d) / sum_d w_d (Eq. 16 per dimension, the aggregation A a weighted
   mean with the weights a flag). Loss = -R + beta * reg, reg = mean over the kept steps of
   ||v_theta(x, sigma) - v_ref(x, sigma)||^2 against the frozen starting generator: velocity
   matching, which for the SDE with the same marginals is the integrand of the KL between the two
   path measures, so it is a KL regulariser against reward hacking; zero at initialization.
   The reward comes only from the student; the teacher and the oracle below only evaluate.
4. Evaluation: GSB (Eq. 21) of the fine-tuned generator against the starting one on held-out
   prompts (the world's test split), the same noise for both, judged blindly by judges that do not
   share the student's weights: the synthetic world's own scoring read back from the pixels
   (world.oracle_scores: objects, colors, shapes, positions, support, noise, blur, clutter ...) and,
   with --judge, the GDSO teacher in reasoning mode. The student's own GSB is printed too, only as
   supporting evidence: a reward can be hacked. Every --grid-every steps a PNG grid of fixed held-out
   prompts, before (top row), after (middle row) and their difference |after - before| x 16 (bottom
   row), is written next to the checkpoint.

Changed from the paper, and why: a tiny pixel-space DiT instead of a latent 6B model (2 CPU cores);
no classifier-free guidance (one forward per step; the tiny SFT generator is imperfect without it);
the KL regulariser made explicit (the paper names none). In the tiny world only the transformer
blocks are fine-tuned (--train-params; LoRA on attention plays that role for a real model) and
beta is 20, against reward hacking (docs/LOG.md).

Launch:
    python reward_ft.py --stage pretrain --out assets/tiny_gen.safetensors                  # one CPU, ~5 min
    python reward_ft.py --reward s.safetensors --out runs/gen_rft.safetensors               # from assets/tiny_gen
    python reward_ft.py --init runs/gen_rft.safetensors --baseline assets/tiny_gen.safetensors \\
        --reward s.safetensors --judge t.safetensors --steps 0                              # GSB only
    torchrun --nproc_per_node=2 reward_ft.py --reward s.safetensors                          # DDP, CPU or GPU
    torchrun --nproc_per_node=8 reward_ft.py --generator Tongyi-MAI/Z-Image-Turbo --reward s27.safetensors \\
        --data my_prompts --bf16 --resolution 1024 --sample-steps 8 --batch-size 32 --micro-batch 1 \\
        --lr 1e-4 --out runs/zimage_lora.safetensors
"""

import argparse
import hashlib
import json
import os

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

import common
import tiny_world
from data import DIMENSIONS, gsb
from model import GENERATOR_FORMAT, read_checkpoint

DEFAULT_INIT = common.asset("tiny_gen.safetensors")  # the shipped tiny generator (--stage pretrain makes it)
STAGE_DEFAULTS = {"finetune": dict(steps=60, batch_size=16, lr=2e-4, warmup=5, grid_every=20),
                  "pretrain": dict(steps=2000, batch_size=32, lr=2e-3, warmup=20, grid_every=100)}
# pretraining noise levels: logit-normal(0.5, 1), tilted toward the noisy end where the prompt decides the layout
SIGMA_SHIFT = 0.5

# -----------------------------------------------------------------------------
# a real generator: any diffusers flow-matching pipeline, LoRA through peft (optional imports)


FAMILIES = {"StableDiffusion3Pipeline": "StableDiffusion3", "FluxPipeline": "Flux", "ZImagePipeline": "ZImage"}


class DiffusersGenerator(nn.Module):
    """The same interface over a diffusers text-to-image pipeline: SD3, FLUX or Z-Image.

    Each call follows the pipeline's own __call__ without classifier-free guidance: its sigma
    schedule (resolution shift included), latent packing (FLUX), timestep convention (SD3: 1000
    sigma; FLUX: sigma, plus the distilled guidance embedding at 3.5; Z-Image: 1 - sigma, and the
    model predicts -v), VAE scaling and shift. tests/test_diffusers.py checks a no-grad rollout
    against the pipeline's own sampler on tiny random pipelines of each family. diffusers and peft
    are imported only when this class is built. Only the LoRA weights train.
    """

    def __init__(self, name_or_path, lora_rank=16, resolution=512, dtype=torch.bfloat16, device="cpu", seed=0):
        super().__init__()
        from diffusers import DiffusionPipeline
        from peft import LoraConfig

        pipe = DiffusionPipeline.from_pretrained(name_or_path, torch_dtype=dtype)
        self.family = FAMILIES.get(type(pipe).__name__)
        if self.family is None:
            raise ValueError(f"{name_or_path}: {type(pipe).__name__} is not one of the wired-up pipelines "
                             f"{sorted(FAMILIES)}")
        scheduler = type(pipe.scheduler).__name__
        if scheduler != "FlowMatchEulerDiscreteScheduler" or pipe.scheduler.config.get("stochastic_sampling"):
            raise ValueError(f"{name_or_path}: sampling here is deterministic Euler; the pipeline's scheduler is "
                             f"{scheduler}")
        self.pipe, self.source, self.resolution, self.lora_rank = pipe, str(name_or_path), resolution, lora_rank
        for part in ("vae", "text_encoder", "text_encoder_2", "text_encoder_3", "transformer"):
            if getattr(pipe, part, None) is not None:
                getattr(pipe, part).requires_grad_(False)
        self.transformer, self.vae = pipe.transformer, pipe.vae  # registered, so DDP and .to() see them
        # before the adapter: what a LoRA file must have been trained on
        self.fingerprint = base_fingerprint(self.transformer)
        # the adapter's random A is drawn from its own seed on the CPU, so every rank (and a resumed
        # run) starts from the same LoRA whatever it drew before; B = 0: the start is the base model
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.transformer.add_adapter(LoraConfig(r=lora_rank, lora_alpha=lora_rank, init_lora_weights="gaussian",
                                                    target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
        pipe.to(device)
        if hasattr(self.transformer, "enable_gradient_checkpointing"):
            self.transformer.enable_gradient_checkpointing()
        scale = getattr(pipe, "vae_scale_factor", 8)
        if resolution % (2 * scale):
            raise ValueError(f"--resolution {resolution}: must be a multiple of {2 * scale} "
                             f"(VAE factor {scale} x 2x2 patches)")
        self.latent_size = resolution // scale
        channels = self.transformer.config.in_channels
        self._latent_shape = (channels // 4 if self.family == "Flux" else channels, self.latent_size, self.latent_size)

    @property
    def device(self):
        return next(self.transformer.parameters()).device

    @property
    def latent_shape(self):
        return self._latent_shape

    def sigmas(self, n):
        """The pipeline's own schedule for n steps, then sigma = 0: FLUX and Z-Image hand the scheduler
        linspace(1, 1/n, n), SD3 takes the scheduler's default; the scheduler shifts it (by the image
        sequence length where its config says so)."""
        sched, cfg = self.pipe.scheduler, self.pipe.scheduler.config
        custom = None if self.family == "StableDiffusion3" else np.linspace(1.0, 1 / n, n)
        kwargs = {}
        if cfg.get("use_dynamic_shifting", False):
            from diffusers.pipelines.flux.pipeline_flux import calculate_shift

            # FLUX packs 2x2, Z-Image patchifies 2x2
            patch = self.transformer.config.patch_size if self.family == "StableDiffusion3" else 2
            kwargs["mu"] = calculate_shift((self.latent_size // patch) ** 2, cfg.get("base_image_seq_len", 256),
                                           cfg.get("max_image_seq_len", 4096), cfg.get("base_shift", 0.5),
                                           cfg.get("max_shift", 1.16 if self.family == "StableDiffusion3" else 1.15))
        sched.set_timesteps(n if custom is None else None, device="cpu", sigmas=custom, **kwargs)
        return torch.cat([sched.sigmas[:n].float(), torch.zeros(1)])

    def encode(self, prompts):
        with torch.no_grad():
            if self.family == "StableDiffusion3":
                emb, _, pooled, _ = self.pipe.encode_prompt(list(prompts), None, None, device=self.device,
                                                            do_classifier_free_guidance=False)
                return {"emb": emb, "pooled": pooled}
            if self.family == "Flux":
                emb, pooled, text_ids = self.pipe.encode_prompt(list(prompts), None, device=self.device)
                return {"emb": emb, "pooled": pooled, "text_ids": text_ids}
            emb, _ = self.pipe.encode_prompt(list(prompts), device=self.device, do_classifier_free_guidance=False)
            return {"emb": emb}  # Z-Image: a list of per-prompt embeddings, each as long as its prompt

    def forward(self, x, sigma, cond):
        """velocity v = eps - x0 in this file's convention, whatever the family's own."""
        dtype = self.transformer.dtype
        if self.family == "StableDiffusion3":
            return self.transformer(hidden_states=x.to(dtype), timestep=sigma * 1000, encoder_hidden_states=cond["emb"],
                                    pooled_projections=cond["pooled"], return_dict=False)[0].float()
        if self.family == "Flux":
            B, C, H, W = x.shape
            packed = self.pipe._pack_latents(x.to(dtype), B, C, H, W)  # (B, H/2 * W/2, 4C): 2x2 patches as tokens
            img_ids = self.pipe._prepare_latent_image_ids(B, H // 2, W // 2, x.device, dtype)
            guidance = torch.full((B,), 3.5, device=x.device) if self.transformer.config.guidance_embeds else None
            v = self.transformer(hidden_states=packed, timestep=sigma, guidance=guidance,
                                 pooled_projections=cond["pooled"], encoder_hidden_states=cond["emb"],
                                 txt_ids=cond["text_ids"], img_ids=img_ids, return_dict=False)[0]
            scale = self.pipe.vae_scale_factor
            return self.pipe._unpack_latents(v, H * scale, W * scale, scale).float()
        # Z-Image: time runs the other way (1 - sigma, computed as the pipeline does from t = 1000 sigma),
        # inputs are per-sample (C, 1, H, W), and the model predicts -v
        t = (1000 - sigma * 1000) / 1000
        out = self.transformer(list(x.to(dtype).unsqueeze(2).unbind(0)), t, cond["emb"], return_dict=False)[0]
        return -torch.stack([o.float() for o in out]).squeeze(2)

    def decode(self, x):
        vae = self.vae
        z = x.to(vae.dtype) / vae.config.scaling_factor + (getattr(vae.config, "shift_factor", None) or 0.0)
        return ((vae.decode(z, return_dict=False)[0].float() + 1) / 2).clamp(0, 1)

    def frozen_copy(self, lora=None):
        """The starting generator (or, given LoRA tensors, that generator), frozen: see _FrozenLoRA."""
        return _FrozenLoRA(self, lora if lora is not None else self.trainable_state())

    def trainable_state(self):
        return {k: v.detach().cpu().contiguous() for k, v in self.named_parameters() if v.requires_grad}

    def metadata(self, **extra):
        meta = {"format": GENERATOR_FORMAT, "kind": "diffusers-lora", "base": self.source,
                "base_class": type(self.pipe).__name__, "base_fingerprint": self.fingerprint,
                "lora_rank": str(self.lora_rank)}
        return {**meta, **{k: v if isinstance(v, str) else json.dumps(v) for k, v in extra.items()}}

    def check_lora(self, meta, tensors, path):
        """Refuse a file that is not a LoRA of this script for this very base pipeline, and say why."""
        if meta.get("format") != GENERATOR_FORMAT or meta.get("kind") != "diffusers-lora":
            raise ValueError(f"{path}: not a LoRA file of this script (format {meta.get('format')!r}, "
                             f"kind {meta.get('kind')!r})")
        if meta.get("base_fingerprint") != self.fingerprint:
            raise ValueError(f"{path}: a LoRA of {meta.get('base')!r} ({meta.get('base_class')}, fingerprint "
                             f"{meta.get('base_fingerprint')}); this base is {self.source!r} "
                             f"({type(self.pipe).__name__}, fingerprint {self.fingerprint}): refused")
        shapes = {k: tuple(p.shape) for k, p in self.named_parameters() if p.requires_grad}
        if set(tensors) != set(shapes) or any(tuple(t.shape) != shapes[k] for k, t in tensors.items()):
            raise ValueError(f"{path}: LoRA weights do not fit this adapter (rank {meta.get('lora_rank')} in the file, "
                             f"--lora-rank {self.lora_rank} here; {len(tensors)} tensors, {len(shapes)} expected)")

    def load_trainable_state(self, meta, tensors, path):
        """--resume (common.load_resume): the LoRA of a file written for this very base and rank."""
        self.check_lora(meta, tensors, path)
        self.load_state_dict(tensors, strict=False)

    def read_lora(self, path):
        """-> the LoRA tensors of a file written for this base pipeline (check_lora)."""
        meta, tensors = read_checkpoint(path)
        self.check_lora(meta, tensors, path)
        return tensors


def base_fingerprint(transformer):
    """A short hash of the base transformer: class, config, and every tensor's name, shape and first
    values in bf16 (so an fp32 and a --bf16 load agree). Two checkpoints of one architecture differ."""
    h = hashlib.sha256(type(transformer).__name__.encode())
    config = {k: v for k, v in transformer.config.items() if not k.startswith("_")}
    h.update(json.dumps(config, sort_keys=True, default=str).encode())
    with torch.no_grad():
        for name, p in sorted(transformer.named_parameters()):
            h.update(f"{name}{tuple(p.shape)}".encode())
            h.update(p.detach().flatten()[:16].to("cpu", torch.bfloat16).view(torch.int16).numpy().tobytes())
    return h.hexdigest()[:16]


class _FrozenLoRA(nn.Module):
    """A frozen generator sharing the trained one's pipeline: the same transformer with a fixed LoRA
    (the starting adapter, or a --baseline file's) swapped in per call by torch.func.functional_call.

    Nothing is written into the trained weights, so the graph of a kept step stays valid, and no
    second copy of the base model exists: the cost is one copy of the LoRA tensors."""

    def __init__(self, gen, lora):
        super().__init__()
        self.__dict__["gen"] = gen  # not a submodule: DDP must not count its parameters twice
        params = dict(gen.named_parameters())
        self.lora = {k: v.detach().to(params[k].device, params[k].dtype).clone() for k, v in lora.items()}

    def forward(self, x, sigma, cond):
        with torch.no_grad():
            return torch.func.functional_call(self.gen, self.lora, (x, sigma, cond))

    # the rest of the interface is the trained generator's: the same text encoders, schedule and VAE
    def encode(self, prompts):
        return self.gen.encode(prompts)

    def decode(self, x):
        with torch.no_grad():
            return self.gen.decode(x)

    def sigmas(self, n):
        return self.gen.sigmas(n)

    @property
    def device(self):
        return self.gen.device

    @property
    def latent_shape(self):
        return self.gen.latent_shape


def build_generator(args, device):
    """-> (generator being trained, frozen starting generator or None)."""
    if args.generator == "tiny":
        if args.stage == "pretrain":
            gen = tiny_world.TinyGenerator.fresh(args.seed, width=args.width, depth=args.depth, heads=args.heads, patch=args.patch)
        else:
            gen = load_tiny(args.init, "--init")
            if args.train_params == "blocks":
                # only the transformer blocks move: the pixel-facing layers stay frozen, else a
                # universal adversarial texture for the student is one output bias away
                gen.requires_grad_(False)
                gen.blocks.requires_grad_(True)
        gen.to(device)
    else:
        gen = DiffusersGenerator(args.generator, args.lora_rank, args.resolution,
                                 torch.bfloat16 if args.bf16 else torch.float32, device, seed=args.seed)
        if args.init and os.path.abspath(args.init) != DEFAULT_INIT:  # a LoRA an earlier run wrote, for this base
            gen.load_state_dict(read_lora(gen, args.init, "--init"), strict=False)
    return gen, (gen.frozen_copy() if args.stage == "finetune" else None)


def load_tiny(path, flag):
    """A tiny generator checkpoint; a file that is not one, or whose bytes changed, is a user error."""
    try:
        return tiny_world.TinyGenerator.load(path)
    except (ValueError, FileNotFoundError) as e:
        common.fail(f"{flag}: {e}")


def read_lora(gen, path, flag):
    """A LoRA file for this base pipeline (DiffusersGenerator.read_lora), or a user error naming it."""
    try:
        return gen.read_lora(path)
    except (ValueError, FileNotFoundError) as e:
        common.fail(f"{flag}: {e}")


# -----------------------------------------------------------------------------
# flow matching: the pretraining loss, sampling, and the truncated-gradient rollout


def flow_loss(gen, x, cond, generator=None):
    """Rectified-flow loss on the clean image: sigma ~ logit-normal(SIGMA_SHIFT, 1),
    x_sigma = (1 - sigma) x + sigma eps, MSE between x and x0 = x_sigma - sigma v.

    The velocity loss ||v - (eps - x)||^2 is the same error weighted by 1 / sigma^2: most of its
    gradient comes from the clean end, while what goes where, the part that only the prompt can
    tell, is decided at the noisy end. Weighting all noise levels alike in image space (and drawing
    sigma a little toward 1) is what made the tiny generator start to follow its prompt within a few
    hundred steps; it is a choice for this small CPU budget, not a claim about large models.
    """
    B = x.shape[0]
    sigma = torch.sigmoid(torch.randn(B, generator=generator) + SIGMA_SHIFT).to(x.device)
    eps = torch.randn(x.shape, generator=generator).to(x.device)
    s = sigma.view(B, 1, 1, 1)
    x_sigma = ((1 - s) * x + s * eps).to(x.dtype)
    x0 = x_sigma.float() - s * gen(x_sigma, sigma, cond).float()
    return (x0 - x.float()).square().mean()


@torch.no_grad()
def sample(gen, noise, cond, sigmas):
    """Euler integration of dx / dsigma = v from sigma = 1 to 0, no graph; -> decoded images in [0, 1]."""
    x = noise
    for i in range(len(sigmas) - 1):
        sig = sigmas[i].expand(x.shape[0]).to(x.device)
        x = x + (sigmas[i + 1] - sigmas[i]).item() * gen(x, sig, cond).float()
    return gen.decode(x)


class Rollout(nn.Module):
    """One fine-tuning rollout as one forward, so that DDP sees one forward per backward.

    forward(noise, cond, sigmas, stop, k) runs the no-grad Euler steps 0 .. stop-k-1, then the k
    steps stop-k .. stop-1 with the graph kept (each checkpointed); the last of them goes to
    sigma = 0 (the x0 prediction), whatever sigma[stop] is. Returns the decoded images and the
    velocity-matching regulariser, the mean over the kept steps of ||v_theta - v_ref||^2.
    """

    def __init__(self, gen, ref, checkpointing=True):
        super().__init__()
        self.gen, self.checkpointing = gen, checkpointing
        self.__dict__["ref"] = ref  # frozen and outside the module tree: DDP broadcasts and reduces only gen

    def forward(self, noise, cond, sigmas, stop, k, with_reg=True):
        n = len(sigmas) - 1
        if not 1 <= k <= stop <= n:
            raise ValueError(f"need 1 <= grad steps ({k}) <= stop ({stop}) <= sample steps ({n})")
        x = noise
        with torch.no_grad():  # the early part of the trajectory: no graph at all
            for i in range(stop - k):
                sig = sigmas[i].expand(x.shape[0]).to(x.device)
                x = x + (sigmas[i + 1] - sigmas[i]).item() * self.gen(x, sig, cond).float()
        x = x.detach()
        reg = x.new_zeros(())
        for i in range(stop - k, stop):
            sig = sigmas[i].expand(x.shape[0]).to(x.device)
            target = sigmas[i + 1].item() if i < stop - 1 else 0.0  # the last kept step jumps to sigma = 0
            if self.checkpointing and torch.is_grad_enabled():
                v = checkpoint(self.gen, x, sig, cond, use_reentrant=False).float()
            else:
                v = self.gen(x, sig, cond).float()
            if with_reg and self.ref is not None:
                with torch.no_grad():
                    v_ref = self.ref(x.detach(), sig, cond).float()
                reg = reg + (v - v_ref).square().mean() / k
            x = x + (target - sigmas[i].item()) * v
        return self.gen.decode(x), reg


# -----------------------------------------------------------------------------
# the reward (the student) and the judges (oracle, teacher)


def parse_weights(dimensions, weights):
    """--dimensions and --weights -> {dimension: weight}; a ValueError names what is wrong."""
    dims = [d.strip() for d in dimensions.split(",") if d.strip()]
    unknown = [d for d in dims if d not in DIMENSIONS]
    if not dims or unknown:
        raise ValueError(f"--dimensions: unknown {unknown} (choose from {DIMENSIONS})")
    try:
        w = [float(x) for x in weights.split(",")] if weights else [1.0] * len(dims)
    except ValueError:
        w = []
    if len(w) != len(dims) or not all(np.isfinite(x) and x >= 0 for x in w) or sum(w) <= 0:
        raise ValueError(f"--weights needs {len(dims)} non-negative numbers with a positive sum, got {weights!r}")
    return dict(zip(dims, w))


def reward(student, prompts, images, weights):
    """R = sum_d w_d mu_phi(p, I, d) / sum_d w_d per image (B,), and the per-dimension mu (D, B).

    All dimensions go through one batched forward of the student; gradients flow to the pixels.
    """
    dims, B = list(weights), len(prompts)
    out = student.score(list(prompts) * len(dims), images.repeat(len(dims), 1, 1, 1),
                        [d for d in dims for _ in range(B)])
    mu = out.mean.view(len(dims), B)  # (D, B)
    w = torch.tensor([weights[d] for d in dims], device=mu.device, dtype=mu.dtype)
    return (w[:, None] * mu).sum(0) / w.sum(), mu


def to_uint8(images):
    """(B, 3, H, W) float in [0, 1] -> list of (H, W, 3) uint8 arrays (what a viewer or the oracle sees)."""
    return list((images.detach().float().clamp(0, 1) * 255 + 0.5).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy())


def judge_scores(images, prompts, weights, teacher=None, student=None, oracle=True):
    """Per-image scores from each judge, weighted over dimensions as the reward is:
    {'oracle': (B,), 'teacher': (B,), 'student': (B,)}, plus the oracle's per-dimension scores.

    The oracle reads the tiny world's 64x64 images only (world.oracle_scores); a real generator is
    judged by the teacher (and, as supporting evidence, the student)."""
    dims = list(weights)
    w = np.array([weights[d] for d in dims])
    out, per_dim = {}, {}
    if oracle:
        orc = np.array([[tiny_world.oracle_scores(im, p)[d] for d in dims] for im, p in zip(to_uint8(images), prompts)])  # (B, D)
        out["oracle"], per_dim = orc @ w / w.sum(), {d: orc[:, j] for j, d in enumerate(dims)}
    for name, model in (("teacher", teacher), ("student", student)):
        if model is not None:
            with torch.no_grad():
                mode = "reasoning" if name == "teacher" else "direct"
                B = len(prompts)
                res = model.score(list(prompts) * len(dims), images.repeat(len(dims), 1, 1, 1).to(model.device),
                                  [d for d in dims for _ in range(B)], mode=mode, max_new_tokens=96)
                mu = res.mean.float().view(len(dims), B).cpu().numpy()
                out[name] = (w[:, None] * mu).sum(0) / w.sum()
    return out, per_dim


def eval_noise(n, shape, seed, offset=0):
    """Noise for held-out item i: seeded by (seed, i) alone, so any sharding or batching gives the same image."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(seed * 1_000_003 + offset + i))
                        for i in range(n)])


def generate(gen, prompts, noise, sigmas, batch=64):
    outs = []
    for a in range(0, len(prompts), batch):
        cond = gen.encode(prompts[a:a + batch])
        outs.append(sample(gen, noise[a:a + batch].to(gen.device), cond, sigmas).float().cpu())
    return torch.cat(outs)


def save_grid(path, rows, scale=2):
    """rows: list of (B, 3, H, W) tensors in [0, 1] -> one PNG, a 2-pixel white gap between images."""
    from PIL import Image

    ims = [to_uint8(r) for r in rows]
    H, W, gap = ims[0][0].shape[0], ims[0][0].shape[1], 2
    canvas = np.full((len(ims) * (H + gap) - gap, len(ims[0]) * (W + gap) - gap, 3), 255, np.uint8)
    for r, row in enumerate(ims):
        for c, im in enumerate(row):
            canvas[r * (H + gap):r * (H + gap) + H, c * (W + gap):c * (W + gap) + W] = im
    img = Image.fromarray(canvas).resize((canvas.shape[1] * scale, canvas.shape[0] * scale), Image.NEAREST)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}.png"
    img.save(tmp)
    os.replace(tmp, path)


# -----------------------------------------------------------------------------
# the held-out evaluation and the before / after grid


class HeldOutEvaluation:
    """Held-out scores of the generator on the test split's prompts x --eval-samples noise seeds.

    Item i is prompt i // S with the noise seeded by i alone, and each rank scores an interleaved shard,
    so any number of ranks scores the same images. Pretraining: the oracle's mean scores. Fine-tuning:
    GSB of the generator against the baseline on the same noise, judged blindly by judges that do not
    share the student's weights (the oracle; the teacher, at the final evaluation only: it writes a
    trace per image) and by the student itself, as supporting evidence only.
    """

    def __init__(self, args, gen, baseline, student, teacher, weights, prompts, sigmas, rank, world):
        self.gen, self.baseline, self.student, self.teacher = gen, baseline, student, teacher
        self.weights, self.sigmas, self.stage, self.margin = weights, sigmas, args.stage, args.same_margin
        self.oracle = args.generator == "tiny"  # the oracle reads the tiny world's images only
        self.n_prompts, self.n_samples = len(prompts), args.eval_samples
        self.n_items = len(prompts) * args.eval_samples
        mine = list(range(self.n_items))[rank::world]
        self.prompts = [prompts[i // args.eval_samples] for i in mine]
        shape = gen.latent_shape
        noise = [eval_noise(1, shape, args.seed, offset=i) for i in mine]
        self.noise = torch.cat(noise) if noise else torch.zeros(0, *shape)
        self.before = None  # the baseline's judge scores, computed once (again when the teacher first judges)

    def report(self, final):
        """The evaluation's lines; a collective: every rank calls it."""
        self.gen.eval()
        after = generate(self.gen, self.prompts, self.noise, self.sigmas)
        self.gen.train()
        teacher = self.teacher if final else None
        scores, per_dim = judge_scores(after, self.prompts, self.weights, teacher, self.student, oracle=self.oracle)
        if self.stage == "pretrain":
            return self.oracle_means(scores, per_dim)
        if self.before is None or (teacher is not None and "teacher" not in self.before[0]):
            before = generate(self.baseline, self.prompts, self.noise, self.sigmas)
            self.before = judge_scores(before, self.prompts, self.weights, teacher, self.student, oracle=self.oracle)
        return self.gsb_table(*self.before, scores, per_dim)

    def oracle_means(self, scores, per_dim):
        means = {f"oracle_{d}": float(v.mean()) for d, v in per_dim.items()}
        means["oracle"] = float(scores["oracle"].mean())
        means = common.all_mean(means)
        return (f"held-out oracle ({self.n_items} images): "
                + " | ".join(f"{k.removeprefix('oracle_')} {v:.3f}" for k, v in sorted(means.items())))

    def gsb_table(self, before, before_per_dim, after, after_per_dim):
        lines = [f"{'judge':<9}{'good':>7}{'same':>7}{'bad':>7}{'GSB':>8}{'before':>9}{'after':>9}   "
                 f"(held-out, {self.n_prompts} prompts x {self.n_samples} seeds, blind, same noise)"]
        for name in ("oracle", "teacher", "student"):
            if name in after and name in before:
                lines.append(self.gsb_line(name, before[name], after[name]))
        if self.oracle:
            lines.append("oracle by dimension (before->after): " + " | ".join(
                f"{d} {self.mean(before_per_dim[d]):.2f}->{self.mean(after_per_dim[d]):.2f}" for d in self.weights))
        return "\n".join(lines)

    def mean(self, scores):
        """The mean over all ranks' items of per-item scores (a collective)."""
        return common.all_sum(scores.sum()) / self.n_items

    def gsb_line(self, name, before, after):
        """One judge's good / same / bad counts over all ranks, GSB (Eq. 21) and its mean scores."""
        diff = after - before
        good = common.all_sum((diff > self.margin).sum())
        same = common.all_sum((np.abs(diff) <= self.margin).sum())
        bad = common.all_sum((diff < -self.margin).sum())
        mean_before, mean_after = self.mean(before), self.mean(after)
        note = "   (the optimized reward: supporting evidence only)" if name == "student" else ""
        return (f"{name:<9}{int(good):>7d}{int(same):>7d}{int(bad):>7d}{gsb(good, same, bad):>8.3f}"
                f"{mean_before:>9.3f}{mean_after:>9.3f}{note}")


class BeforeAfterGrid:
    """A PNG beside the checkpoint of fixed held-out prompts with fixed noise: the baseline's images (top
    row, drawn once), the generator's (middle) and |after - before| x 16 (bottom: the changes are a few
    uint8 levels); pretraining, the generator's row alone. Rank 0 draws it."""

    def __init__(self, args, gen, baseline, prompts, sigmas):
        self.gen, self.prompts, self.sigmas, self.stage = gen, prompts, sigmas, args.stage
        self.stem = str(args.out).removesuffix(".safetensors")
        self.noise = eval_noise(len(prompts), gen.latent_shape, args.seed, offset=10_000_000)
        self.before = None
        if common.is_main() and prompts:
            self.before = generate(baseline if baseline is not None else gen, prompts, self.noise, sigmas)

    def write(self, step):
        if not (common.is_main() and self.prompts):
            return
        self.gen.eval()
        after = generate(self.gen, self.prompts, self.noise, self.sigmas)
        self.gen.train()
        rows = [after]
        if self.stage == "finetune":
            rows = [self.before, after, ((after - self.before).abs() * 16).clamp(0, 1)]
        save_grid(f"{self.stem}.grid-step{step:05d}.png", rows)


# -----------------------------------------------------------------------------
# training steps


def bf16_compute(device, enabled):
    """--bf16: the generator computes in bf16 on its fp32 parameters (the reward model is frozen bf16)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


def pretrain_losses(ddp, gen, args, step, rank, micro, accum, exclude, device):
    """Pretraining: the flow-matching loss on images rendered on the fly for prompts outside `exclude`,
    backward per micro-batch; -> the step's mean loss."""
    logs = {"loss": 0.0}
    for m in range(accum):
        rng = np.random.default_rng([args.seed, rank, step, m])  # a pure function of the step: exact resume
        prompts, images = tiny_world.generator_batch(rng, micro, exclude, clean=args.pretrain_data == "clean")
        x = gen.to_latent(images.to(device))
        # gradients are reduced across ranks on the last micro-batch only
        with common.grad_sync(ddp, m == accum - 1), bf16_compute(device, args.bf16):
            loss = flow_loss(ddp, x, gen.encode(prompts), torch.Generator().manual_seed(int(rng.integers(2**31))))
            (loss / accum).backward()
        logs["loss"] += float(loss.detach()) / accum
    return logs


def finetune_losses(ddp, gen, student, prompts, sigmas, weights, args, micro, device):
    """Fine-tuning: rollouts of this rank's prompts, loss -R + beta reg, backward per micro-batch; -> the
    step's means of each dimension's mu, the reward R and the regulariser."""
    chunks = [prompts[a:a + micro] for a in range(0, len(prompts), micro)]
    logs = {}
    for m, chunk in enumerate(chunks):
        noise = torch.randn(len(chunk), *gen.latent_shape).to(device)
        # the random late stop is drawn on rank 0 and shared, so DDP ranks run the same graph
        stop = torch.randint(args.sample_steps - args.stop_range + 1, args.sample_steps + 1, (1,))
        if dist.is_initialized():
            dist.broadcast(stop, 0)
        k = min(args.grad_steps, int(stop))
        with common.grad_sync(ddp, m == len(chunks) - 1):  # reduce across ranks on the last micro-batch
            with bf16_compute(device, args.bf16):
                images, reg = ddp(noise, gen.encode(chunk), sigmas, int(stop), k, args.reg > 0)
            r, mu = reward(student, chunk, images.float(), weights)
            loss = -r.mean() + args.reg * reg.float()
            (loss / len(chunks)).backward()
        for j, d in enumerate(weights):
            logs[d[:5]] = logs.get(d[:5], 0.0) + float(mu[j].detach().mean()) / len(chunks)
        logs["reward"] = logs.get("reward", 0.0) + float(r.detach().mean()) / len(chunks)
        logs["reg"] = logs.get("reg", 0.0) + float(reg.detach()) / len(chunks)
    return logs


def log_step(step, logs, lr, timer, args, device):
    """Every step: its logged terms averaged over ranks (in the order they were logged), lr and speed."""
    averaged = common.all_mean(logs)
    ms = timer.lap()
    common.print0(f"step {step:5d} | " + " | ".join(f"{k} {averaged[k]:.4f}" for k in logs) +
                  f" | lr {lr:.2e} | {ms:.0f} ms/step | {args.batch_size / ms * 1000:.1f} images/s"
                  f"{common.peak_memory(device)}")


# -----------------------------------------------------------------------------
# the script


def get_args(argv=None):
    p = argparse.ArgumentParser(description="differentiable reward fine-tuning of a text-to-image generator "
                                            "(ReFL / DRaFT-K)")
    p.add_argument("--stage", default="finetune", choices=["finetune", "pretrain"],
                   help="finetune: reward fine-tuning; pretrain: the tiny world's SFT generator")
    p.add_argument("--generator", default="tiny",
                   help="'tiny' (the embedded DiT) or a diffusers pipeline folder / hub id (LoRA through peft)")
    p.add_argument("--init", default=DEFAULT_INIT,
                   help="finetune: the starting generator checkpoint (tiny) or LoRA file (diffusers; '' = fresh LoRA)")
    p.add_argument("--reward", default="",
                   help="finetune: the student score-model .safetensors (direct mode) that gives the reward")
    p.add_argument("--baseline", default="", help="finetune: the generator GSB compares against (default: the "
                                                  "starting one, --init); with --steps 0 only evaluates")
    p.add_argument("--judge", default="",
                   help="optional teacher score-model .safetensors: a second blind GSB judge (reasoning mode)")
    p.add_argument("--dimensions", default="alignment,realism,aesthetics,plausibility",
                   help="comma-separated rubric dimensions of the reward")
    p.add_argument("--weights", default="", help="comma-separated weights of the dimensions in R (default: all 1)")
    common.add_run_flags(p, {"--data": "runs/world", "--out": "runs/gen_rft.safetensors", "--steps": None,
                         "--batch-size": None, "--micro-batch": 32, "--lr": None, "--weight-decay": 0.0,
                         "--warmup": None, "--clip": 1.0, "--eval-every": 0, "--save-every": 50, "--resume": False,
                         "--stop-after": 0, "--seed": 0, "--bf16": False},
                         notes={
                             "--data": "train prompts for fine-tuning, test prompts held out",
                             "--out": "grid PNGs beside it too",
                             "--steps": "default: finetune 60, pretrain 2000",
                             "--batch-size": "prompts; default: finetune 16, pretrain 32",
                             "--lr": "default: finetune 2e-4, pretrain 2e-3",
                             "--warmup": "default: finetune 5, pretrain 20",
                             "--eval-every": "held-out GSB",
                             "--seed": "init, prompts, noise and data order",
                             "--bf16": "the generator's compute; the frozen student and judge: bf16 weights; the ODE state stays fp32",
                         }, types={"--steps": common.nonnegative_int})
    p.add_argument("--sample-steps", type=common.positive_int, default=10, help="Euler steps from noise to image")
    p.add_argument("--grad-steps", type=common.positive_int, default=2,
                   help="K: denoising steps that keep the graph (1 = ReFL)")
    p.add_argument("--stop-range", type=common.positive_int, default=2,
                   help="the rollout stops at a random step among the last N (1 = always the full chain)")
    p.add_argument("--checkpointing", action=argparse.BooleanOptionalAction, default=True,
                   help="gradient checkpointing over the kept steps")
    p.add_argument("--reg", type=common.nonnegative_float, default=20.0,
                   help="beta: weight of the velocity-matching (KL) regulariser to the frozen starting generator")
    p.add_argument("--pretrain-data", default="clean", choices=["clean", "world"],
                   help="pretrain on the prompt-faithful candidates (defects of the other dimensions included) "
                        "or on all")
    p.add_argument("--width", type=common.positive_int, default=128, help="tiny generator: transformer width")
    p.add_argument("--depth", type=common.positive_int, default=4, help="tiny generator: transformer blocks")
    p.add_argument("--heads", type=common.positive_int, default=4, help="tiny generator: attention heads")
    p.add_argument("--patch", type=common.positive_int, default=8, help="tiny generator: patch side in pixels")
    p.add_argument("--train-params", default="blocks", choices=["blocks", "all"],
                   help="tiny generator, finetune: train only the transformer blocks, or every parameter")
    p.add_argument("--lora-rank", type=common.positive_int, default=16, help="diffusers generator: LoRA rank")
    p.add_argument("--resolution", type=common.positive_int, default=512,
                   help="diffusers generator: image side in pixels")
    p.add_argument("--eval-prompts", type=common.nonnegative_int, default=0,
                   help="held-out prompts per evaluation (0 = all of the test split)")
    p.add_argument("--eval-samples", type=common.positive_int, default=4, help="noise seeds per held-out prompt")
    p.add_argument("--same-margin", type=common.nonnegative_float, default=0.1,
                   help="GSB: a score difference within this counts as 'same'")
    p.add_argument("--grid-every", type=common.positive_int, default=None,
                   help="write the before/after grid every N steps and at the end (default: finetune 20, pretrain 100)")
    p.add_argument("--grid-prompts", type=common.nonnegative_int, default=8,
                   help="fixed held-out prompts in the grid")
    args = p.parse_args(argv)  # every value is checked by its type (common.RUN_FLAGS, the ones above)
    for k, v in STAGE_DEFAULTS[args.stage].items():  # what was not given takes its stage's default
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.stage == "pretrain" and args.generator != "tiny":
        p.error("--stage pretrain trains the embedded tiny generator; a real one brings its own pretraining")
    if args.stage == "finetune" and not args.reward:
        p.error("--reward: the student score-model .safetensors that gives the reward is required")
    if args.stop_range > args.sample_steps:
        p.error(f"--stop-range {args.stop_range} is more than --sample-steps {args.sample_steps}: the rollout stops "
                f"at one of the last --stop-range steps of the chain")
    try:
        parse_weights(args.dimensions, args.weights)
    except ValueError as e:
        p.error(str(e))
    return args


def check_files(args):
    """The files the flags name, before any data or model loads, each a one-line error when missing
    (the default --init is found from the repository, wherever the script runs)."""
    if args.stage != "finetune":
        return
    for spec in (args.reward, args.judge):
        if spec and spec != "tiny":
            common.check_model_spec(spec)
    lora = args.generator != "tiny"
    for flag, path in (("--init", args.init), ("--baseline", args.baseline)):
        if path and not (lora and flag == "--init" and os.path.abspath(path) == DEFAULT_INIT) \
                and not os.path.isfile(path):
            common.fail(f"{flag} {path}: no such file (a {'LoRA' if lora else 'tiny generator'} .safetensors)")


def load_prompts(data):
    """-> (training prompts, held-out test prompts), each once, in file order (README, Data)."""
    train_file, test_file = common.data_files(data, "train.jsonl", "test.jsonl")
    train = list(dict.fromkeys(r["prompt"] for r in common.load_records(train_file)))
    test = list(dict.fromkeys(r["prompt"] for r in common.load_records(test_file)))
    return train, test


def load_baseline(args, gen, ref, device):
    """The generator GSB compares against: --baseline, else the frozen starting one (None when pretraining)."""
    if args.stage != "finetune" or not args.baseline:
        return ref
    if args.generator == "tiny":
        baseline = load_tiny(args.baseline, "--baseline")
    else:  # a LoRA baseline runs on the trained generator's own pipeline, with its adapter swapped in
        baseline = gen.frozen_copy(read_lora(gen, args.baseline, "--baseline"))
    return baseline.to(device).eval().requires_grad_(False)


def load_score_models(args, device):
    """Fine-tuning: (the student that gives the reward, the teacher that judges or None), frozen; else None, None."""
    if args.stage != "finetune":
        return None, None
    dtype = torch.bfloat16 if args.bf16 else None
    student = common.load_model(args.reward, dtype=dtype).to(device).eval().requires_grad_(False)
    teacher = common.load_model(args.judge, dtype=dtype).to(device).eval().requires_grad_(False) if args.judge else None
    if student.metadata.get("mode", "direct") != "direct":
        common.print0(f"note: {args.reward} was trained in {student.metadata.get('mode')} mode; "
                      f"its direct-mode score is the reward")
    return student, teacher


def prepare_training(args, gen, ref, device):
    """-> (the module a step calls, DDP-wrapped under torchrun; the trainable parameters; AdamW over them)."""
    for p in gen.parameters():  # fp32 master weights and AdamW state; --bf16 is compute only (bf16_compute)
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
    module = gen if args.stage == "pretrain" else Rollout(gen, ref, args.checkpointing)
    if dist.is_initialized():
        from torch.nn.parallel import DistributedDataParallel as DDP

        module = DDP(module, device_ids=[device.index] if device.type == "cuda" else None)
    params = [p for p in gen.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                                   {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}],
                                  lr=args.lr, betas=(0.9, 0.99))
    return module, params, optimizer


def print_header(args, gen, weights, world, micro, accum):
    n_params = sum(p.numel() for p in gen.parameters() if p.requires_grad)
    finetune = (f" | reward {args.reward} {weights} | K={args.grad_steps}, stop in last {args.stop_range} of "
                f"{args.sample_steps}, reg {args.reg}") if args.stage == "finetune" else ""
    common.print0(f"{args.stage} | {args.generator} generator, {n_params / 1e6:.2f}M trainable | world {world} x "
                  f"micro {micro} x accum {accum} = {args.batch_size} | {args.steps} steps{finetune}")


def main(argv=None):
    args = get_args(argv)
    check_files(args)
    rank, world, device = common.dist_init()
    common.check_resume(args)  # before any model loads: what --resume continues, and with which flags
    common.seed_all(args.seed + rank)
    weights = parse_weights(args.dimensions, args.weights)
    train_prompts, test_prompts = load_prompts(args.data)
    if args.stage == "finetune":  # a batch larger than the prompts, before any model loads
        common.check_batch(len(train_prompts), args.batch_size, "--batch-size", "distinct training prompts", world)
    gen, ref = build_generator(args, device)
    common.check_resume_model(args, gen, f"--init {args.init}" if args.stage == "finetune" and args.generator == "tiny"
                        else f"--generator {args.generator}")
    baseline = load_baseline(args, gen, ref, device)
    student, teacher = load_score_models(args, device)
    micro, accum = common.split_batch(args.batch_size, args.micro_batch, world)
    ddp, params, optimizer = prepare_training(args, gen, ref, device)
    batches = None
    if args.stage == "finetune":
        batches = common.Batches(train_prompts, args.batch_size, rank, world, seed=args.seed)
    step = common.resume_step(args, gen, optimizer, batches)
    sigmas = gen.sigmas(args.sample_steps)
    print_header(args, gen, weights, world, micro, accum)
    grid = BeforeAfterGrid(args, gen, baseline, test_prompts[:args.grid_prompts], sigmas)
    held_out = test_prompts[:args.eval_prompts] if args.eval_prompts else test_prompts
    evaluation = HeldOutEvaluation(args, gen, baseline, student, teacher, weights, held_out, sigmas, rank, world)
    exclude = set(test_prompts)  # pretraining never draws a held-out prompt
    timer = common.Timer()
    while step < args.steps:
        lr = common.lr_at(step, args.steps, args.lr, args.warmup)
        common.set_lr(optimizer, lr)
        gen.train()
        if args.stage == "pretrain":
            logs = pretrain_losses(ddp, gen, args, step, rank, micro, accum, exclude, device)
        else:
            logs = finetune_losses(ddp, gen, student, batches.next(), sigmas, weights, args, micro, device)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, args.clip)
        loss = logs["loss"] if args.stage == "pretrain" else -logs["reward"] + args.reg * logs["reg"]
        common.check_finite_step(step, grad_norm, loss)  # stop, before a NaN update
        logs["grad"] = float(grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        log_step(step, logs, lr, timer, args, device)
        do_save, stop, do_eval = common.after_step(step, args)
        if do_save:
            common.save_checkpoint(args.out, gen, optimizer, step, batches, args, stage=args.stage)
        if stop:
            break
        if step % args.grid_every == 0 or step == args.steps:
            grid.write(step)
        if do_eval:
            common.print0(f"step {step} | evaluation\n" + evaluation.report(final=step == args.steps))
    if args.steps == 0:  # evaluation only: --init against --baseline
        common.print0("evaluation\n" + evaluation.report(final=True))
    common.dist_cleanup()


if __name__ == "__main__":
    main()
    common.exit_worker()
