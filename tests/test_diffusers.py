"""
Tests for reward_ft.py's real-generator path (DiffusersGenerator: a diffusers pipeline with a peft
LoRA), offline, on tiny random SD3, FLUX and Z-Image pipelines.

Run: OMP_NUM_THREADS=1 python -m pytest tests/test_diffusers.py -q   (well under a minute on 2 CPU cores)
     python -m pytest tests/test_diffusers.py -q -m slow             # the 2-rank torchrun run too
Skipped, saying so, where diffusers or peft is missing (they are optional: `make test` installs them).
`python tests/test_diffusers.py runs/tiny-pipelines` writes the three pipelines to try the script on.

No weights can be downloaded, so each family is built from small configs with random weights and
tokenizers made in code (CLIP: a byte-level BPE vocabulary; T5: a Unigram vocabulary; Z-Image's
Qwen3 encoder: the tiny world's tokenizer), saved with save_pretrained and loaded through
`--generator FOLDER`, the path a user takes. Per family: a no-grad rollout equals the pipeline's own
sampler (no guidance, the same initial latents and steps), which checks latent packing, timestep
convention, velocity sign and VAE scaling; the frozen starting generator and a --baseline LoRA
generate; one optimizer step moves the LoRA's B and nothing else; the regulariser is exactly 0 at
the start; reward_ft.py runs end to end (training, GSB evaluation, grid), resumes exactly (LoRA and
optimizer), writes only the adapter plus the base's identity, refuses another base, and runs --bf16.
What only a real checkpoint can show (image quality, whether GSB rises) is not tested here.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("diffusers", reason="diffusers is optional (only reward_ft.py --generator FOLDER needs it): pip install diffusers peft")
pytest.importorskip("peft", reason="peft is optional (only reward_ft.py --generator FOLDER needs it): pip install diffusers peft")

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
from tiny_world import make_world  # noqa: E402
import tiny_world  # noqa: E402
import reward_ft  # noqa: E402
from common import newest_set  # noqa: E402
from reward_ft import DiffusersGenerator, Rollout, reward  # noqa: E402

FAMILIES = ["sd3", "flux", "zimage"]
PROMPTS = ["a red circle top left", "a blue square bottom right and a green cross top right"]
WEIGHTS = {"alignment": 1.0, "realism": 1.0}
RES = 32  # pixels: 16x16 latents (VAE factor 2), 8x8 tokens after the 2x2 patches

# -----------------------------------------------------------------------------
# tiny random pipelines, built from configs with tokenizers made in code


def clip_tokenizer():
    """CLIP's tokenizer over a byte-level vocabulary without merges: every byte, alone and word-final."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTokenizer

    chars = sorted(ByteLevel.alphabet())
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for piece in chars + [c + "</w>" for c in chars]:
        vocab[piece] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def t5_tokenizer():
    """T5's tokenizer over a Unigram vocabulary of letters, word-initial letters and a few words."""
    from transformers import T5Tokenizer

    letters = "abcdefghijklmnopqrstuvwxyz"
    words = sorted({w for p in PROMPTS for w in p.split()})
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -3.0)]
    pieces += [(c, -4.0) for c in letters] + [("\u2581" + c, -3.5) for c in letters] + [("\u2581" + w, -2.0) for w in words]
    return T5Tokenizer(vocab=pieces, extra_ids=0)


def clip_encoder(cls, vocab, width=16):
    from transformers import CLIPTextConfig

    return cls(CLIPTextConfig(vocab_size=vocab, hidden_size=width, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2,
                              projection_dim=width, max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1))


def t5_encoder(vocab, width=32):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=vocab, d_model=width, d_kv=8, d_ff=24, num_layers=1, num_heads=2,
                                   relative_attention_num_buckets=8))


def vae(channels=4):
    from diffusers import AutoencoderKL

    # two levels: a VAE factor of 2, so decoding really rescales; scale and shift as real VAEs have them
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
                         up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=[8, 16], layers_per_block=1,
                         latent_channels=channels, norm_num_groups=4, sample_size=RES, scaling_factor=1.5, shift_factor=0.06)


def tiny_pipeline(family, seed=0):
    """A random pipeline of one family, a few thousand to a few hundred thousand parameters."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    torch.manual_seed(seed)
    if family == "sd3":
        from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline
        from transformers import CLIPTextModelWithProjection

        tok, tok3 = clip_tokenizer(), t5_tokenizer()
        # two CLIPs (pooled: 2 x 16) and T5 (32 wide, the CLIPs' hidden states padded to it)
        return StableDiffusion3Pipeline(
            transformer=SD3Transformer2DModel(sample_size=RES // 2, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
                                              attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
                                              caption_projection_dim=16, pooled_projection_dim=32, pos_embed_max_size=16),
            vae=vae(), scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
            text_encoder=clip_encoder(CLIPTextModelWithProjection, len(tok)), tokenizer=tok,
            text_encoder_2=clip_encoder(CLIPTextModelWithProjection, len(tok)), tokenizer_2=clip_tokenizer(),
            text_encoder_3=t5_encoder(len(tok3)), tokenizer_3=tok3)
    if family == "flux":
        from diffusers import FluxPipeline, FluxTransformer2DModel
        from transformers import CLIPTextModel

        tok, tok2 = clip_tokenizer(), t5_tokenizer()
        # FLUX.1-dev's shape: the guidance embedding, resolution-dependent shift, 2x2-packed latents (4 x 4 channels)
        return FluxPipeline(
            transformer=FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
                                               num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16,
                                               guidance_embeds=True, axes_dims_rope=[4, 6, 6]),
            vae=vae(), scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                                 base_image_seq_len=256, max_image_seq_len=4096),
            text_encoder=clip_encoder(CLIPTextModel, len(tok)), tokenizer=tok, text_encoder_2=t5_encoder(len(tok2)), tokenizer_2=tok2)
    if family == "zimage":
        from diffusers import ZImagePipeline, ZImageTransformer2DModel
        from transformers import Qwen3Config, Qwen3Model

        from tiny_world import build_tiny_tokenizer

        tok = build_tiny_tokenizer()  # a Qwen tokenizer with a ChatML template, as Z-Image's prompt encoding needs
        transformer = ZImageTransformer2DModel(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=32, n_layers=2,
                                               n_refiner_layers=1, n_heads=2, n_kv_heads=2, qk_norm=True, cap_feat_dim=16,
                                               rope_theta=256.0, axes_dims=[8, 4, 4], axes_lens=[256, 32, 32])
        with torch.no_grad():  # the padding tokens are created with torch.empty: give them values
            transformer.x_pad_token.normal_()
            transformer.cap_pad_token.normal_()
        encoder = Qwen3Model(Qwen3Config(vocab_size=len(tok), hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=2, head_dim=8, max_position_embeddings=1024))
        return ZImagePipeline(transformer=transformer, vae=vae(), scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                              text_encoder=encoder, tokenizer=tok)
    raise ValueError(family)


def save_tiny_pipeline(family, folder, seed=0):
    tiny_pipeline(family, seed).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipelines")
    return {f: save_tiny_pipeline(f, root / f) for f in FAMILIES}


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param


@pytest.fixture(scope="module")
def student():
    return tiny_world.tiny_score_model(seed=0).eval().requires_grad_(False)


@pytest.fixture(scope="module")
def files(tmp_path_factory, student):
    """The world's prompts and a student file, as the script reads them."""
    root = tmp_path_factory.mktemp("files")
    make_world(str(root / "world"), n=10, seed=0)
    student.save(str(root / "student.safetensors"), mode="direct")
    return {"world": str(root / "world"), "student": str(root / "student.safetensors")}


def build(folder, dtype=torch.float32, rank=4):
    return DiffusersGenerator(folder, lora_rank=rank, resolution=RES, dtype=dtype)


def perturb_lora(gen, seed=1, scale=0.2):
    """Give the LoRA's B (zero at the start) values, as training would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in gen.named_parameters():
            if "lora_B" in name:
                p.add_(scale * torch.randn(p.shape, generator=g))


def noise_for(gen, n=2, seed=0):
    return torch.randn(n, *gen.latent_shape, generator=torch.Generator().manual_seed(seed))


# -----------------------------------------------------------------------------
# the frozen copy, the rollout against the pipeline's own sampler


def test_frozen_copy_generates(folders, family):
    # the grid and the GSB evaluation generate with the frozen starting generator: it needs the
    # whole interface (before the fix it had neither encode nor decode and the script crashed)
    gen = build(folders[family])
    ref = gen.frozen_copy()
    images = reward_ft.generate(ref, PROMPTS, noise_for(gen), ref.sigmas(2))
    assert images.shape == (2, 3, RES, RES) and torch.isfinite(images).all()
    assert images.min() >= 0 and images.max() <= 1 and images.std() > 0


def pipeline_images(pipe, family, noise, steps):
    """The pipeline's own __call__ without guidance, from the given initial latents, as [0, 1] tensors."""
    kw = dict(height=RES, width=RES, num_inference_steps=steps, output_type="pt")
    if family == "sd3":
        kw.update(latents=noise, guidance_scale=1.0)  # > 1 would turn classifier-free guidance on
    elif family == "flux":
        B, C, H, W = noise.shape
        kw.update(latents=pipe._pack_latents(noise, B, C, H, W), guidance_scale=3.5)  # the distilled guidance input, as ours
    else:
        kw.update(latents=noise, guidance_scale=0.0)  # Z-Image: > 0 turns classifier-free guidance on
    pipe.set_progress_bar_config(disable=True)
    return pipe(list(PROMPTS), **kw).images


def test_rollout_equals_the_pipeline_sampler(folders, family):
    from diffusers import DiffusionPipeline

    steps = 4
    gen = build(folders[family])
    ref = gen.frozen_copy()
    base = DiffusionPipeline.from_pretrained(folders[family])  # the same folder, no adapter at all
    noise = noise_for(gen)
    sigmas = gen.sigmas(steps)
    # the frozen starting generator is the base pipeline
    ours, theirs = reward_ft.generate(ref, PROMPTS, noise, sigmas), pipeline_images(base, family, noise, steps)
    diffs = [(ours - theirs).abs().max().item()]
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    # with a trained-looking adapter, the rollout equals the pipeline whose transformer carries it
    perturb_lora(gen)
    ours_lora, theirs_lora = reward_ft.generate(gen, PROMPTS, noise, sigmas), pipeline_images(gen.pipe, family, noise, steps)
    diffs.append((ours_lora - theirs_lora).abs().max().item())
    torch.testing.assert_close(ours_lora, theirs_lora, atol=1e-5, rtol=0)
    assert (ours_lora - ours).abs().max() > 1e-3, "the adapter changed nothing: the comparison above is empty"
    # and the frozen copy kept the starting adapter
    torch.testing.assert_close(reward_ft.generate(ref, PROMPTS, noise, sigmas), theirs, atol=1e-5, rtol=0)
    print(f"{family}: max |rollout - pipeline| = {max(diffs):.2e}")


def test_sigmas_are_the_pipelines_schedule(folders, family):
    gen = build(folders[family])
    pipeline_images(gen.pipe, family, noise_for(gen), 5)
    theirs = gen.pipe.scheduler.sigmas.clone()  # what the pipeline's own call just integrated over
    ours = gen.sigmas(5)
    assert torch.equal(ours, theirs.float()) and ours[0] == 1.0 and ours[-1] == 0.0
    if family == "zimage":  # linspace(1, 1/5, 5) shifted by 3 (no dynamic shift): the last nonzero sigma is 3/7
        torch.testing.assert_close(ours[-2], torch.tensor(3 * 0.2 / (1 + 2 * 0.2)))


# -----------------------------------------------------------------------------
# one training step: only the LoRA moves; the regulariser starts at 0


def test_one_step_moves_only_the_lora(folders, family, student):
    torch.manual_seed(0)
    gen = build(folders[family])
    ref = gen.frozen_copy()
    rollout = Rollout(gen, ref)
    cond, sigmas, noise = gen.encode(PROMPTS), gen.sigmas(3), noise_for(gen)
    pipe = gen.pipe
    modules = {n: getattr(pipe, n) for n in ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3")
               if getattr(pipe, n, None) is not None}
    before = {f"{m}.{k}": v.clone() for m, mod in modules.items() for k, v in mod.state_dict().items()}
    trainable = [n for n, p in gen.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    images, reg = rollout(noise, cond, sigmas, stop=3, k=2)
    assert reg.item() == 0.0  # the frozen copy is the starting adapter: exactly the same network
    r, _ = reward(student, PROMPTS, images, WEIGHTS)
    opt = torch.optim.AdamW([p for p in gen.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)  # as the script's default
    (-r.mean() + reg).backward()
    # B = 0 at the start, so A's gradient is exactly zero and B's is not
    grads = {n: p.grad for n, p in gen.named_parameters() if p.requires_grad}
    assert all(torch.isfinite(g).all() for g in grads.values())
    assert all(g.abs().max() == 0 for n, g in grads.items() if ".lora_A." in n)
    assert sum(g.abs().sum() for n, g in grads.items() if ".lora_B." in n) > 0
    opt.step()
    after = {f"{m}.{k}": v for m, mod in modules.items() for k, v in mod.state_dict().items()}
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved and all(".lora_B." in k for k in moved), sorted(k for k in moved if ".lora_B." not in k)[:5]
    _, reg = rollout(noise, cond, sigmas, stop=3, k=2)
    assert reg.item() > 0.0


# -----------------------------------------------------------------------------
# the script end to end: train, evaluate, grid, resume, files, another base, --bf16


def argv_for(folder, files, out, **kw):
    argv = ["--generator", folder, "--resolution", str(RES), "--reward", files["student"], "--data", files["world"],
            "--out", str(out), "--lora-rank", "4", "--sample-steps", "3", "--grad-steps", "2", "--stop-range", "2",
            "--batch-size", "2", "--micro-batch", "2", "--eval-prompts", "2", "--eval-samples", "1", "--grid-prompts", "2",
            "--dimensions", "alignment,realism", "--lr", "1e-2", "--warmup", "1", "--seed", "0"]
    for k, v in kw.items():
        argv += [f"--{k.replace('_', '-')}"] + ([] if v is True else [str(v)])
    return argv


def args_for(folder, files, out, **kw):
    return reward_ft.get_args(argv_for(folder, files, out, **kw))


def test_script_end_to_end_resume_and_files(folders, family, files, tmp_path, capsys):
    from model import read_checkpoint

    folder = folders[family]
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    reward_ft.main(argv_for(folder, files, a, steps=2, save_every=1))
    log = capsys.readouterr().out
    assert "step     2" in log and "GSB" in log and "student" in log, log[-2000:]
    from PIL import Image

    grid = Image.open(tmp_path / "a.grid-step00002.png")  # before / after / difference, 2 prompts, 2x scale
    assert grid.size == (2 * (2 * (RES + 2) - 2), 2 * (3 * (RES + 2) - 2))
    # the file: only the adapter, and the base pipeline it belongs to
    meta, tensors = read_checkpoint(str(a))
    assert tensors and all(".lora_A." in k or ".lora_B." in k for k in tensors)
    assert meta["kind"] == "diffusers-lora" and meta["base"] == folder and meta["lora_rank"] == "4"
    assert meta["base_class"] == {"sd3": "StableDiffusion3Pipeline", "flux": "FluxPipeline", "zimage": "ZImagePipeline"}[family]
    assert json.loads(meta["step"]) == 2 and len(meta["base_fingerprint"]) == 16
    # the same run, stopped after its step-1 checkpoint, then resumed: the same LoRA and optimizer, bit for bit
    reward_ft.main(argv_for(folder, files, b, steps=2, save_every=1, stop_after=1))
    reward_ft.main(argv_for(folder, files, b, steps=2, save_every=1, resume=True))
    assert "resumed" in capsys.readouterr().out
    ta, tb = read_checkpoint(str(a))[1], read_checkpoint(str(b))[1]
    assert set(ta) == set(tb) and all(torch.equal(ta[k], tb[k]) for k in ta)
    assert any(ta[k].abs().max() > 0 for k in ta if ".lora_B." in k), "the LoRA did not move"
    oa, ob = (torch.load(os.path.join(newest_set(str(p)), "train.pt"), weights_only=False)["optimizer"]
              for p in (a, b))
    assert oa["state"].keys() == ob["state"].keys() and oa["state"]
    for i in oa["state"]:
        for k, v in oa["state"][i].items():
            assert torch.equal(v, ob["state"][i][k]), (i, k)
    # a --baseline LoRA runs on the trained generator's pipeline: it equals that LoRA loaded as --init
    gen = build(folder)
    trained = reward_ft.build_generator(args_for(folder, files, tmp_path / "c.safetensors", init=a), "cpu")[0]
    noise = noise_for(gen)
    torch.testing.assert_close(reward_ft.generate(gen.frozen_copy(gen.read_lora(str(a))), PROMPTS, noise, gen.sigmas(3)),
                               reward_ft.generate(trained, PROMPTS, noise, gen.sigmas(3)), atol=0, rtol=0)
    reward_ft.main(argv_for(folder, files, tmp_path / "c.safetensors", init="", baseline=a, steps=0))
    assert "GSB" in capsys.readouterr().out
    # another base of the same family and shapes (other random weights) refuses the file, as --init and as --resume
    other = save_tiny_pipeline(family, tmp_path / "other", seed=1)
    with pytest.raises(ValueError, match="refused"):
        build(other).read_lora(str(a))
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:  # a user error: one line, exit status 2
        reward_ft.main(argv_for(other, files, tmp_path / "d.safetensors", init=a, steps=1))
    assert e.value.code == 2 and "refused" in capsys.readouterr().err
    # as --resume: the changed --generator is refused first (before any pipeline loads); overridden, the LoRA itself
    with pytest.raises(SystemExit) as e:
        reward_ft.main(argv_for(other, files, b, steps=3, resume=True))
    assert e.value.code == 2 and "--generator" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        reward_ft.main(argv_for(other, files, b, steps=3, resume=True, resume_override="generator"))
    err = capsys.readouterr().err
    assert e.value.code == 2 and "cannot resume" in err and "base_fingerprint" in err, err
    with pytest.raises(ValueError, match="do not fit"):  # the same base with another rank
        build(folder, rank=2).read_lora(str(a))


def test_bf16_runs(folders, family, files, tmp_path, capsys):
    out = tmp_path / "bf16.safetensors"
    reward_ft.main(argv_for(folders[family], files, out, steps=1, bf16=True))
    log = capsys.readouterr().out
    assert "step     1" in log and "GSB" in log and "nan" not in log.lower(), log[-2000:]
    from model import read_checkpoint

    _, tensors = read_checkpoint(str(out))
    assert all(torch.isfinite(t.float()).all() for t in tensors.values())
    assert (tmp_path / "bf16.grid-step00001.png").exists()


@pytest.mark.slow
def test_torchrun_two_ranks(folders, files, tmp_path):
    out = tmp_path / "two.safetensors"
    argv = argv_for(folders["flux"], files, out, steps=2, batch_size=4, save_every=2)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", os.path.join(ROOT, "reward_ft.py"), *argv]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "world 2" in res.stdout and "step     2" in res.stdout and "GSB" in res.stdout, res.stdout[-2000:]
    from model import read_checkpoint

    _, tensors = read_checkpoint(str(out))
    assert any(t.abs().max() > 0 for k, t in tensors.items() if ".lora_B." in k)


if __name__ == "__main__":
    out = sys.argv[1] if len(sys.argv) > 1 else "runs/tiny-pipelines"
    for f in FAMILIES:
        print(save_tiny_pipeline(f, os.path.join(out, f)))
