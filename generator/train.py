"""Training the guidance module phi_g (VAS ControlNet) on (global RGB, global mesh image, hand box, caption).

    python -m generator.train --out runs/generator                       # tiny generator, synthlab train-wild
    python -m generator.train --generator-config sd15 --sd-path /models/sd15 --size 512 --out runs/gen-sd15

One step (paper §3, Eqs. 1-9; the reference code's recipe, shared/reference/FACTS.md §5):
1. Frame every sample on a square window (`generator.framing`): the whole image squared about its centre
   (`--framing frame`, the default: the paper's global image) or the union of the valid hand boxes squared and
   grown by `extend` (`--framing hands`), resized to the generator size S: RGB and intrinsics move together
   (`hands.datasets.transforms.crop`). The global mesh image is rendered from the sample's own MANO meshes at
   the window's camera (`hands.render.render_hands`); the local RGB and local mesh image are
   `hands.render.crop_local` of both around the union hand box in the window.
2. x0 = VAE(RGB in [-1, 1]) * scaling_factor for the global AND the local image (the local latent from the local
   image, not the reference's global-latent defect), branch-stacked (global rows, then local rows).
3. eps ~ N(0, I) per row; t ~ U{0..T-1} per sample (shared by its two branches); x_t = add_noise(x0, eps, t).
4. TAS (Eq. 4): `tas_updates` latent updates x_t <- x_t - alpha_k grad L_TAS on the rows whose caption has hand
   tokens (the reference applies 50 at the training timestep, step 20 sqrt(linspace(1, 0.5, 50)[k]); the
   default here is 1 for CPU runs).
5. The target at the TAS-shifted latent x_hat (`--tas-target`, `tas_training_target`): "epsilon" (default, the
   reference code) the drawn eps; "residual" (the paper's prose) eps_hat = (x_hat - sqrt(abar_t) x0) /
   sqrt(1 - abar_t), guarded against its heavy tail at small t (counted). pred = UNet(x_hat, t, K) +
   phi_g(x_hat, t, K, mesh) (Eq. 6); `--mesh-dropout` trains some samples on black mesh images.
6. L = lambda_G MSE(pred_G, target_G) + lambda_L MSE(pred_L, target_L) (Eq. 9, 0.5 / 0.5 as the reference);
   AdamW on phi_g's parameters only (UNet, VAE and text encoder are frozen), unless the tiny generator is
   trained from scratch (below).
   With `--attention-loss w` > 0 (not in the paper, off by default) L gains w * `attention_grounding_loss`: the
   hand tokens' cross-attention maps of this forward, at the TAS resolution, are pulled onto the mesh silhouette.

Training the tiny generator from scratch (`--train-modules all`, configs/generator/train-tiny.yaml): SD 1.5 comes
pretrained, the tiny generator does not, so its base is learnt here on the same data, in two phases of one run:
- `--vae-steps N` first steps train the VAE alone (L1 reconstruction of the global and local images + a small KL,
  `--kl-weight`, as LDM's KL-regularised autoencoder); at the end of this phase the latent scaling factor is set
  to 1 / std of the latents (LDM's rule; SD 1.5's 0.18215 came from the same rule), stored in the VAE config.
- then `--steps` steps train UNet, text encoder and phi_g together with the loss above; captions are replaced
  by "" with probability `--caption-dropout` so that classifier-free guidance has an unconditional model.
The result is also exported as a Stable Diffusion folder in diffusers layout with a guidance/ ControlNet
(`generator.model.save_components`), loadable as any generator's `sd_path`: `<out>/model/`.

Outputs under --out: `guidance.safetensors` (the latest phi_g weights, loadable as the generator's
`guidance_path`), `checkpoints/step_XXXXXXX/` (guidance.safetensors [+ base.safetensors: UNet, text encoder and
VAE when they train] + optimizer.pt + state.json, written to a temporary folder and renamed into place),
`samples/step_XXXXXXX.png` (mesh | generated | overlay rows; image | reconstruction in the VAE phase), `model/`
(with --train-modules all), `tb/` (TensorBoard: losses, sample grids), `train_config.json`.

Randomness: every step draws from its own `torch.Generator` seeded from (seed, step), and the data order of
each epoch from (seed, epoch), so a resumed run continues exactly as an uninterrupted one.
"""
from __future__ import annotations

import abc
import argparse
import dataclasses
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from hands.datasets import transforms
from hands.paths import write_atomic
from hands.render import crop_local, render_hands
from hands.sample import HandBatch, HandSample, collate

from .framing import FRAMINGS, window_boxes
from .segmenter import silhouettes
from .model import (GeneratorComponents, GeneratorConfig, build_components, load_config, resolve_config_path,
                    save_components)
from .tagging import hand_token_indices
from .text_attention import (AttentionStore, TasSchedule, apply_tas, attention_hw_for, cross_attention_layers,
                             recording, tas_loss_function, token_mask)
from .visual_attention import predict_noise, split_branches, stack_branches

logger = logging.getLogger(__name__)

DEFAULT_PROMPT = "a photo of two hands"
CHECKPOINT_STATE = "state.json"
GUIDANCE_FILE = "guidance.safetensors"
BASE_FILE = "base.safetensors"
TRAINED_BY = "attentionhand-aug generator.train --train-modules all"  # model_index.json marker of our own exports
MODEL_DIR = "model"
OPTIMIZER_FILE = "optimizer.pt"
# what a run was trained as (a row of generator.table1): a resume with another value would train a different row
RESUME_MUST_MATCH = (("train_modules", "--train-modules"), ("vae_steps", "--vae-steps"), ("guidance", "--guidance"),
                     ("separate_weights", "--separate-weights"), ("local_branch", "--no-local-branch"),
                     ("tas_updates", "--tas-updates"), ("tas_schedule", "--tas-schedule"), ("tas_loss", "--tas-loss"),
                     ("tas_smoothing", "--no-tas-smoothing"), ("tas_target", "--tas-target"),
                     ("attention_loss", "--attention-loss"))
LOCAL_GUIDANCE_FILE = "guidance_local.safetensors"  # separate_weights: the local branch's ControlNet
ADAPTER_DIR = "t2i-adapter"  # guidance "t2i-adapter": the trained adapter as a diffusers T2IAdapter folder
GUIDANCE_KINDS = ("controlnet", "t2i-adapter")


@dataclass(kw_only=True)
class TrainConfig:
    """Settings of `python -m generator.train` (the CLI flags carry the same names with dashes).

    dataset / data_root / split: the reader (`hands.datasets.build_dataset`); data_root None = the cached
    synthlab (written on first use). generator_config: "tiny", "sd15" or a YAML path; sd_path: a local SD 1.5
    folder (diffusers layout); overrides: extra `key=value` generator settings. size: generator resolution S
    (None: the UNet's sample size x the VAE's factor: 64 for the tiny generators, 512 for SD). framing: the
    global window, "frame" (the whole image, the paper's) or "hands" (union hand box squared, x extend;
    `generator.framing`); set the generator config's framing / extend to the same values for sampling.
    local_scale: the local crop's square box grown by this. lambda_global / lambda_local: Eq. 9 weights.
    tas_updates: TAS latent updates per step (0 = no TAS); tas_schedule: "reference" or "paper".
    tas_target: what the TAS-shifted latent is trained against, "epsilon" (the reference code: the drawn noise)
    or "residual" (the paper's prose: the noise the shifted latent holds), see `tas_training_target`;
    tas_residual_max: the residual target's heavy-tail guard (RMS of the shift term, in noise units).
    Baselines and ablations (paper Tables 1 and 4, Fig. 10; docs/generator.md "Table 1 in miniature"):
    tas_schedule "constant" (no step-size regularisation); tas_loss "tas" (L_TAS, Eq. 3) or "lb" (the
    load-balancing loss L_LB, `generator.text_attention.load_balancing_loss_batch`); tas_smoothing False: no
    Gaussian filter in L_TAS. guidance: "controlnet" (phi_g, the paper's) or "t2i-adapter" (a diffusers
    T2IAdapter on the mesh image, the T2I-Adapter baseline; written to <out>/t2i-adapter/ as a diffusers folder).
    local_branch False: the global branch only (Table 4's "no locality"; with tas_updates 0 the ControlNet
    baseline). separate_weights: the local branch gets its own ControlNet (Table 4 "Separated"; written to
    <out>/guidance_local.safetensors; the global one stays <out>/guidance.safetensors). fresh_guidance: phi_g
    starts as a fresh copy of the UNet's encoder (zero convolutions, `ControlNetModel.from_unet`) even where the
    generator config has guidance weights (<sd_path>/guidance/, guidance_path): every baseline and ablation then
    starts alike (the T2I-Adapter starts fresh anyway).
    train_modules: "guidance" (phi_g only, the paper's setting on a pretrained SD) or "all" (UNet, text encoder
    and phi_g: the tiny generator from scratch). mesh_dropout: probability that a sample's mesh images are black
    (its caption alone has to draw the hands; the tiny generator's stand-in for SD's text-to-image pretraining,
    where hand words learnt to attend to hands). attention_loss: weight of `attention_grounding_loss` on the hand
    tokens' cross-attention at the TAS resolution (0: off, the paper's recipe). vae_steps: steps of VAE training
    before the diffusion steps (vae_lr, kl_weight); caption_dropout: probability of an empty caption
    (classifier-free guidance).
    sample_every / checkpoint_every: steps between sample grids / checkpoints (0 = only at the end).
    sample_steps: DDIM steps of the sample grids. keep_checkpoints: step folders kept (older ones removed).
    """

    dataset: str = "synthlab"
    data_root: str | None = None
    split: str = "train-wild"
    dataset_options: dict = field(default_factory=dict)  # reader keyword arguments, e.g. {one_person: true} for coco
    mano_dir: str | None = None
    generator_config: str = "tiny"
    sd_path: str | None = None
    overrides: list[str] = field(default_factory=list)
    out: str = "runs/generator"
    steps: int = 200
    batch_size: int = 2
    lr: float = 1e-5
    weight_decay: float = 1e-2
    size: int | None = None
    framing: str = "frame"
    extend: float = 1.5
    local_scale: float = 1.0
    lambda_global: float = 0.5
    lambda_local: float = 0.5
    tas_updates: int = 1
    tas_schedule: str = "reference"
    tas_target: str = "epsilon"
    tas_residual_max: float = 1.0
    tas_loss: str = "tas"
    tas_smoothing: bool = True
    guidance: str = "controlnet"
    local_branch: bool = True
    separate_weights: bool = False
    fresh_guidance: bool = False
    train_modules: str = "guidance"
    vae_steps: int = 0
    vae_lr: float = 1e-3
    kl_weight: float = 1e-6
    caption_dropout: float = 0.0
    mesh_dropout: float = 0.0
    attention_loss: float = 0.0
    default_prompt: str = DEFAULT_PROMPT
    sample_every: int = 50
    sample_steps: int = 10
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    seed: int = 0
    device: str = "auto"
    num_workers: int = 0
    progress: bool = True
    resume: str | None = None


# -- data ------------------------------------------------------------------------------------------------------
def frame_sample(sample: HandSample, size: int, extend: float = 1.5, framing: str = "frame") -> HandSample:
    """The sample re-framed on a (size, size) window (`generator.framing.window_boxes`): "frame" the whole image
    squared about its centre (the paper's global image), "hands" the union of its valid hand boxes squared and
    grown by `extend`. Image, intrinsics, joints_img and boxes move; camera-space labels stay. A sample without
    valid hands keeps its whole image with either framing."""
    box = window_boxes(transforms.hands_box(sample), sample.image_size, framing, extend)
    return transforms.crop(sample, box, (size, size))


class FramedDataset(torch.utils.data.Dataset):
    """A HandSample dataset re-framed for the generator: item i is `frame_sample(dataset[i], size, extend,
    framing)`."""

    def __init__(self, dataset, size: int, extend: float = 1.5, framing: str = "frame"):
        if framing not in FRAMINGS:
            raise ValueError(f"--framing {framing!r}: expected one of {', '.join(FRAMINGS)}")
        self.dataset, self.size, self.extend, self.framing = dataset, int(size), float(extend), framing

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> HandSample:
        return frame_sample(self.dataset[index], self.size, self.extend, self.framing)


@dataclass
class TrainBatch:
    """One training batch at the generator size S (all on one device).

    rgb, rgb_local: (B, 3, S, S) in [0, 1], the framed image and its local crop; mesh, mesh_local:
    (B, 3, S, S) in [0, 1], the rendered global mesh image and its local crop; bbox: (B, 4) union hand box in
    window pixels (x0, y0, x1, y1); prompts: B captions."""

    rgb: Tensor
    mesh: Tensor
    rgb_local: Tensor
    mesh_local: Tensor
    bbox: Tensor
    prompts: list[str]

    def to(self, device) -> "TrainBatch":
        return dataclasses.replace(self, **{f.name: getattr(self, f.name).to(device) for f in dataclasses.fields(self)
                                            if isinstance(getattr(self, f.name), Tensor)})


def union_boxes(batch: HandBatch) -> Tensor:
    """(B, 4) union of the hands that are drawn (valid and with a mesh), x0 y0 x1 y1 pixels; the whole image
    where none is."""
    boxes = torch.stack([batch.right.bbox, batch.left.bbox], 1)  # (B, 2, 4)
    drawn = torch.stack([batch.right.valid & batch.right.mano_valid, batch.left.valid & batch.left.mano_valid], 1)
    big = torch.finfo(boxes.dtype).max
    lo = torch.where(drawn[..., None], boxes[..., :2], boxes.new_tensor(big)).amin(1)
    hi = torch.where(drawn[..., None], boxes[..., 2:], boxes.new_tensor(-big)).amax(1)
    height, width = batch.image.shape[-2:]
    whole = boxes.new_tensor([0.0, 0.0, width - 1.0, height - 1.0]).expand(len(boxes), 4)
    return torch.where(drawn.any(1, keepdim=True), torch.cat([lo, hi], -1), whole)


def make_train_batch(samples: Sequence[HandSample], faces_right: Tensor, faces_left: Tensor, *,
                     local_scale: float = 1.0, default_prompt: str = DEFAULT_PROMPT, device=None) -> TrainBatch:
    """Framed samples (all (3, S, S), see `frame_sample`) -> TrainBatch on `device` (default: the images').

    The global mesh image is rendered from each sample's MANO meshes (verts_cam, metres) at its window camera
    (camera.K, pixels); hands without a MANO fit are not drawn. Captions: meta["prompt"], else default_prompt.
    """
    batch = collate(list(samples))
    if device is not None:
        batch = batch.to(device)
    size = batch.image.shape[-2:]
    render = render_hands(batch.right.verts_cam, batch.left.verts_cam, faces_right, faces_left, batch.camera.K,
                          tuple(size), right_valid=batch.right.valid & batch.right.mano_valid,
                          left_valid=batch.left.valid & batch.left.mano_valid)
    bbox = union_boxes(batch)
    rgb, mesh = batch.image, render.image.to(batch.image.dtype)
    both = crop_local(torch.cat([rgb, mesh], 1), bbox, size[0], local_scale)  # one crop for RGB and mesh
    prompts = [s.meta.get("prompt") or default_prompt for s in samples]
    return TrainBatch(rgb=rgb, mesh=mesh, rgb_local=both[:, :3], mesh_local=both[:, 3:].clamp(0, 1), bbox=bbox,
                      prompts=prompts)


class StepBatches(torch.utils.data.Sampler):
    """Batch indices for steps [start, stop): epoch e is a permutation seeded by (seed, e); the batches of one
    step are the same whether the run was resumed or not."""

    def __init__(self, length: int, batch_size: int, *, seed: int, start: int, stop: int):
        if length < 1:
            raise ValueError("the training dataset is empty")
        self.length, self.batch_size, self.seed, self.start, self.stop = length, batch_size, seed, start, stop

    def __len__(self) -> int:
        return max(self.stop - self.start, 0)

    def _perm(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.length, generator=g).tolist()

    def __iter__(self):
        cache: dict[int, list[int]] = {}
        for step in range(self.start, self.stop):
            indices = []
            for k in range(step * self.batch_size, (step + 1) * self.batch_size):
                epoch, pos = divmod(k, self.length)
                if epoch not in cache:
                    cache.clear()
                    cache[epoch] = self._perm(epoch)
                indices.append(cache[epoch][pos])
            yield indices


def step_generator(seed: int, step: int, device) -> torch.Generator:
    """The random numbers of one step (noise, timesteps, VAE sampling) on `device`."""
    return torch.Generator(device=device).manual_seed(seed * 1_000_003 + step + 7919)


# -- the training step -------------------------------------------------------------------------------------------
@dataclass
class StepLosses:
    """Scalar tensors (detached): total L, L_G, L_L, the mean L_TAS before the last update (0 without TAS) and
    the number of rows the residual target's heavy-tail guard fell back on (see `tas_training_target`)."""

    total: Tensor
    global_: Tensor
    local: Tensor
    tas: Tensor
    guarded: Tensor | None = None  # rows whose residual target the heavy-tail guard replaced (0-d count)
    attention: Tensor | None = None  # the auxiliary grounding loss (--attention-loss), None when off


TRAIN_MODULES = {"guidance": ("guidance",), "all": ("unet", "text_encoder", "guidance")}
TAS_TARGETS = ("epsilon", "residual")


def tas_training_target(kind: str, x_hat: Tensor, x_t: Tensor, x0: Tensor, eps: Tensor, alphas: Tensor, *,
                        residual_max: float = 1.0) -> tuple[Tensor, Tensor, Tensor]:
    """(model input, noise target, guarded row count) of the TAS-shifted training latents.

    x_hat: (N, C, h, w) the latents after TAS; x_t = sqrt(abar) x0 + sqrt(1 - abar) eps, the latents before it;
    alphas: abar_t broadcastable to (N, 1, 1, 1). With delta = x_hat - x_t:
    - "epsilon" (the reference code, ddpm.py p_losses): the input x_hat, the target the drawn eps. The UNet learns
      eps(x_t + delta) = eps, so its x0-prediction (x_hat - sqrt(1 - abar) eps_hat) / sqrt(abar) becomes
      x0 + delta / sqrt(abar): the TAS direction reaches the denoised image.
    - "residual" (the paper's prose): the target (x_hat - sqrt(abar) x0) / sqrt(1 - abar) = eps + delta /
      sqrt(1 - abar), the noise x_hat actually holds; the UNet learns to undo the shift (x0-prediction x0).
      delta / sqrt(1 - abar) is up to 1 / sqrt(beta_0) ~ 34x delta at t = 0 (SD's schedule), a heavy tail: rows
      where its RMS exceeds `residual_max` (in units of the unit-variance noise) fall back on (x_t, eps), as if
      TAS had not run, and are counted.
    Rows TAS left alone (delta = 0) get (x_t, eps) with either kind.
    """
    if kind == "epsilon":
        return x_hat, eps, eps.new_zeros((), dtype=torch.long)
    if kind != "residual":
        raise ValueError(f"tas target {kind!r}: expected one of {', '.join(TAS_TARGETS)}")
    shift = (x_hat - x_t) / (1 - alphas).sqrt()
    rms = shift.float().pow(2).mean(dim=tuple(range(1, shift.ndim))).sqrt()  # (N,)
    guard = (rms > residual_max).view(-1, *([1] * (shift.ndim - 1)))
    model_input = torch.where(guard, x_t, x_hat)
    target = torch.where(guard, eps, eps + shift)
    return model_input, target, guard.sum()


def attention_grounding_loss(maps: Tensor, selected: Tensor, coverage: Tensor) -> Tensor:
    """The optional auxiliary loss of `--attention-loss` (not in the paper; TokenCompose's token-level grounding
    loss, Wang et al. 2024): mean over the selected hand tokens of (1 - share)^2, share = the part of the token's
    cross-attention map (normalised over the grid) that falls on the mesh silhouette.

    maps: (N, h, w, 77) cross-attention probabilities (heads and layers averaged); selected: (N, 75) bool hand
    tokens at positions 1..75 (`token_mask`); coverage: (N, h, w) fraction of each cell on the silhouette.
    Returns a scalar (0 when nothing is selected)."""
    a = maps[..., 1:76].float()  # (N, h, w, 75)
    share = (a * coverage[..., None].float()).sum(dim=(1, 2)) / a.sum(dim=(1, 2)).clamp_min(1e-12)  # (N, 75)
    per_token = (1.0 - share) ** 2
    if not bool(selected.any()):
        return per_token.new_zeros(())
    return per_token[selected.to(per_token.device)].mean()


class _Trainer(abc.ABC):
    """What the phases share: `loss(batch, generator) -> (differentiable total, StepLosses)` and an optimizer."""

    optimizer: torch.optim.Optimizer

    @abc.abstractmethod
    def loss(self, batch: TrainBatch, generator: torch.Generator) -> tuple[Tensor, StepLosses]:
        """The differentiable total loss of one batch and its detached parts."""

    def step(self, batch: TrainBatch, generator: torch.Generator) -> StepLosses:
        """One optimizer step on the trained modules; returns the batch's losses before the step."""
        self.optimizer.zero_grad(set_to_none=True)
        total, losses = self.loss(batch, generator)
        total.backward()
        self.optimizer.step()
        return losses


class GuidanceTrainer(_Trainer):
    """Trains components.guidance (phi_g) with AdamW, and with train_modules="all" also the UNet and the text
    encoder (the tiny generator from scratch); the VAE stays frozen (see `VaeTrainer`).

    components: the generator, on its device. attention_downsample: TAS attention resolution = latent size /
    this (the generator config's value). caption_dropout: probability that a sample's caption is replaced by ""
    (the unconditional prompt of classifier-free guidance).
    """

    def __init__(self, components: GeneratorComponents, *, lr: float = 1e-5, weight_decay: float = 1e-2,
                 lambda_global: float = 0.5, lambda_local: float = 0.5, tas_updates: int = 1,
                 tas_schedule: TasSchedule | None = None, attention_downsample: int = 4,
                 train_modules: str = "guidance", caption_dropout: float = 0.0, tas_target: str = "epsilon",
                 tas_residual_max: float = 1.0, mesh_dropout: float = 0.0, tas_loss: str = "tas",
                 tas_smoothing: bool = True, local_branch: bool = True, local_guidance=None,
                 attention_loss: float = 0.0):
        if attention_loss < 0:
            raise ValueError(f"--attention-loss must be >= 0; got {attention_loss}")
        self.attention_loss = float(attention_loss)
        if tas_target not in TAS_TARGETS:
            raise ValueError(f"--tas-target {tas_target!r}: expected one of {', '.join(TAS_TARGETS)}")
        if train_modules not in TRAIN_MODULES:
            raise ValueError(f"--train-modules {train_modules!r}: expected one of {', '.join(TRAIN_MODULES)}")
        if not 0.0 <= caption_dropout < 1.0:
            raise ValueError(f"--caption-dropout must be in [0, 1); got {caption_dropout}")
        self.components = components
        self.trained = TRAIN_MODULES[train_modules]
        self.caption_dropout = float(caption_dropout)
        if not 0.0 <= mesh_dropout < 1.0:
            raise ValueError(f"--mesh-dropout must be in [0, 1); got {mesh_dropout}")
        self.mesh_dropout = float(mesh_dropout)
        for name in ("unet", "vae", "text_encoder", "guidance"):
            module = getattr(components, name)
            trained = name in self.trained
            module.requires_grad_(trained).train(trained)
        if local_guidance is not None and not local_branch:
            raise ValueError("--separate-weights needs the local branch (drop --no-local-branch)")
        self.local_branch, self.local_guidance = bool(local_branch), local_guidance
        self.tas_loss_fn = tas_loss_function(tas_loss, smoothing=tas_smoothing)
        self.params = [p for name in self.trained for p in getattr(components, name).parameters()]
        if local_guidance is not None:
            local_guidance.requires_grad_(True).train(True)
            self.params += list(local_guidance.parameters())
        self.optimizer = torch.optim.AdamW(self.params, lr=lr, weight_decay=weight_decay)
        self.lambda_global, self.lambda_local = lambda_global, lambda_local
        self.tas_updates = int(tas_updates)
        self.tas_target, self.tas_residual_max = tas_target, float(tas_residual_max)
        self.step_sizes = (tas_schedule or TasSchedule()).step_sizes(self.tas_updates)
        self.attention_downsample = attention_downsample
        self._stores: dict[tuple[int, int], AttentionStore] = {}
        self.scaling_factor = float(getattr(components.vae.config, "scaling_factor", 0.18215))

    def _store(self, latent_hw: tuple[int, int]) -> AttentionStore:
        if latent_hw not in self._stores:
            unet = self.components.unet
            attention_hw = attention_hw_for(latent_hw, self.attention_downsample)
            self._stores[latent_hw] = AttentionStore(cross_attention_layers(unet, latent_hw, attention_hw),
                                                     attention_hw)
        return self._stores[latent_hw]

    @torch.no_grad()
    def encode_images(self, rgb: Tensor, generator: torch.Generator) -> Tensor:
        """(N, 3, S, S) RGB in [0, 1] -> latents x0 (N, 4, S/f, S/f) = VAE sample * scaling_factor (f: the VAE's
        factor, 8 for SD)."""
        vae = self.components.vae
        dist = vae.encode(rgb.to(vae.dtype) * 2 - 1).latent_dist
        return dist.sample(generator=generator) * self.scaling_factor

    def loss(self, batch: TrainBatch, generator: torch.Generator) -> tuple[Tensor, StepLosses]:
        """The differentiable L = lambda_G L_G + lambda_L L_L of one batch (see the module docstring) and the
        detached parts. generator: on the batch's device; draws VAE samples, timesteps and noise."""
        c = self.components
        device = batch.rgb.device
        b = batch.rgb.shape[0]
        prompts = list(batch.prompts)
        if self.caption_dropout > 0:
            drop = torch.rand(b, generator=generator, device=device) < self.caption_dropout
            prompts = ["" if d else p for p, d in zip(prompts, drop.tolist())]
        mesh_keep = None
        if self.mesh_dropout > 0:  # drawn after the caption dropout: runs without it keep their random stream
            mesh_keep = (torch.rand(b, generator=generator, device=device) >= self.mesh_dropout).to(batch.mesh.dtype)
        with torch.set_grad_enabled("text_encoder" in self.trained):
            text = c.encode_prompts(prompts, device)  # (B, 77, D)
        branches = 2 if self.local_branch else 1  # rows: global, then local (without the local branch: global)
        with torch.no_grad():
            rgb = stack_branches(batch.rgb, batch.rgb_local) if branches == 2 else batch.rgb
            x0 = self.encode_images(rgb, generator)  # (2B or B, 4, h, w)
        text2 = text.repeat(branches, 1, 1)
        mesh2 = (stack_branches(batch.mesh, batch.mesh_local) if branches == 2 else batch.mesh).to(x0.dtype)
        if mesh_keep is not None:  # a dropped sample trains on black mesh images in both branches
            mesh2 = mesh2 * mesh_keep.repeat(branches).view(-1, 1, 1, 1)
        num_train = c.scheduler.config.num_train_timesteps
        t = torch.randint(0, num_train, (b,), generator=generator, device=device).repeat(branches)  # (2B or B,)
        eps = torch.randn(x0.shape, generator=generator, device=device, dtype=x0.dtype)
        x_t = c.scheduler.add_noise(x0, eps, t)
        x_t_plain = x_t
        tas = x0.new_zeros(())
        tokens = [hand_token_indices(p, c.tokenizer) if p else [] for p in prompts] * branches
        rows = [i for i, idx in enumerate(tokens) if idx]
        if self.tas_updates > 0 and rows:
            store = self._store(tuple(x0.shape[-2:]))
            index = torch.tensor(rows, device=device)
            with recording(c.unet, store):
                updated, tas_losses = apply_tas(c.unet, store, x_t.index_select(0, index), t.index_select(0, index),
                                                text2.detach().index_select(0, index),
                                                token_mask([tokens[i] for i in rows], device), self.step_sizes,
                                                loss_fn=self.tas_loss_fn)
            x_t = x_t.index_copy(0, index, updated)
            tas = tas_losses.mean()
        alphas = c.scheduler.alphas_cumprod.to(device=device, dtype=x0.dtype)[t].view(-1, 1, 1, 1)
        x_t, target, guarded = tas_training_target(self.tas_target, x_t, x_t_plain, x0, eps, alphas,
                                                   residual_max=self.tas_residual_max)
        ground = self.attention_loss > 0 and bool(rows)
        store = self._store(tuple(x0.shape[-2:])) if ground else None
        recorded = []  # with --attention-loss: the cross-attention maps of this forward, per ControlNet call

        def run(guidance, k):
            if ground:
                store.reset()
                store.active = True
            try:
                out = predict_noise(c.unet, guidance, x_t[k], t[k], text2[k], mesh2[k])
            finally:
                if ground:
                    store.active = False
            if ground:
                recorded.append(store.maps())
            return out

        with recording(c.unet, store) if ground else nullcontext():
            if self.local_guidance is not None:  # separate weights: each branch through its own ControlNet
                halves = [(c.guidance, slice(0, b)), (self.local_guidance, slice(b, 2 * b))]
                pred = torch.cat([run(g, k) for g, k in halves])
            else:
                pred = run(c.guidance, slice(None))
        if branches == 2:
            pred_g, pred_l = split_branches(pred)
            target_g, target_l = split_branches(target)
            loss_g = F.mse_loss(pred_g.float(), target_g.float())
            loss_l = F.mse_loss(pred_l.float(), target_l.float())
            total = self.lambda_global * loss_g + self.lambda_local * loss_l
        else:
            loss_g = F.mse_loss(pred.float(), target.float())
            loss_l = loss_g.new_zeros(())
            total = self.lambda_global * loss_g
        grounding = None
        if ground:  # on the rows with hand tokens, against the true silhouette (also where the mesh was dropped)
            index = torch.tensor(rows, device=device)
            maps = torch.cat(recorded).index_select(0, index)
            mesh_rows = (stack_branches(batch.mesh, batch.mesh_local) if branches == 2 else batch.mesh)
            coverage = F.adaptive_avg_pool2d(silhouettes(mesh_rows.index_select(0, index)).float(),
                                             tuple(maps.shape[1:3]))[:, 0]
            grounding = attention_grounding_loss(maps, token_mask([tokens[i] for i in rows], device), coverage)
            total = total + self.attention_loss * grounding
        return total, StepLosses(total.detach(), loss_g.detach(), loss_l.detach(), tas.detach(), guarded.detach(),
                                 None if grounding is None else grounding.detach())



class VaeTrainer(_Trainer):
    """Trains the VAE alone (the tiny generator's first phase): L1 reconstruction of the global and local RGB
    images in [-1, 1] + kl_weight * KL(q(z|x) || N(0, I)) (LDM's KL-regularised autoencoder), AdamW."""

    def __init__(self, components: GeneratorComponents, *, lr: float = 1e-3, weight_decay: float = 1e-2,
                 kl_weight: float = 1e-6):
        self.components = components
        for name in ("unet", "text_encoder", "guidance"):
            getattr(components, name).requires_grad_(False).eval()
        components.vae.requires_grad_(True).train()
        self.params = list(components.vae.parameters())
        self.optimizer = torch.optim.AdamW(self.params, lr=lr, weight_decay=weight_decay)
        self.kl_weight = float(kl_weight)

    def loss(self, batch: TrainBatch, generator: torch.Generator) -> tuple[Tensor, StepLosses]:
        """L = L1(recon, x) + kl_weight * KL; StepLosses(total, L1 of the global rows, of the local rows, KL)."""
        vae = self.components.vae
        x = stack_branches(batch.rgb, batch.rgb_local).to(vae.dtype) * 2 - 1  # (2B, 3, S, S)
        dist = vae.encode(x).latent_dist
        recon = vae.decode(dist.sample(generator=generator)).sample
        l1 = (recon.float() - x.float()).abs().mean(dim=(1, 2, 3))
        kl = dist.kl().float().mean()
        total = l1.mean() + self.kl_weight * kl
        l1_g, l1_l = split_branches(l1)
        return total, StepLosses(total.detach(), l1_g.mean().detach(), l1_l.mean().detach(), kl.detach())

    @torch.no_grad()
    def reconstruct(self, rgb: Tensor) -> Tensor:
        """(B, 3, S, S) in [0, 1] -> the VAE's reconstruction from the posterior mean, in [0, 1]."""
        vae = self.components.vae
        was = vae.training
        vae.eval()
        try:
            z = vae.encode(rgb.to(vae.dtype) * 2 - 1).latent_dist.mode()
            return ((vae.decode(z).sample.float() + 1) / 2).clamp(0, 1)
        finally:
            vae.train(was)


@torch.no_grad()
def latent_scaling_factor(vae, batches: Sequence[Tensor]) -> float:
    """1 / std of the VAE's latents over RGB batches in [0, 1]: LDM's rule for the factor that gives the
    diffusion model unit-variance latents (posterior means here; LDM used samples, the same at a KL weight of
    1e-6, whose posterior std is tiny)."""
    was = vae.training
    vae.eval()
    try:
        z = torch.cat([vae.encode(b.to(vae.dtype) * 2 - 1).latent_dist.mode().float().flatten() for b in batches])
    finally:
        vae.train(was)
    return float(1.0 / z.std().clamp_min(1e-6))


# -- checkpoints -------------------------------------------------------------------------------------------------
def save_guidance(guidance, path: str | Path) -> Path:
    """phi_g's ControlNet state dict as .safetensors (loadable by `generator.model.load_guidance`), atomically;
    an `AdapterGuidance`'s whole state dict (checkpoints; its loadable form is `save_adapter`'s folder)."""
    from safetensors.torch import save_file

    module = guidance.controlnet if hasattr(guidance, "controlnet") else guidance  # AdapterGuidance: all of it
    state = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
    path = Path(path)
    write_atomic(path, lambda tmp: save_file(state, tmp))
    return path


def save_adapter(adapter, folder: str | Path) -> Path:
    """A T2IAdapter as a diffusers folder (config.json + weights; loadable as the "t2i-adapter" generator's
    guidance_path), written into a temporary folder and renamed into place."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
    try:
        adapter.save_pretrained(tmp)
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


BASE_MODULES = ("unet", "text_encoder", "vae")


def save_base(components: GeneratorComponents, path: str | Path) -> Path:
    """UNet, text encoder and VAE weights as one .safetensors (keys prefixed "unet.", "text_encoder.", "vae."),
    atomically; the VAE's latent scaling factor goes into the file's metadata."""
    from safetensors.torch import save_file

    state = {f"{name}.{k}": v.detach().contiguous().cpu() for name in BASE_MODULES
             for k, v in getattr(components, name).state_dict().items()}
    metadata = {"scaling_factor": repr(float(components.vae.config.scaling_factor))}
    path = Path(path)
    write_atomic(path, lambda tmp: save_file(state, tmp, metadata=metadata))
    return path


def load_base(components: GeneratorComponents, path: str | Path) -> None:
    """Restore what `save_base` wrote (strict: every key of the three modules must fit)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    device = next(components.unet.parameters()).device
    state = load_file(str(path), device=str(device))
    for name in BASE_MODULES:
        prefix = f"{name}."
        part = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        getattr(components, name).load_state_dict(part, strict=True)
    with safe_open(str(path), framework="pt") as f:
        scaling = (f.metadata() or {}).get("scaling_factor")
    if scaling is not None:
        components.vae.register_to_config(scaling_factor=float(scaling))


def save_checkpoint(folder: str | Path, trainer, *, step: int, config: dict, base: bool = False,
                    state: dict | None = None) -> Path:
    """checkpoints/step_XXXXXXX/ under `folder`: guidance.safetensors, base.safetensors (when `base`: UNet,
    text encoder, VAE), optimizer.pt (AdamW state of the trainer's phase), state.json (step, config, `state`).
    Written into a temporary folder and renamed, so a reader never sees half of it."""
    root = Path(folder) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:07d}"
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{final.name}."))
    try:
        save_guidance(trainer.components.guidance, tmp / GUIDANCE_FILE)
        if getattr(trainer, "local_guidance", None) is not None:
            save_guidance(trainer.local_guidance, tmp / LOCAL_GUIDANCE_FILE)
        if base:
            save_base(trainer.components, tmp / BASE_FILE)
        torch.save(trainer.optimizer.state_dict(), tmp / OPTIMIZER_FILE)
        (tmp / CHECKPOINT_STATE).write_text(json.dumps({"step": step, **(state or {}), "config": config}, indent=1))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def checkpoints(folder: str | Path) -> list[Path]:
    """Complete checkpoint folders under `folder`/checkpoints, oldest first."""
    root = Path(folder) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step_*") if (p / CHECKPOINT_STATE).is_file())


def find_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder (step_XXXXXXX/) or a run folder (its latest checkpoint)."""
    path = Path(path)
    if (path / CHECKPOINT_STATE).is_file():
        return path
    found = checkpoints(path)
    if not found:
        raise FileNotFoundError(f"--resume {path}: neither a checkpoint folder ({CHECKPOINT_STATE}) nor a run "
                                "folder with checkpoints/step_*")
    return found[-1]


def load_weights(folder: str | Path, components: GeneratorComponents, local_guidance=None) -> dict:
    """Restore phi_g (and base.safetensors when the checkpoint has it, and the local branch's ControlNet into
    `local_guidance` when given) from a checkpoint folder; returns its state.json."""
    from safetensors.torch import load_file

    folder = Path(folder)
    guidance = components.guidance
    state = load_file(str(folder / GUIDANCE_FILE), device=str(next(guidance.parameters()).device))
    (guidance.controlnet if hasattr(guidance, "controlnet") else guidance).load_state_dict(state, strict=True)
    local = local_guidance
    if local is not None:
        state = load_file(str(folder / LOCAL_GUIDANCE_FILE), device=str(next(local.parameters()).device))
        local.controlnet.load_state_dict(state, strict=True)
    if (folder / BASE_FILE).is_file():
        load_base(components, folder / BASE_FILE)
    return json.loads((folder / CHECKPOINT_STATE).read_text())


def load_optimizer(folder: str | Path, trainer) -> None:
    trainer.optimizer.load_state_dict(torch.load(Path(folder) / OPTIMIZER_FILE, map_location="cpu",
                                                 weights_only=True))


def load_checkpoint(path: str | Path, trainer: GuidanceTrainer) -> int:
    """Restore the weights and the optimizer from a checkpoint (folder or run folder); returns its step."""
    folder = find_checkpoint(path)
    state = load_weights(folder, trainer.components, getattr(trainer, "local_guidance", None))
    load_optimizer(folder, trainer)
    return int(state["step"])


# -- samples -----------------------------------------------------------------------------------------------------
def overlay(images: Tensor, mesh_images: Tensor, alpha: float = 0.5) -> Tensor:
    """Mesh drawn over images where the mesh is (non-black): (B, 3, H, W) in [0, 1]."""
    drawn = (mesh_images.amax(1, keepdim=True) > 0.02).to(images.dtype)
    return images * (1 - alpha * drawn) + alpha * drawn * mesh_images


@torch.no_grad()
def sample_grid(components: GeneratorComponents, batch: TrainBatch, *, steps: int, seed: int,
                attention_downsample: int, sampling=None) -> Tensor:
    """(3, rows*S, 3*S) grid: one row per sample, columns mesh | generated | overlay (pipeline sampling, seeded)."""
    from torchvision.utils import make_grid

    from .pipeline import AttentionHandPipeline

    pipe = AttentionHandPipeline.from_components(components, attention_downsample=attention_downsample,
                                                 sampling=sampling)
    was_training = components.guidance.training
    components.guidance.eval()
    try:
        gens = [torch.Generator(device=batch.mesh.device).manual_seed(seed + i) for i in range(len(batch.prompts))]
        images = pipe(batch.mesh, None, batch.prompts, num_inference_steps=steps, generator=gens).images
    finally:
        components.guidance.train(was_training)
    rows = torch.stack([batch.mesh, images, overlay(images, batch.mesh)], 1).flatten(0, 1)  # (3B, 3, S, S)
    return make_grid(rows.float().cpu(), nrow=3, padding=2)


@torch.no_grad()
def reconstruction_grid(trainer: "VaeTrainer", batch: TrainBatch) -> Tensor:
    """(3, rows*S, 4*S) grid: one row per sample, columns image | reconstruction | local | local reconstruction."""
    from torchvision.utils import make_grid

    recon = trainer.reconstruct(batch.rgb)
    recon_local = trainer.reconstruct(batch.rgb_local)
    rows = torch.stack([batch.rgb.float(), recon, batch.rgb_local.float(), recon_local], 1).flatten(0, 1)
    return make_grid(rows.cpu(), nrow=4, padding=2)


def save_png(image: Tensor, path: str | Path) -> Path:
    """(3, H, W) in [0, 1] -> PNG (atomic)."""
    from PIL import Image

    array = (image.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
    path = Path(path)
    write_atomic(path, lambda tmp: Image.fromarray(array).save(tmp, format="PNG"))
    return path


# -- the command -------------------------------------------------------------------------------------------------
def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name}: not a device name (auto, cpu, cuda, cuda:N)") from None


def generator_config(cfg: TrainConfig) -> GeneratorConfig:
    overrides = list(cfg.overrides)
    if cfg.sd_path:
        overrides.append(f"sd_path={cfg.sd_path}")
    return load_config(cfg.generator_config, overrides)


def train(cfg: TrainConfig, *, hand_model=None) -> dict:
    """Run training as configured; returns {"step", "loss", "tas_guarded" (rows the residual target's guard fell
    back on), "guidance_path", "model_path", "seconds"}.
    hand_model: the hands.mano.HandModel the dataset's meshes use (default: HandModel(cfg.mano_dir))."""
    from hands.datasets import build_dataset
    from hands.mano import HandModel
    from torch.utils.tensorboard import SummaryWriter
    from tqdm.auto import tqdm

    if cfg.steps < 0 or cfg.vae_steps < 0 or cfg.batch_size < 1:
        raise ValueError(f"--steps and --vae-steps must be >= 0 and --batch-size >= 1; got {cfg.steps}, "
                         f"{cfg.vae_steps}, {cfg.batch_size}")
    if cfg.train_modules not in TRAIN_MODULES:
        raise ValueError(f"--train-modules {cfg.train_modules!r}: expected one of {', '.join(TRAIN_MODULES)}")
    if not 0.0 <= cfg.caption_dropout < 1.0:
        raise ValueError(f"--caption-dropout must be in [0, 1); got {cfg.caption_dropout}")
    if cfg.vae_steps and cfg.train_modules != "all":
        raise ValueError("--vae-steps trains the VAE of a generator trained from scratch: it needs --train-modules all")
    if cfg.guidance not in GUIDANCE_KINDS:
        raise ValueError(f"--guidance {cfg.guidance!r}: expected one of {', '.join(GUIDANCE_KINDS)}")
    if cfg.guidance == "t2i-adapter" and cfg.separate_weights:
        raise ValueError("--separate-weights gives the local branch its own ControlNet: it needs --guidance controlnet")
    device = resolve_device(cfg.device)
    gen_cfg = generator_config(cfg)
    components = build_components(gen_cfg if cfg.guidance == "controlnet" else
                                  dataclasses.replace(gen_cfg, guidance_path=None)).to(device)
    local_guidance = None
    if cfg.guidance == "t2i-adapter":  # a fresh adapter (seeded) in phi_g's place
        from .baselines import tiny_t2i_adapter
        from .visual_attention import AdapterGuidance

        adapter = tiny_t2i_adapter(components.unet, seed=cfg.seed, num_res_blocks=2 if gen_cfg.sd_path else 1,
                                   downscale_factor=components.vae_scale_factor)
        components.guidance = AdapterGuidance(adapter).to(device)
    else:
        if cfg.fresh_guidance:
            from .visual_attention import GuidanceModule

            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(cfg.seed)
                channels = tuple(components.guidance.controlnet.config.conditioning_embedding_out_channels)
                components.guidance = GuidanceModule.from_unet(
                    components.unet, conditioning_embedding_out_channels=channels).to(device)
        if cfg.separate_weights:  # the local branch's own ControlNet, starting as the global one does
            import copy

            local_guidance = copy.deepcopy(components.guidance)
    size = cfg.size or components.default_size
    if size % components.vae_scale_factor:
        raise ValueError(f"--size {size} must be a multiple of the VAE's factor {components.vae_scale_factor}")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    config_dict = {"train": dataclasses.asdict(cfg), "generator": dataclasses.asdict(gen_cfg), "size": size}
    write_atomic(out / "train_config.json", lambda tmp: Path(tmp).write_text(json.dumps(config_dict, indent=1)))

    hand_model = hand_model if hand_model is not None else HandModel(mano_dir=cfg.mano_dir)
    dataset = FramedDataset(build_dataset(cfg.dataset, cfg.data_root, cfg.split, hand_model=hand_model,
                                          **cfg.dataset_options), size, cfg.extend, cfg.framing)
    faces_right = hand_model.faces_for("right").to(device)
    faces_left = hand_model.faces_for("left").to(device)
    base = cfg.train_modules == "all"

    resume_folder, resume_state, start = None, None, 0
    if cfg.resume:
        resume_folder = find_checkpoint(cfg.resume)
        saved_state = json.loads((resume_folder / CHECKPOINT_STATE).read_text())
        for key, flag in RESUME_MUST_MATCH:
            saved = saved_state.get(key)
            if saved is not None and saved != getattr(cfg, key):
                raise ValueError(f"--resume {resume_folder}: trained with {flag} {saved}, resumed with "
                                 f"{flag} {getattr(cfg, key)}; resume with the same value")
        resume_state = load_weights(resume_folder, components, local_guidance)
        start = int(resume_state["step"])
    total = cfg.vae_steps + cfg.steps
    if start >= total:
        logger.info("checkpoint is at step %d >= %d steps: nothing to train", start, total)

    writer = SummaryWriter(str(out / "tb"))
    losses = None
    guarded = int(resume_state.get("tas_guarded", 0)) if resume_state is not None else 0
    began = time.perf_counter()
    step = start
    phases = ([("vae", 0, cfg.vae_steps)] if cfg.vae_steps else []) + [("diffusion", cfg.vae_steps, total)]
    try:
        with tqdm(total=total, initial=start, desc="generator.train", disable=not cfg.progress) as bar:
            for phase, lo, hi in phases:
                if step >= hi:
                    continue
                if phase == "vae":
                    trainer = VaeTrainer(components, lr=cfg.vae_lr, weight_decay=cfg.weight_decay,
                                         kl_weight=cfg.kl_weight)
                else:
                    trainer = GuidanceTrainer(
                        components, lr=cfg.lr, weight_decay=cfg.weight_decay, lambda_global=cfg.lambda_global,
                        lambda_local=cfg.lambda_local, tas_updates=cfg.tas_updates,
                        tas_schedule=TasSchedule(kind=cfg.tas_schedule),
                        attention_downsample=gen_cfg.attention_downsample, train_modules=cfg.train_modules,
                        caption_dropout=cfg.caption_dropout, tas_target=cfg.tas_target,
                        tas_residual_max=cfg.tas_residual_max, mesh_dropout=cfg.mesh_dropout,
                        tas_loss=cfg.tas_loss, tas_smoothing=cfg.tas_smoothing, local_branch=cfg.local_branch,
                        local_guidance=local_guidance, attention_loss=cfg.attention_loss)
                if resume_state is not None and resume_state.get("phase", "diffusion") == phase and step > lo:
                    load_optimizer(resume_folder, trainer)
                loader = torch.utils.data.DataLoader(
                    dataset, batch_sampler=StepBatches(len(dataset), cfg.batch_size, seed=cfg.seed, start=step,
                                                       stop=hi),
                    collate_fn=list, num_workers=cfg.num_workers)
                fixed = None  # the sample grids' batch: the phase's first batch
                for samples in loader:
                    batch = make_train_batch(samples, faces_right, faces_left, local_scale=cfg.local_scale,
                                             default_prompt=cfg.default_prompt, device=device)
                    if fixed is None:
                        fixed = batch
                    losses = trainer.step(batch, step_generator(cfg.seed, step, device))
                    step += 1
                    names = (("total", "l1_global", "l1_local", "kl") if phase == "vae" else
                             ("total", "global", "local", "tas"))
                    values = dict(zip(names, (float(v) for v in (losses.total, losses.global_, losses.local,
                                                                   losses.tas))))
                    if getattr(losses, "attention", None) is not None:
                        values["attention"] = float(losses.attention)
                    if losses.guarded is not None:
                        guarded += int(losses.guarded)
                        writer.add_scalar("tas/guarded_rows", guarded, step)
                    for key, value in values.items():
                        writer.add_scalar(f"{phase}/{key}" if phase == "vae" else f"loss/{key}", value, step)
                    bar.set_postfix(phase=phase, loss=f"{values['total']:.4f}")
                    bar.update(1)
                    end = step == hi
                    if phase == "vae" and end:
                        # LDM's rule: unit-variance latents for the diffusion phase, measured on the images of
                        # the run's first steps (the same whether or not the run was resumed)
                        first = [make_train_batch([dataset[i] for i in indices], faces_right, faces_left,
                                                  local_scale=cfg.local_scale, device=device)
                                 for indices in StepBatches(len(dataset), cfg.batch_size, seed=cfg.seed, start=0,
                                                            stop=max(1, 64 // cfg.batch_size))]
                        factor = latent_scaling_factor(components.vae,
                                                       [stack_branches(b.rgb, b.rgb_local) for b in first])
                        components.vae.register_to_config(scaling_factor=factor)
                        logger.info("VAE phase done: latent scaling factor %.4f", factor)
                    if (cfg.sample_every and step % cfg.sample_every == 0) or end:
                        if phase == "vae":
                            grid = reconstruction_grid(trainer, fixed)
                            tag = "samples/image|reconstruction"
                        else:
                            grid = sample_grid(components, fixed, steps=cfg.sample_steps, seed=cfg.seed,
                                               attention_downsample=gen_cfg.attention_downsample,
                                               sampling=gen_cfg.sampling)
                            tag = "samples/mesh|generated|overlay"
                        writer.add_image(tag, grid, step)
                        save_png(grid, out / "samples" / f"step_{step:07d}.png")
                    if (cfg.checkpoint_every and step % cfg.checkpoint_every == 0) or end:
                        save_checkpoint(out, trainer, step=step, config=config_dict, base=base,
                                        state={"phase": phase, "train_modules": cfg.train_modules,
                                               "vae_steps": cfg.vae_steps, "tas_guarded": guarded,
                                               **{key: getattr(cfg, key) for key, _ in RESUME_MUST_MATCH}})
                        if cfg.guidance == "t2i-adapter":
                            save_adapter(components.guidance.adapter, out / ADAPTER_DIR)
                        else:
                            save_guidance(components.guidance, out / GUIDANCE_FILE)
                        if local_guidance is not None:
                            save_guidance(local_guidance, out / LOCAL_GUIDANCE_FILE)
                        if base and phase == "diffusion":
                            save_components(components, out / MODEL_DIR, trained_by=TRAINED_BY)
                        for old in checkpoints(out)[:-max(cfg.keep_checkpoints, 1)]:
                            shutil.rmtree(old, ignore_errors=True)
    finally:
        writer.close()
    if guarded:
        logger.warning("residual TAS target: %d rows had a shift term above --tas-residual-max %g and trained "
                       "without their TAS shift", guarded, cfg.tas_residual_max)
    return {"step": step, "loss": None if losses is None else float(losses.total), "tas_guarded": guarded,
            "guidance_path": str(out / (ADAPTER_DIR if cfg.guidance == "t2i-adapter" else GUIDANCE_FILE)),
            "model_path": str(out / MODEL_DIR) if base and (out / MODEL_DIR).is_dir() else None,
            "seconds": round(time.perf_counter() - began, 1)}


class _DatasetOption(argparse.Action):
    """``--dataset-option KEY=VALUE`` (repeatable) -> {KEY: VALUE} with the value read as YAML (true, 3, text)."""

    def __call__(self, parser, namespace, value, option_string=None):
        import yaml

        key, sep, text = value.partition("=")
        if not sep or not key.isidentifier():
            parser.error(f"{option_string} {value}: expected KEY=VALUE, e.g. one_person=true")
        options = dict(getattr(namespace, self.dest, None) or {})
        options[key] = yaml.safe_load(text)
        setattr(namespace, self.dest, options)


def parse_args(argv: Sequence[str] | None = None) -> TrainConfig:
    """TrainConfig from the defaults, then `--config FILE` (YAML with TrainConfig keys, e.g.
    configs/generator/train-sd15.yaml), then the flags given on the command line."""
    from omegaconf import OmegaConf

    d = TrainConfig()
    p = argparse.ArgumentParser(prog="python -m generator.train", description=__doc__.split("\n\n")[0],
                                argument_default=argparse.SUPPRESS)
    p.add_argument("--config", help="YAML of training settings (keys as TrainConfig; flags override it)")
    p.add_argument("--dataset", help=f"dataset reader, a hands.datasets.build_dataset name ({d.dataset})")
    p.add_argument("--data-root", help="dataset folder (default: the cached synthlab, written on first use)")
    p.add_argument("--split", help=f"({d.split})")
    p.add_argument("--dataset-option", dest="dataset_options", action=_DatasetOption, metavar="KEY=VALUE",
                   help="reader option (repeatable), e.g. --dataset-option one_person=true --dataset-option "
                        "require_fit=true for the paper's MSCOCO data")
    p.add_argument("--mano-dir", help="official MANO files (default: the procedural hand model)")
    p.add_argument("--generator-config", help=f"tiny-synthlab-init | tiny | sd15 | a YAML path ({d.generator_config})")
    p.add_argument("--sd-path", help="local Stable Diffusion 1.5 folder (diffusers layout)")
    p.add_argument("--set", dest="overrides", action="append", metavar="KEY=VALUE",
                   help="generator config override, e.g. --set seed=1 (repeatable)")
    p.add_argument("--out", help=f"run folder ({d.out})")
    p.add_argument("--steps", type=int, help=f"diffusion-phase steps (after --vae-steps); a resumed run continues ({d.steps})")
    p.add_argument("--batch-size", type=int, help=f"({d.batch_size})")
    p.add_argument("--lr", type=float, help=f"AdamW learning rate ({d.lr})")
    p.add_argument("--weight-decay", type=float, help=f"({d.weight_decay})")
    p.add_argument("--size", type=int, help="generator resolution (default: 64 tiny, 512 SD)")
    p.add_argument("--framing", choices=FRAMINGS,
                   help=f"global window: the whole frame (the paper's) or the hands' box x --extend ({d.framing})")
    p.add_argument("--extend", type=float, help=f"--framing hands: window = union hand box squared x this ({d.extend})")
    p.add_argument("--local-scale", type=float, help=f"local crop box scale ({d.local_scale})")
    p.add_argument("--lambda-global", type=float, help=f"({d.lambda_global})")
    p.add_argument("--lambda-local", type=float, help=f"({d.lambda_local})")
    p.add_argument("--tas-updates", type=int, help=f"TAS latent updates per step; the reference: 50 ({d.tas_updates})")
    p.add_argument("--tas-schedule", choices=("reference", "paper", "constant"),
                   help=f"TAS step sizes; constant: no step-size regularisation (ablation) ({d.tas_schedule})")
    p.add_argument("--tas-loss", choices=("tas", "lb"),
                   help=f"loss of the TAS update: L_TAS or the load-balancing L_LB (ablation) ({d.tas_loss})")
    p.add_argument("--no-tas-smoothing", dest="tas_smoothing", action="store_false",
                   help="L_TAS without its Gaussian filter (ablation)")
    p.add_argument("--guidance", choices=GUIDANCE_KINDS,
                   help=f"the trained mesh guidance: phi_g (ControlNet) or a T2I-Adapter (baseline) ({d.guidance})")
    p.add_argument("--no-local-branch", dest="local_branch", action="store_false",
                   help="train the global branch only (ablation; with --tas-updates 0: the ControlNet baseline)")
    p.add_argument("--fresh-guidance", action="store_true",
                   help="phi_g starts fresh (a copy of the UNet's encoder) even where the generator has guidance weights")
    p.add_argument("--separate-weights", action="store_true",
                   help="the local branch gets its own ControlNet (ablation; Table 4 'Separated')")
    p.add_argument("--tas-target", choices=TAS_TARGETS,
                   help=f"target of the TAS-shifted latent: epsilon (reference code) or residual (paper text) "
                        f"({d.tas_target})")
    p.add_argument("--tas-residual-max", type=float,
                   help=f"residual target guard: rows whose shift term has RMS above this train as without TAS, "
                        f"counted ({d.tas_residual_max})")
    p.add_argument("--train-modules", choices=tuple(TRAIN_MODULES),
                   help=f"guidance: phi_g only (a pretrained SD); all: UNet, text encoder and phi_g ({d.train_modules})")
    p.add_argument("--vae-steps", type=int, help=f"VAE training steps before the diffusion steps ({d.vae_steps})")
    p.add_argument("--vae-lr", type=float, help=f"({d.vae_lr})")
    p.add_argument("--kl-weight", type=float, help=f"VAE KL weight ({d.kl_weight})")
    p.add_argument("--caption-dropout", type=float, help=f"probability of an empty caption ({d.caption_dropout})")
    p.add_argument("--mesh-dropout", type=float,
                   help=f"probability that a sample trains on black mesh images, so that its text has to draw the "
                        f"hands ({d.mesh_dropout})")
    p.add_argument("--attention-loss", type=float,
                   help=f"weight of an auxiliary loss pulling the hand tokens' cross-attention onto the mesh "
                        f"silhouette (not in the paper; TokenCompose's grounding loss; docs/fidelity.md) "
                        f"({d.attention_loss})")
    p.add_argument("--default-prompt", help=f"caption of samples without meta['prompt'] ({d.default_prompt!r})")
    p.add_argument("--sample-every", type=int, help=f"steps between sample grids; 0: at the end ({d.sample_every})")
    p.add_argument("--sample-steps", type=int, help=f"DDIM steps of the sample grids ({d.sample_steps})")
    p.add_argument("--checkpoint-every", type=int, help=f"({d.checkpoint_every})")
    p.add_argument("--keep-checkpoints", type=int, help=f"({d.keep_checkpoints})")
    p.add_argument("--resume", help="checkpoint folder, or a run folder (its latest checkpoint)")
    p.add_argument("--seed", type=int, help=f"({d.seed})")
    p.add_argument("--device", help=f"auto | cpu | cuda | cuda:N ({d.device})")
    p.add_argument("--num-workers", type=int, help=f"data loader workers ({d.num_workers})")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    given = vars(p.parse_args(argv))
    layers = [OmegaConf.structured(TrainConfig)]
    config_file = given.pop("config", None)
    if config_file is not None:
        layers.append(OmegaConf.load(resolve_config_path(config_file)))
    layers.append(OmegaConf.create(given))
    return OmegaConf.to_object(OmegaConf.merge(*layers))


def user_errors() -> tuple[type[BaseException], ...]:
    """What a bad flag, file or folder raises here (and in generator.figures): reported in one line."""
    import yaml
    from omegaconf.errors import OmegaConfBaseException

    return (ValueError, OSError, IndexError, OmegaConfBaseException, yaml.YAMLError)  # ValueError: DatasetError, MANOError


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        cfg = parse_args(argv)
        result = train(cfg)
    except user_errors() as error:
        print(f"generator.train: error: {' '.join(str(error).split()) or type(error).__name__}", file=sys.stderr)
        return 2
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
