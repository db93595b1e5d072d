"""
The Z-Reward score model: a vision-language model read as a distribution over rubric scores.

Given a prompt p, an image I and a rubric dimension d, the model's next-token logits at the
score position, restricted to the K = 9 bin tokens, give q(s | p, I, d) over the half-point grid
s in {1.0, 1.5, ..., 5.0}; the reward is its expectation mu = sum_s s q(s) (Eq. 16) and sigma its
spread. This is Q-Align's reading of a score from token logits, applied to Z-Reward's rubric.

- bins: the digits "1".."9" (single tokens in every Qwen tokenizer: the pre-tokenizer splits
  digits one by one), level L means score 1 + (L - 1) / 2. The rubric asks for a 1-9 answer, so a
  base model emits these tokens naturally. Every bin is checked to be exactly one token.
- score head: hidden state at the score position times only the K LM-head rows of the bin
  tokens, never the full-vocabulary logits.
- prompt modes: "direct" (the score token is the first answer token; SFT and the RISD student)
  and "reasoning" (a trace, then "Score: N"; the GDSO teacher); "rewarddance" (trained on the
  score token, then a post-hoc rationale) is scored like "direct", from the first answer token
  only; "caption" exists only to pretrain the tiny world's base model.
- checkpoints: one safetensors file with the weights and everything needed to rebuild the model
  offline (HF config, tokenizer, image-processor settings, chat template, bins, prompt version).
- the embedded default, tiny_world.tiny_score_model(): a ~0.5M-parameter Qwen3.5-architecture VLM built from
  a config, with a byte-level BPE tokenizer made in code; both come from tiny_world.py, the tiny world's
  file, imported only when the tiny model is built. Nothing is downloaded.

References: Z-Reward (Jin, Cai et al., arXiv 2606.09076), Q-Align (Wu et al., arXiv 2312.17090),
Qwen3.5 / Qwen3-VL / Qwen2.5-VL in Hugging Face transformers.
"""

import inspect
import json
import os
import zlib
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from data import DIMENSIONS, S_MAX, S_MIN, SCORE_MARKER
from zr_kernels import score_stats as fused_score_stats, token_logprobs

# without flash-linear-attention / causal-conv1d (CPU, or a bare GPU box) Qwen3.5's linear-attention
# layers run transformers' torch fallback, which is correct; drop the once-per-op notice about it
def _drop_fallback_notice(record):
    return "falling back to its reference PyTorch implementation" not in record.getMessage()


for _handler in __import__("transformers").utils.logging.get_logger().handlers:
    _handler.addFilter(_drop_fallback_notice)

# -----------------------------------------------------------------------------
# the rubric: bins, dimensions, prompts

BINS = tuple(S_MIN + 0.5 * i for i in range(9))  # the nine-level half-point grid from S_MIN = 1 to S_MAX = 5
BIN_TOKENS = tuple(str(i + 1) for i in range(9))  # level L <-> score 1 + (L - 1) / 2
# the prompts' version: bump whenever a word of the prompts below, or their order, changes. A checkpoint
# records the version it was trained on and keeps scoring with it; new models get the latest.
PROMPT_VERSIONS = ("zr-rubric-v1",  # the image, then the text
                   "zr-rubric-v2",  # the text, then the image
                   "zr-rubric-v3")  # the image first to reason or caption, the text first to answer in one token
PROMPT_VERSION = PROMPT_VERSIONS[-1]
CHECKPOINT_FORMAT = "zreward-score-model-v1"
GENERATOR_FORMAT = "zreward-generator-v1"  # reward_ft.py's generators: the tiny DiT, or a LoRA of a diffusers one

RUBRICS = {
    "alignment": "Rate text-image alignment: are the objects, colors, counts and positions of the prompt in the "
                 "image, and nothing else?",
    "realism": "Rate realism: is the image free of noise, blur and artifacts?",
    "aesthetics": "Rate aesthetics: are the objects well centered, the scene uncluttered and the contrast good?",
    "plausibility": "Rate physical plausibility: does every object rest on its ground, without floating or "
                    "overlapping another?",
}
INSTRUCTIONS = {
    "caption": "Describe the image.",  # the tiny world's base pretraining only: no rubric
    "direct": "Answer with one digit from 1 (worst) to 9 (best).",
    "reasoning": f"Check each item on its own line, then answer '{SCORE_MARKER} N' with one digit N from 1 (worst) "
                 "to 9 (best).",
    # the RewardDance baseline (sft.py --stage rewarddance): trained to write a rationale after the
    # score, read at the score alone
    "rewarddance": "Answer with one digit from 1 (worst) to 9 (best), then explain why.",
}
ONE_TOKEN_MODES = ("direct", "rewarddance")  # the score is the first answer token: one forward, no generation
# the modes in which each prompt version puts the text before the image (the image comes first in the rest)
TEXT_FIRST_MODES = {"zr-rubric-v1": (), "zr-rubric-v2": tuple(INSTRUCTIONS), "zr-rubric-v3": ONE_TOKEN_MODES}
assert set(RUBRICS) == set(DIMENSIONS) and BINS[-1] == S_MAX and set(TEXT_FIRST_MODES) == set(PROMPT_VERSIONS)


def rubric_messages(prompt, dimension, mode, version=PROMPT_VERSION):
    """The chat for one query: the image, and the generation prompt, the rubric and the instruction.

    Their order is the prompts' version (a checkpoint keeps its own). zr-rubric-v3, the default: a trace
    or a caption reads the image first, then the text; a one-token answer (direct, rewarddance) gets the
    text first. In a causal model, text before the image lets every image token look its part of the
    prompt up as it is read, so a one-token scorer's single forward can compare the two; a trace
    compares them on its own lines instead, and there the text first cost the tiny world's traces their
    alignment verdicts (docs/LOG.md). v1 puts the image first in every mode, v2
    the text."""
    if mode not in INSTRUCTIONS:
        raise ValueError(f"unknown prompt mode {mode!r}; expected one of {tuple(INSTRUCTIONS)}")
    if mode == "caption":
        text = INSTRUCTIONS[mode]
    elif dimension not in RUBRICS:
        raise ValueError(f"unknown dimension {dimension!r}; expected one of {DIMENSIONS}")
    else:
        text = f"Prompt: {prompt}\n{RUBRICS[dimension]}\n{INSTRUCTIONS[mode]}"
    content = [{"type": "text", "text": text}, {"type": "image"}]
    return [{"role": "user", "content": content if mode in TEXT_FIRST_MODES[version] else content[::-1]}]


# -----------------------------------------------------------------------------
# differentiable image preprocessing (torch only, so a generator's gradient reaches its pixels)

def _clamp01(x):
    """x clamped to [0, 1], with gradient 1 inside [0, 1], its end points included, and 0 outside.
    torch.clamp's gradient at the end points changed (torch 2.14 gives 0 there, 2.13 gave 1): a pixel
    of a generated image that is exactly 0 or 1 must still receive the reward's gradient."""
    return torch.where((x >= 0) & (x <= 1), x, x.clamp(0, 1).detach())


def _round_ste(x):
    """Round to the uint8 grid in the forward pass, identity in the backward pass."""
    return x + ((x * 255).round() / 255 - x).detach()


def preprocess_differentiable(images, image_processor):
    """Float images (B, 3, H, W) in [0, 1] -> (pixel_values, image_grid_thw) like Qwen's processor.

    Matches Qwen2VLImageProcessorPil exactly when no resize is needed (the tiny world's 64x64). A
    resize follows Pillow: separable antialiased bicubic (a = -0.5), one axis at a time, rounded to
    uint8 after each pass (straight-through, so the gradient is the resize's); within one uint8 level.
    """
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    ip = image_processor
    B, C, H, W = images.shape
    p, m, tp = ip.patch_size, ip.merge_size, ip.temporal_patch_size
    h, w = smart_resize(H, W, factor=p * m, min_pixels=ip.size["shortest_edge"], max_pixels=ip.size["longest_edge"])
    x = _round_ste(_clamp01(images))  # the processor sees uint8 pixels
    # Pillow resizes one axis at a time, rounding to uint8 in between, and starts with the pass
    # whose intermediate image is smaller (vertical first iff w0 * h < w * h0; measured on Pillow 13)
    sizes = [(H, w), (h, w)] if W * h >= w * H else [(h, W), (h, w)]
    for size in sizes:
        if tuple(x.shape[-2:]) != size:
            x = _round_ste(_clamp01(F.interpolate(x, size=size, mode="bicubic", antialias=True, align_corners=False)))
    mean = torch.tensor(ip.image_mean, dtype=x.dtype, device=x.device).view(1, C, 1, 1)
    std = torch.tensor(ip.image_std, dtype=x.dtype, device=x.device).view(1, C, 1, 1)
    x = (x - mean) / std
    gh, gw = h // p, w // p
    # (B, C, gh/m, m, p, gw/m, m, p) -> (B, gh/m, gw/m, m, m, C, p, p): merge-block-major patch rows
    x = x.reshape(B, C, gh // m, m, p, gw // m, m, p).permute(0, 2, 5, 3, 6, 1, 4, 7)
    # a still image is repeated over the temporal patch: (..., C, tp, p, p)
    x = x.unsqueeze(-3).expand(*x.shape[:-2], tp, p, p)
    pixel_values = x.reshape(B * gh * gw, C * tp * p * p)
    grid = torch.tensor([[1, gh, gw]] * B, dtype=torch.long, device=images.device)
    return pixel_values, grid


# -----------------------------------------------------------------------------
# the score model

@dataclass
class ScoreOutput:
    probs: torch.Tensor  # (N, K) q(s), softmax over the bin logits
    mean: torch.Tensor  # (N,) mu = sum_s s q(s), the reward (Eq. 16)
    std: torch.Tensor  # (N,) sigma
    logits: torch.Tensor  # (N, K) bin logits, fp32
    traces: list | None = None  # reasoning mode: the generated trace text per query
    valid: torch.Tensor | None = None  # reasoning mode: (N,) bool, trace reached a score token


def score_stats(logits, values):
    """probs, mu and sigma of the score distribution: zr_kernels' fused kernel on a GPU, its PyTorch
    reference on a CPU."""
    return fused_score_stats(logits, values)


def _pad(seqs, value, left):
    """Pad a list of 1-D long tensors to one (B, L) tensor, on the left or the right."""
    L = max((len(s) for s in seqs), default=0)
    out = torch.full((len(seqs), L), value, dtype=torch.long)
    for i, s in enumerate(seqs):
        if left:
            out[i, L - len(s):] = s
        else:
            out[i, :len(s)] = s
    return out


class ScoreModel(nn.Module):
    """A Hugging Face VLM plus the K-bin score head. The one class the training scripts import."""

    def __init__(self, vlm, tokenizer, image_processor, source="tiny"):
        super().__init__()
        self.vlm = vlm
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.source = source  # where the model and its processor came from, for the metadata
        self.prompt_version = PROMPT_VERSION  # a loaded checkpoint keeps the prompts it was trained on
        ids = []
        for value, tok in zip(BINS, BIN_TOKENS):
            pieces = tokenizer.encode(tok, add_special_tokens=False)
            if len(pieces) != 1:
                raise ValueError(f"bin {value} (token {tok!r}) is not a single token in this tokenizer: it encodes "
                                 f"to {len(pieces)} tokens {tokenizer.convert_ids_to_tokens(pieces)}")
            if tokenizer.decode(pieces).strip() != tok:  # e.g. an unknown-token fallback
                raise ValueError(f"bin {value} (token {tok!r}) is not in this tokenizer's vocabulary: it encodes "
                                 f"to {tokenizer.convert_ids_to_tokens(pieces)}")
            ids.append(pieces[0])
        if len(set(ids)) != len(ids):
            raise ValueError(f"bin tokens {BIN_TOKENS} do not map to distinct token ids: {ids}")
        self.register_buffer("bin_ids", torch.tensor(ids, dtype=torch.long), persistent=False)
        self.register_buffer("bin_values", torch.tensor(BINS, dtype=torch.float32), persistent=False)
        self.image_token_id = tokenizer.convert_tokens_to_ids("<|image_pad|>")
        # tokens that only the processor may place: a generated one would be read as an image slot
        self.vision_token_ids = sorted({tokenizer.convert_tokens_to_ids(t) for t in
                                        ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")}
                                       - {tokenizer.unk_token_id, None})
        self.synced = False  # generate: every rank steps until all are done (common.rollout_mode, layerwise)
        self.stop_ids = sorted({tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")}
                               | ({tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()))
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.stop_ids[0]
        # Qwen2.5-VL takes no mm_token_type_ids; Qwen3-VL and Qwen3.5 require them with images
        self._takes_mm_types = "mm_token_type_ids" in inspect.signature(vlm.model.forward).parameters

    # --- constructors ------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, name_or_path, dtype=None, **kwargs):
        """Any local HF folder or hub id of a Qwen3.5 / Qwen3-VL / Qwen2.5-VL image-text-to-text model."""
        from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer
        from transformers.utils import logging as hf_logging

        # weights that do not fit the config (another model's, in the same folder) would be logged as
        # a table of every tensor and re-initialized or raised as a RuntimeError: ask for the report
        # instead, with transformers' own log quiet, and refuse the folder in one line
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:
            vlm, info = AutoModelForImageTextToText.from_pretrained(
                name_or_path, dtype=dtype, ignore_mismatched_sizes=True, output_loading_info=True, **kwargs)
        finally:
            hf_logging.set_verbosity(verbosity)
        check_loaded(vlm, info, name_or_path)
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
        image_processor = AutoImageProcessor.from_pretrained(name_or_path, backend="pil")
        return cls(vlm.eval(), tokenizer, image_processor, source=str(name_or_path))

    @classmethod
    def load(cls, path, like=None, dtype=None):
        """Rebuild a saved score model offline from its safetensors file alone.

        Refuses, with the reason, a file that is not a Z-Reward checkpoint, one written with another
        bin set, and (when `like` is given) one whose architecture or config differs from `like`'s.
        """
        meta, tensors = read_checkpoint(path)
        check_compatible(meta, path, like)
        model = cls.from_metadata(meta)
        load_weights(model.vlm, tensors, path)
        if dtype is not None:
            model.vlm.to(dtype)
        return model

    @classmethod
    def from_metadata(cls, meta):
        """The score model a checkpoint's metadata describes (HF config, tokenizer, image processor),
        its parameters on the meta device: load fills them from the file, common.build_on_meta rank by
        rank from a shard of it."""
        from transformers import AutoConfig, AutoModelForImageTextToText

        cfg = json.loads(meta["hf_config"])
        config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
        with params_on_meta():
            vlm = AutoModelForImageTextToText.from_config(config)
        model = cls(vlm.eval(), _tokenizer_from_meta(meta), _image_processor_from_meta(meta), source=meta["source"])
        model.metadata, model.prompt_version = meta, meta["prompt_version"]
        return model

    def save(self, path, **extra):
        """Write weights + metadata to one safetensors file, atomically (temp file, then rename).

        `extra` (training flags, step, metrics) is stored as JSON under its own keys.
        """
        state = {k: v.detach().to("cpu").contiguous() for k, v in self.vlm.state_dict().items()}
        write_checkpoint(path, dedupe_tied(state), self.metadata_dict(**extra))

    def metadata_dict(self, **extra):
        tok_json = self.tokenizer.backend_tokenizer.to_str()
        special = {k: getattr(self.tokenizer, k) for k in ("eos_token", "pad_token", "unk_token", "bos_token")}
        meta = {
            "format": CHECKPOINT_FORMAT,
            "architecture": type(self.vlm).__name__,
            "hf_config": self.vlm.config.to_json_string(use_diff=False),
            "bins": json.dumps(list(BINS)),
            "bin_tokens": json.dumps(list(BIN_TOKENS)),
            "prompt_version": self.prompt_version,
            "source": self.source,
            "tokenizer": tok_json,
            "tokenizer_special": json.dumps(special),
            "chat_template": self.tokenizer.chat_template or "",
            "image_processor": json.dumps({"class": type(self.image_processor).__name__,
                                           **_image_processor_settings(self.image_processor)}),
        }
        for k, v in extra.items():
            meta[k] = v if isinstance(v, str) else json.dumps(v)
        return meta

    # --- inputs ------------------------------------------------------------------------------

    @property
    def device(self):
        return self.bin_ids.device

    def prompt_text(self, prompt, dimension, mode):
        """The chat text up to the answer, with one <|image_pad|> per image (expanded in encode)."""
        kwargs = {"enable_thinking": mode == "reasoning"}  # Qwen3.5 templates; ignored by the tiny one
        messages = rubric_messages(prompt, dimension, mode, self.prompt_version)
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **kwargs)

    def pixels(self, images):
        """PIL images / paths -> (pixel_values, image_grid_thw); a float tensor goes the differentiable way."""
        if torch.is_tensor(images):
            return preprocess_differentiable(images.to(self.device), self.image_processor)
        pil = []
        for im in images:
            if isinstance(im, (str, os.PathLike)):
                if not os.path.exists(im):
                    raise FileNotFoundError(f"image not found: {im}")
                im = Image.open(im)
            pil.append(im.convert("RGB"))
        out = self.image_processor(images=pil, return_tensors="pt")
        return out["pixel_values"].to(self.device), out["image_grid_thw"].to(self.device)

    def encode(self, prompts, images, dimensions, mode="direct", completions=None):
        """Build a batch: left-padded prompts, then (optionally) right-padded completions.

        prompts, dimensions: lists of N strings (a single dimension string is broadcast);
        images: N PIL images or paths, or a float tensor (N, 3, H, W) in [0, 1];
        completions: N strings or lists of token ids appended after the prompt (teacher forcing).
        Returns a dict of model inputs plus `prompt_len` (the padded prompt length Lp): the logits
        at position Lp - 1 predict the first answer token, the direct-mode score token.
        """
        N = len(prompts)
        if isinstance(dimensions, str):
            dimensions = [dimensions] * N
        pixel_values, grid = self.pixels(images)
        merge = self.image_processor.merge_size
        pad_tok = "<|image_pad|>"
        seqs = []
        for i in range(N):
            text = self.prompt_text(prompts[i], dimensions[i], mode)
            n_img = int(grid[i].prod()) // merge ** 2
            if text.count(pad_tok) != 1:
                raise ValueError(f"chat template produced {text.count(pad_tok)} image placeholders, expected 1")
            ids = self.tokenizer.encode(text.replace(pad_tok, pad_tok * n_img), add_special_tokens=False)
            seqs.append(torch.tensor(ids, dtype=torch.long))
        input_ids = _pad(seqs, self.pad_id, left=True)
        attention_mask = _pad([torch.ones_like(s) for s in seqs], 0, left=True)
        Lp = input_ids.shape[1]
        if completions is not None:
            comp = [torch.tensor(c if not isinstance(c, str) else self.tokenizer.encode(c, add_special_tokens=False),
                                 dtype=torch.long) for c in completions]
            for i, c in enumerate(comp):
                if torch.isin(c, torch.tensor(self.vision_token_ids)).any():
                    raise ValueError(f"completion {i} contains an image placeholder token; "
                                     "it would be read as an image slot")
            input_ids = torch.cat([input_ids, _pad(comp, self.pad_id, left=False)], 1)
            attention_mask = torch.cat([attention_mask, _pad([torch.ones_like(c) for c in comp], 0, left=False)], 1)
        batch = {"input_ids": input_ids.to(self.device), "attention_mask": attention_mask.to(self.device),
                 "pixel_values": pixel_values.to(self.vlm.dtype), "image_grid_thw": grid, "prompt_len": Lp}
        if self._takes_mm_types:
            batch["mm_token_type_ids"] = (batch["input_ids"] == self.image_token_id).int()
        return batch

    def _model_inputs(self, batch):
        return {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "pixel_values",
                                                          "image_grid_thw", "mm_token_type_ids")}

    # --- forward: hidden states, score head, token log-probs -----------------------------------

    def vision_tower(self):
        """The VLM's image encoder (Qwen-VL family: model.visual)."""
        return self.vlm.model.visual

    def bin_weight(self):
        """The K rows of the LM head for the bin tokens: (K, D)."""
        return self.vlm.get_output_embeddings().weight[self.bin_ids]

    def score_logits(self, hidden, weight=None, bias=None):
        """hidden (N, D) at score positions -> bin logits (N, K) in fp32, never the full vocabulary.
        weight / bias: the LM head's (forward passes the ones it gathered), else the module's own."""
        if weight is None:
            head = self.vlm.get_output_embeddings()
            weight, bias = head.weight, getattr(head, "bias", None)
        logits = hidden.float() @ weight[self.bin_ids].float().T
        if bias is not None:
            logits = logits + bias[self.bin_ids].float()
        return logits

    def forward(self, batch, score_index, targets=None, temperature=1.0, score_targets=None):
        """One teacher-forced pass.

        score_index: (B,) sequence positions whose hidden state predicts the score token.
        targets: optional (B, L) next-token ids aligned with positions (-100 = ignore): the
        log-probs log pi(targets[b, t] | prefix up to t) come back as `token_logprobs` (B, L),
        computed by the fused linear kernel without the (B, L, V) logits.
        score_targets: optional (B,) token ids whose full-vocabulary log-prob at the score
        position comes back as `score_target_logprob` (gdso.py's L_pt).
        Returns a dict with `score_logits` (B, K) and, with targets, `token_logprobs`.
        Keeping everything inside forward lets DDP / FSDP2 hooks see every parameter use; the LM
        head's weight is used in one call (heads), which FSDP2 gathers when the head is a unit of
        its own (common.wrap, untied models).
        """
        hidden = self.vlm.model(**self._model_inputs(batch), use_cache=False).last_hidden_state  # (B, L, D)
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        h_score = hidden[rows, score_index]  # (B, D)
        keep = targets != -100 if targets is not None else None
        h_tokens = hidden[keep] if targets is not None else None
        score_logits, score_target_logprob, logprobs = self.with_head(
            self._heads, h_score, h_tokens, targets[keep] if targets is not None else None, score_targets, temperature)
        out = {"score_logits": score_logits}
        if score_targets is not None:
            out["score_target_logprob"] = score_target_logprob
        if targets is not None:
            lp = torch.zeros(targets.shape, dtype=torch.float32, device=hidden.device)
            lp[keep] = logprobs
            out["token_logprobs"] = lp
        return out

    def _heads(self, weight, bias, h_score, h_tokens, token_targets, score_targets, temperature):
        """What forward reads off the LM head: the bin logits at the score positions; log p of
        `score_targets` against the whole vocabulary there (the bin distribution's log q plus log
        P(the token is a bin at all)); the trace tokens' log-probs at `temperature`."""
        score_logits = self.score_logits(h_score, weight, bias)
        score_lp = token_logprobs(h_score, weight, score_targets) if score_targets is not None else None
        logprobs = (token_logprobs(h_tokens, weight, token_targets, temperature=temperature)
                    if token_targets is not None else None)
        return score_logits, score_lp, logprobs

    def with_head(self, fn, *args):
        """fn(weight, bias, *args) on the LM head's parameters. Where common.wrap made the head an
        FSDP2 unit of its own, through the method it registered (`apply_head`), so that FSDP2 gathers
        the head for the call and reduces its gradient; else on the module's parameters."""
        head = self.vlm.get_output_embeddings()
        apply = getattr(head, "apply_head", None)
        if apply is not None:
            return apply(fn, *args)
        return fn(head.weight, getattr(head, "bias", None), *args)

    def completion_targets(self, batch, completions):
        """(B, L) next-token targets for teacher forcing: -100 except where a completion token is next.

        Position Lp - 1 + j predicts the j-th completion token (Lp = padded prompt length), so
        prompt and padding tokens never carry loss or policy gradient.
        """
        ids, Lp = batch["input_ids"], batch["prompt_len"]
        targets = torch.full_like(ids, -100)
        for b, c in enumerate(completions):
            targets[b, Lp - 1:Lp - 1 + len(c)] = ids[b, Lp:Lp + len(c)]
        return targets

    def distribution(self, score_logits):
        probs, mu, sigma = score_stats(score_logits, self.bin_values)
        return ScoreOutput(probs=probs, mean=mu, std=sigma, logits=score_logits)

    # --- scoring -----------------------------------------------------------------------------

    def score(self, prompts, images, dimension, mode="direct", batch_size=None, max_new_tokens=64,
              temperature=0.0):
        """Score N (prompt, image) pairs on one dimension (or a list of N dimensions).

        direct (and rewarddance): one forward, the score token read at the end of the prompt.
        reasoning: generate a trace (greedy unless temperature > 0), then read the distribution at
        the score token after the last "Score:"; a trace without one is marked invalid and scored
        at the end of the trace. Gradients flow when grad mode is on (direct mode).
        """
        N = len(prompts)
        dims = [dimension] * N if isinstance(dimension, str) else list(dimension)
        bs = batch_size or N
        outs = []
        for a in range(0, N, bs):
            sl = slice(a, a + bs)
            if mode in ONE_TOKEN_MODES:
                batch = self.encode(prompts[sl], images[sl], dims[sl], mode)
                idx = torch.full((batch["input_ids"].shape[0],), batch["prompt_len"] - 1, device=self.device)
                outs.append(self.distribution(self(batch, idx)["score_logits"]))
            else:
                outs.append(self.score_with_reasoning(prompts[sl], images[sl], dims[sl], max_new_tokens, temperature))

        def cat(name):
            if not outs or getattr(outs[0], name) is None:
                return None
            return torch.cat([getattr(o, name) for o in outs])

        traces = sum((o.traces for o in outs), []) if mode not in ONE_TOKEN_MODES else None
        return ScoreOutput(probs=cat("probs"), mean=cat("mean"), std=cat("std"), logits=cat("logits"),
                           traces=traces, valid=cat("valid"))

    @torch.no_grad()
    def generate(self, batch, max_new_tokens=64, temperature=1.0, top_p=1.0):
        """Sample completions with the KV cache; returns a list of token-id lists, cut after a stop token.

        Samples from exactly softmax(logits / temperature) (greedy at temperature 0), whatever the
        checkpoint's generation_config asks for: its repetition penalty, top-k, top-p or min-p
        would make the rollouts come from another policy than the one whose log-probs training
        recomputes. Only the image placeholder tokens are suppressed (a generated one would be
        read as an image slot), and top_p < 1 only when a caller asks for it.
        """
        from transformers import GenerationConfig

        sample = temperature > 0
        pinned = dict(do_sample=False, repetition_penalty=1.0, no_repeat_ngram_size=0, num_beams=1)
        if sample:  # the warpers apply only when sampling; top_k 0 turns top-k off (None would mean "the default", 50)
            pinned.update(do_sample=True, temperature=temperature, top_k=0, top_p=top_p, typical_p=1.0)
        saved, self.vlm.generation_config = self.vlm.generation_config, GenerationConfig()  # nothing inherited
        try:
            out = self.vlm.generate(**self._model_inputs(batch), max_new_tokens=max_new_tokens,
                                    eos_token_id=self.stop_ids, pad_token_id=self.pad_id,
                                    suppress_tokens=self.vision_token_ids, synced_gpus=self.synced, **pinned)
        finally:
            self.vlm.generation_config = saved
        comps = []
        for row in out[:, batch["input_ids"].shape[1]:].tolist():
            cut = next((i + 1 for i, t in enumerate(row) if t in self.stop_ids), len(row))
            comps.append(row[:cut])
        return comps

    def find_score_index(self, completion):
        """Index in `completion` (token ids) of the bin token after the last "Score:", or -1.

        Searching backward over bin tokens only and decoding a short window keeps this cheap for
        long traces, and works whatever tokens the marker was split into.
        """
        bins = set(self.bin_ids.tolist())
        for i in range(len(completion) - 1, -1, -1):
            if completion[i] in bins:
                before = self.tokenizer.decode(completion[max(0, i - 8):i], skip_special_tokens=False)
                if before.rstrip().endswith(SCORE_MARKER):
                    return i
        return -1

    def score_positions(self, batch, completions):
        """Where q is read in a teacher-forced batch of traces: the position whose hidden state predicts
        each trace's score token (one before it), (B,), and which traces have one, (B,) bool. A trace
        without a score is read at its last token, so the output stays defined (callers mask it)."""
        at = [self.find_score_index(c) for c in completions]
        idx = [batch["prompt_len"] + (a if a >= 0 else len(c)) - 1 for a, c in zip(at, completions)]
        return (torch.tensor(idx, device=batch["input_ids"].device),
                torch.tensor([a >= 0 for a in at], device=batch["input_ids"].device))

    def parsed_score(self, completion):
        """The score the trace's text states (the parse-text ablation), or None if it has none."""
        i = self.find_score_index(completion)
        return None if i < 0 else BINS[self.bin_ids.tolist().index(completion[i])]

    def score_with_reasoning(self, prompts, images, dims, max_new_tokens=64, temperature=0.0, completions=None):
        """Generate traces (unless given), then read q at each trace's score token, teacher-forced."""
        if completions is None:
            was_training = self.training
            self.eval()
            completions = self.generate(self.encode(prompts, images, dims, "reasoning"), max_new_tokens, temperature)
            self.train(was_training)
        batch = self.encode(prompts, images, dims, "reasoning", completions=completions)
        idx, valid = self.score_positions(batch, completions)
        out = self.distribution(self(batch, idx)["score_logits"])
        out.traces = [self.tokenizer.decode(c, skip_special_tokens=True) for c in completions]
        out.valid = valid
        return out


# -----------------------------------------------------------------------------
# checkpoints: one safetensors file, weights plus JSON metadata

def _image_processor_settings(ip):
    keys = ("patch_size", "merge_size", "temporal_patch_size", "image_mean", "image_std", "size", "resample",
            "do_resize", "do_rescale", "rescale_factor", "do_normalize", "do_convert_rgb")
    out = {}
    for k in keys:
        v = getattr(ip, k, None)
        if v is not None:
            if k == "size":  # a SizeDict: keep the set fields
                v = {kk: getattr(v, kk) for kk in ("shortest_edge", "longest_edge", "height", "width")
                     if getattr(v, kk, None) is not None}
            out[k] = list(v) if isinstance(v, tuple) else v
    return out


def _image_processor_from_meta(meta):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    settings = json.loads(meta["image_processor"])
    settings.pop("class", None)
    return Qwen2VLImageProcessorPil(**settings)


def _tokenizer_from_meta(meta):
    from tokenizers import Tokenizer
    from transformers.tokenization_utils_tokenizers import TokenizersBackend

    special = {k: v for k, v in json.loads(meta["tokenizer_special"]).items() if v is not None}
    backend = Tokenizer.from_str(meta["tokenizer"])
    # the tiny tokenizer is a Qwen3.5 one; a loaded HF tokenizer keeps its own pipeline as saved
    tok = TokenizersBackend(tokenizer_object=backend, **special)
    tok.chat_template = meta.get("chat_template") or None
    return tok


def dedupe_tied(state):
    """safetensors refuses aliased tensors: keep the first name of each shared storage."""
    seen, out = set(), {}
    for k, v in state.items():
        key = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape))
        if key in seen:
            continue
        seen.add(key)
        out[k] = v
    return out


def checksum(tensors):
    """CRC-32 of every tensor's name, dtype, shape and raw bytes, in name order: 'crc32:XXXXXXXX'.

    Bytes overwritten in place keep a file's size and header and, when the garbage is finite, pass the
    NaN / inf check of read_checkpoint; the checksum catches them. CRC-32 because it is cheap (zlib
    reads ~2.7 GB/s on one core here: ~1 ms for the tiny model, ~20 s for 54 GB) and the corruption it
    guards against is an accident, not an attack."""
    crc = 0
    for name in sorted(tensors):
        crc = _crc(name, tensors[name], crc)
    return f"crc32:{crc:08x}"


def _crc(name, t, crc):
    crc = zlib.crc32(f"{name}|{t.dtype}|{tuple(t.shape)}".encode(), crc)
    return zlib.crc32(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy(), crc)


def _check_checksum(path, meta, tensors):
    """A ValueError naming the file when it records a checksum that its tensors do not give (a file
    written before checksums existed, such as the shipped assets/*.safetensors, has none and passes)."""
    want = meta.get("checksum")
    if want is not None and (now := checksum(tensors)) != want:
        raise ValueError(f"{path}: the tensors do not match the checksum written with them ({want}, now "
                         f"{now}): the file was changed or corrupted after it was saved")


def verify_checksum(path):
    """read_checkpoint's checksum check without keeping the tensors (one tensor in memory at a time)."""
    with safe_open(os.fspath(path), framework="pt") as f:
        meta = f.metadata() or {}
        if "checksum" not in meta:
            return
        crc = 0
        for name in sorted(f.keys()):
            crc = _crc(name, f.get_tensor(name), crc)
    if f"crc32:{crc:08x}" != meta["checksum"]:
        raise ValueError(f"{path}: the tensors do not match the checksum written with them ({meta['checksum']}, "
                         f"now crc32:{crc:08x}): the file was changed or corrupted after it was saved")


def write_checkpoint(path, tensors, metadata):
    """Atomic write: a crash mid-save never leaves a truncated checkpoint under `path`. The tensors'
    checksum goes into the metadata (read_checkpoint verifies it)."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    metadata = {**{k: str(v) for k, v in metadata.items()}, "checksum": checksum(tensors)}
    save_file(tensors, tmp, metadata=metadata)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # the temp file was private; the checkpoint is a normal file
    os.replace(tmp, path)


SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64",
                      torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                      torch.uint8: "U8", torch.bool: "BOOL"}


class StreamedCheckpoint:
    """A checkpoint written one tensor at a time (common.save_checkpoint under FSDP2: each tensor is
    gathered, written and dropped, so no process holds the whole model). The same file as
    write_checkpoint's: the safetensors layout, the metadata, the checksum.

    The header comes first in a safetensors file and holds every tensor's byte range, which the
    shapes and dtypes fix in advance; the checksum is known only at the end, so the header is written
    with a placeholder of the same length and rewritten in place by close(). Tensors must come in
    name order (the checksum's order). Written to a temp name, renamed by close()."""

    def __init__(self, path, specs, metadata):
        """specs: {name: (dtype, shape)}."""
        self.path, self.tmp = os.fspath(path), f"{os.fspath(path)}.tmp-{os.getpid()}"
        self.names, self.specs, self.crc, self.next = sorted(specs), specs, 0, 0
        self.metadata = {**{k: str(v) for k, v in metadata.items()}, "checksum": "crc32:00000000"}
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        self.file = open(self.tmp, "wb")
        self.header_len = len(self._header())
        self.file.write(self._header())

    def _header(self):
        entries, offset = {"__metadata__": self.metadata}, 0
        for name in self.names:
            dtype, shape = self.specs[name]
            size = int(torch.Size(shape).numel()) * torch.empty((), dtype=dtype).element_size()
            entries[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
            offset += size
        text = json.dumps(entries, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as safetensors writes it
        return len(text).to_bytes(8, "little") + text

    def add(self, name, tensor):
        want = self.names[self.next]
        if name != want or tensor.dtype != self.specs[name][0] or tuple(tensor.shape) != tuple(self.specs[name][1]):
            raise ValueError(f"{self.path}: expected tensor {want} {self.specs[want]}, got {name} "
                             f"{tensor.dtype} {tuple(tensor.shape)}")
        self.crc = _crc(name, tensor, self.crc)
        self.file.write(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        self.next += 1

    def close(self):
        if self.next != len(self.names):
            raise ValueError(f"{self.path}: {len(self.names) - self.next} tensors were not written")
        self.metadata["checksum"] = f"crc32:{self.crc:08x}"
        header = self._header()
        assert len(header) == self.header_len
        self.file.seek(0)
        self.file.write(header)
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(self.tmp, 0o666 & ~umask)
        os.replace(self.tmp, self.path)


def read_checkpoint(path):
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors' own error type: a truncated or foreign file
        raise ValueError(f"{path}: not a readable .safetensors file (truncated or corrupt?): {e}") from None
    # bytes overwritten in place keep the size and the header: the checksum (files written since it
    # exists), then NaN / inf weights (the usual trace of garbage, in older files too)
    _check_checksum(path, meta, tensors)
    for k, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ValueError(f"{path}: tensor {k} holds {int((~torch.isfinite(t)).sum())} non-finite values "
                             f"(a corrupt file, or a run that diverged)")
    return meta, tensors


def check_compatible(meta, path, like=None, like_name=None):
    """Raise a ValueError that names the mismatch between a checkpoint and what is expected (`like`, a
    model; `like_name`, where it came from, for the message)."""
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a Z-Reward score-model checkpoint (format {meta.get('format')!r}, "
                         f"expected {CHECKPOINT_FORMAT!r})")
    bins = json.loads(meta["bins"])
    if tuple(bins) != BINS or tuple(json.loads(meta["bin_tokens"])) != BIN_TOKENS:
        raise ValueError(f"{path} was written with bins {bins} / tokens {meta['bin_tokens']}, "
                         f"this code uses {list(BINS)} / {list(BIN_TOKENS)}")
    if meta.get("prompt_version") not in PROMPT_VERSIONS:
        raise ValueError(f"{path} was trained on the prompts {meta.get('prompt_version')!r}, which this code does "
                         f"not know (it knows {', '.join(PROMPT_VERSIONS)}): use the code it was written with")
    if like is not None:
        ours_name = f" of {like_name}" if like_name else ""
        if meta["architecture"] != type(like.vlm).__name__:
            raise ValueError(f"{path} holds a {meta['architecture']}, expected a {type(like.vlm).__name__}{ours_name}")
        theirs, ours = json.loads(meta["hf_config"]), json.loads(like.vlm.config.to_json_string(use_diff=False))
        diff = sorted(k for k in set(theirs) | set(ours)
                      if k not in ("transformers_version", "dtype", "torch_dtype") and theirs.get(k) != ours.get(k))
        if diff:
            raise ValueError(f"{path} holds a model with another config than the {type(like.vlm).__name__}"
                             f"{ours_name} (differs in {diff})")


@contextmanager
def params_on_meta():
    """Build a module with its parameters on the meta device and its buffers real.

    The weights come from the checkpoint anyway, so this skips allocating and initializing them
    (minutes and 100+ GB for a 27B model), while non-persistent buffers such as rotary tables,
    which are computed at construction and not saved, are built as usual. The init draws are thrown
    away too, so the caller's CPU RNG stream does not move (a run's noise must not depend on what
    it loads).
    """
    register = nn.Module.register_parameter

    def to_meta(module, name, param):
        register(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = to_meta
    try:
        with torch.random.fork_rng(devices=[]):
            yield
    finally:
        nn.Module.register_parameter = register


def load_weights(vlm, tensors, path, assign=True):
    """The file's tensors into `vlm`, the one weights-loading path of the repository (common.load_weights
    calls it for a model that is not sharded). assign=True (building from a file) makes the tensors
    the parameters; assign=False (a model already wrapped for training) copies into them. Only a tied
    LM head may be absent from the file; anything else missing or unexpected is a ValueError."""
    shapes = {k: tuple(v.shape) for k, v in vlm.state_dict().items()}
    wrong = [k for k, t in tensors.items() if k in shapes and tuple(t.shape) != shapes[k]]
    if wrong:  # load_state_dict would raise a RuntimeError listing every tensor
        k = wrong[0]
        raise ValueError(f"{path}: weights do not fit this {type(vlm).__name__}: {len(wrong)} tensors differ in "
                         f"shape (first: {k} is {list(tensors[k].shape)} in the file, {list(shapes[k])} in the model)")
    missing, unexpected = vlm.load_state_dict(tensors, strict=False, assign=assign)
    vlm.tie_weights()
    missing = [k for k in missing if "lm_head" not in k or _param(vlm, k).device.type == "meta"]
    if missing or unexpected:
        raise ValueError(f"{path}: weights do not fit this model (missing {missing[:5]}, unexpected {unexpected[:5]})")


def check_loaded(vlm, info, source):
    """A ValueError, one line, when from_pretrained's loading report (output_loading_info) shows
    weights that do not fit the folder's config: tensors of another shape (another model's weights),
    or parameters the files do not hold (they would keep a random init). Unexpected extra tensors
    (e.g. a multi-token-prediction head the class does not build) are ignored, as transformers does."""
    wrong = sorted(info.get("mismatched_keys") or [])
    missing = sorted(info.get("missing_keys") or [])
    if wrong:
        k, file_shape, model_shape = wrong[0]
        raise ValueError(f"{source}: its weights are not the {type(vlm).__name__} its config.json describes: "
                         f"{len(wrong)} tensors differ in shape (first: {k} is {list(file_shape)} in the weights, "
                         f"{list(model_shape)} in the config); another model's weights?")
    if missing:
        raise ValueError(f"{source}: its weight files lack {len(missing)} parameters of the {type(vlm).__name__} "
                         f"its config.json describes (first: {missing[0]}); another model's weights?")


def _param(module, name):
    *path, leaf = name.split(".")
    for p in path:
        module = getattr(module, p)
    return getattr(module, leaf)
