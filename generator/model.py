"""Building the generator's components: tokenizer, CLIP text model, VAE, UNet, scheduler, guidance ControlNet.

Two sources, one code path afterwards:
- `sd_path`: a local Stable Diffusion 1.5 folder in diffusers layout (model_index.json, unet/, vae/,
  text_encoder/, tokenizer/, scheduler/), loaded with `local_files_only=True`. A project-trained checkpoint is
  the same layout (written by `save_components`) plus a `guidance/` ControlNet folder, so it loads the same way.
- no `sd_path`: the built-in tiny configuration (`TinyArchitecture`), randomly initialised from `seed`.

The guidance module comes from `guidance_path` (a diffusers ControlNet folder, or a .safetensors state dict of
`ControlNetModel.from_unet(unet)`), else from `<sd_path>/guidance/` when present, else it is made fresh from the
UNet (`ControlNetModel.from_unet`: encoder copied, zero convolutions).

Configuration: typed keyword-only dataclasses (`GeneratorConfig`), merged with a YAML file from
configs/generator/ and `key=value` overrides by `load_config` (OmegaConf; unknown keys and wrong types fail).
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

import torch

from .text import CLIP_MAX_LENGTH, END_TOKEN, START_TOKEN, load_clip_tokenizer
from .visual_attention import GuidanceModule

# SD 1.5's noise schedule (the reference's "linear" LDM schedule = diffusers' scaled_linear), DDIM settings.
SD15_SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1, "prediction_type": "epsilon",
}
CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs" / "generator"
SHIPPED_WEIGHTS = Path(__file__).resolve().parent / "weights"  # the project's own trained generators


@dataclass(kw_only=True)
class TinyArchitecture:
    """The built-in tiny generator (random init; sizes as in design/PERFORMANCE.md). Every UNet level has
    cross-attention, so TAS has maps at any level. The VAE has 4 levels (factor 8, as SD)."""

    unet_channels: tuple[int, ...] = (32, 64)  # one CrossAttn down/up block per entry
    layers_per_block: int = 1
    attention_heads: int = 4
    cross_attention_dim: int = 32  # also the CLIP text model's hidden size
    latent_size: int = 8  # default sample size: latent_size * 2 ** (len(vae_channels) - 1) pixels
    vae_channels: tuple[int, ...] = (16, 32, 32, 32)  # n levels: a VAE of factor 2 ** (n - 1)
    text_layers: int = 2
    text_heads: int = 4
    text_intermediate_size: int = 37


@dataclass(kw_only=True)
class SamplingConfig:
    """Defaults of `AttentionHandPipeline.__call__` (the reference's inference: DDIM 20 steps, eta 0, guidance 9,
    control strength 1; it applies no TAS at sampling, so tas_steps defaults to 0)."""

    num_inference_steps: int = 20
    guidance_scale: float = 9.0
    eta: float = 0.0
    conditioning_scale: float = 1.0
    tas_steps: int = 0
    tas_schedule: Literal["reference", "paper"] = "reference"
    tas_scale: float = 20.0
    tas_start: float = 1.0
    tas_end: float = 0.5


@dataclass(kw_only=True)
class GeneratorConfig:
    """Everything needed to build the generator; see the module docstring for the sources."""

    sd_path: str | None = None
    guidance_path: str | None = None
    tiny: TinyArchitecture = field(default_factory=TinyArchitecture)
    seed: int = 0
    guidance_embedding_channels: tuple[int, ...] = (16, 32, 96, 256)
    scheduler: str = "DDIMScheduler"
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    attention_downsample: int = 4  # TAS attention resolution = latent size / this (16 for 64 x 64 latents)
    prompts: Literal["wild", "synthlab"] = "wild"  # the prompt bank it is sampled with (generator.prompts)
    framing: Literal["frame", "hands"] = "frame"  # the global window it was trained on (generator.framing)
    extend: float = 1.5  # framing "hands": union hand box squared x this
    sampling: SamplingConfig = field(default_factory=SamplingConfig)


def resolve_config_path(name: str | Path) -> Path:
    """A YAML path, or a bare name of a file in configs/generator/ ("tiny" -> configs/generator/tiny.yaml);
    FileNotFoundError naming both when neither exists."""
    path = Path(name)
    if not path.suffix and not path.exists():
        path = CONFIG_DIR / f"{name}.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"generator config not found: {name} (nor {path})")
    return path


PATH_KEYS = ("sd_path", "guidance_path")


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> GeneratorConfig:
    """GeneratorConfig from a YAML file (a name like "tiny" means configs/generator/tiny.yaml) and `key=value`
    overrides (e.g. "sampling.tas_steps=5"). Unknown keys or wrong types raise, naming the key.

    A relative sd_path / guidance_path written in the YAML file is relative to that file's folder (so the shipped
    configs find the shipped weights from any working directory); one given as an override is relative to the
    working directory, as any command-line path."""
    from omegaconf import OmegaConf

    layers = []
    if path is not None:
        path = resolve_config_path(path)
        layer = OmegaConf.load(path)
        for key in PATH_KEYS:
            if key not in layer or OmegaConf.is_missing(layer, key):
                continue
            if OmegaConf.is_interpolation(layer, key):
                continue  # ${...} resolves later, as written
            value = layer.get(key)
            if not isinstance(value, str) or not value:
                continue
            value = Path(value).expanduser()
            layer[key] = str(value if value.is_absolute() else (path.parent / value).resolve())
        layers.append(layer)
    if overrides:
        layers.append(OmegaConf.from_dotlist(list(overrides)))
    if layers:  # a '???' value in the file is a required setting (merging would silently keep the default)
        given = OmegaConf.merge(*layers)
        required = [k for k in given if OmegaConf.is_missing(given, k)]
        if required:
            raise ValueError(f"{path} needs {', '.join(required)}: pass e.g. {required[0]}=/path/to/folder")
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(GeneratorConfig), *layers))


@dataclass
class GeneratorComponents:
    """The generator's parts. unet, vae and text_encoder are frozen (eval, no grad); guidance is phi_g."""

    tokenizer: Any
    text_encoder: torch.nn.Module
    vae: torch.nn.Module
    unet: torch.nn.Module
    scheduler: Any
    guidance: GuidanceModule

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def default_size(self) -> int:
        """The image size the UNet was built for: its latent sample_size x the VAE's factor (512 for SD 1.5)."""
        sample = self.unet.config.sample_size
        sample = sample[0] if isinstance(sample, (tuple, list)) else sample
        return int(sample) * self.vae_scale_factor

    @classmethod
    def from_config(cls, config: "GeneratorConfig") -> "GeneratorComponents":
        """The components described by `config` (CPU); same as `build_components`."""
        return build_components(config)

    def to(self, device=None, dtype=None) -> "GeneratorComponents":
        for module in (self.text_encoder, self.vae, self.unet, self.guidance):
            module.to(**_to_kwargs(device, dtype))
        return self

    def encode_prompts(self, prompts: Sequence[str], device=None) -> torch.Tensor:
        """CLIP text embeddings K of the prompts: (B, 77, D) on `device` (default: the text encoder's)."""
        return encode_prompts(self.tokenizer, self.text_encoder, prompts, device)


def encode_prompts(tokenizer, text_encoder, prompts: Sequence[str], device=None) -> torch.Tensor:
    """K = CLIP(U) (Eq. 1): last hidden states (B, 77, D) of the text model for B prompts (padded/truncated
    to 77 tokens, as SD 1.5), on `device` (default: the text encoder's device)."""
    device = device if device is not None else next(text_encoder.parameters()).device
    ids = tokenizer(list(prompts), padding="max_length", max_length=CLIP_MAX_LENGTH, truncation=True,
                    return_tensors="pt").input_ids.to(device)
    return text_encoder(ids, return_dict=False)[0]


def _to_kwargs(device, dtype) -> dict:
    """Only the arguments given: diffusers warns about fp32 modules whenever a dtype key is passed, even None."""
    return {k: v for k, v in (("device", device), ("dtype", dtype)) if v is not None}


def _groups(channels: Sequence[int]) -> int:
    return math.gcd(32, *channels)


def build_tiny_components(arch: TinyArchitecture, *, seed: int = 0, scheduler: str = "DDIMScheduler",
                          guidance_embedding_channels: Sequence[int] = (8, 16, 16, 32)) -> GeneratorComponents:
    """The tiny configuration, randomly initialised from `seed` (the global RNG is left untouched)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = load_clip_tokenizer()
    n = len(arch.unet_channels)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=arch.latent_size, in_channels=4, out_channels=4, block_out_channels=tuple(arch.unet_channels),
            layers_per_block=arch.layers_per_block, down_block_types=("CrossAttnDownBlock2D",) * n,
            up_block_types=("CrossAttnUpBlock2D",) * n, cross_attention_dim=arch.cross_attention_dim,
            attention_head_dim=arch.attention_heads, norm_num_groups=_groups(arch.unet_channels))
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, block_out_channels=tuple(arch.vae_channels),
            down_block_types=("DownEncoderBlock2D",) * len(arch.vae_channels),
            up_block_types=("UpDecoderBlock2D",) * len(arch.vae_channels), layers_per_block=1,
            norm_num_groups=_groups(arch.vae_channels),
            sample_size=arch.latent_size * 2 ** (len(arch.vae_channels) - 1))
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=arch.cross_attention_dim,
            intermediate_size=arch.text_intermediate_size,
            num_hidden_layers=arch.text_layers, num_attention_heads=arch.text_heads,
            max_position_embeddings=CLIP_MAX_LENGTH, projection_dim=arch.cross_attention_dim,
            bos_token_id=tokenizer.convert_tokens_to_ids(START_TOKEN),
            eos_token_id=tokenizer.convert_tokens_to_ids(END_TOKEN),
            pad_token_id=tokenizer.convert_tokens_to_ids(END_TOKEN)))
        guidance = GuidanceModule.from_unet(
            unet, conditioning_embedding_out_channels=tuple(guidance_embedding_channels))
    return _finish(tokenizer, text_encoder, vae, unet, _make_scheduler(scheduler, SD15_SCHEDULER_CONFIG), guidance)


def _make_scheduler(name: str, config: dict):
    import diffusers

    cls = getattr(diffusers, name, None)
    if cls is None or not hasattr(cls, "from_config") or not name.endswith("Scheduler"):
        raise ValueError(f"unknown diffusers scheduler {name!r} (e.g. DDIMScheduler, PNDMScheduler, "
                         "EulerDiscreteScheduler, DPMSolverMultistepScheduler)")
    return cls.from_config(config)


def _finish(tokenizer, text_encoder, vae, unet, scheduler, guidance) -> GeneratorComponents:
    for module in (text_encoder, vae, unet):
        module.requires_grad_(False).eval()
    return GeneratorComponents(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, unet=unet,
                               scheduler=scheduler, guidance=guidance)


def _has_weights(folder: Path, stems: Sequence[str]) -> bool:
    return folder.is_dir() and any(p.name.startswith(stems) and p.suffix in (".safetensors", ".bin")
                                   for p in folder.iterdir())


def check_sd_folder(sd_path: str | Path) -> Path:
    """Raise ValueError naming what is missing when `sd_path` is not an SD folder in diffusers layout."""
    root = Path(sd_path)
    if not root.is_dir():
        raise ValueError(f"--sd-path {root} is not a folder")
    missing = [name for name in ("model_index.json", "unet/config.json", "vae/config.json",
                                 "text_encoder/config.json") if not (root / name).is_file()]
    for sub, stems in (("unet", ("diffusion_pytorch_model",)), ("vae", ("diffusion_pytorch_model",)),
                       ("text_encoder", ("model", "pytorch_model"))):
        if not _has_weights(root / sub, stems):
            missing.append(f"{sub}/{stems[0]}.safetensors")
    if missing:
        raise ValueError(f"{root} is not a Stable Diffusion folder in diffusers layout: missing {', '.join(missing)}")
    empty = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and p.stat().st_size == 0
                   and (p.suffix in (".json", ".safetensors", ".bin") or p.name == "merges.txt"))
    if empty:
        raise ValueError(f"{root}: empty files {', '.join(empty[:4])}{', ...' if len(empty) > 4 else ''} "
                         "(an interrupted copy or download?)")
    return root


def _hint_channels(state: dict) -> tuple[int, ...] | None:
    """The mesh-image encoder's channels of a ControlNet state dict (conv_in, then every stride-2 block: diffusers'
    ControlNetConditioningEmbedding), so a .safetensors loads whatever channels it was trained with."""
    prefix = "controlnet_cond_embedding."
    if f"{prefix}conv_in.weight" not in state:
        return None
    channels, k = [int(state[f"{prefix}conv_in.weight"].shape[0])], 1
    while f"{prefix}blocks.{k}.weight" in state:
        channels.append(int(state[f"{prefix}blocks.{k}.weight"].shape[0]))
        k += 2
    return tuple(channels)


def load_guidance(unet, guidance_path: str | Path, *,
                  conditioning_embedding_out_channels: Sequence[int] = (16, 32, 96, 256)) -> GuidanceModule:
    """phi_g from a diffusers ControlNet folder or a .safetensors state dict of `ControlNetModel.from_unet(unet)`."""
    from diffusers import ControlNetModel

    path = Path(guidance_path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"guidance folder {path} has no config.json (expected a diffusers ControlNet folder)")
        return GuidanceModule(controlnet=ControlNetModel.from_pretrained(path, local_files_only=True))
    if path.suffix != ".safetensors" or not path.is_file():
        raise ValueError(f"guidance checkpoint {path} must be a .safetensors file or a diffusers ControlNet folder")
    from safetensors.torch import load_file

    state = load_file(str(path))
    if state and all(k.startswith("controlnet.") for k in state):
        state = {k[len("controlnet."):]: v for k, v in state.items()}
    conditioning_embedding_out_channels = _hint_channels(state) or conditioning_embedding_out_channels
    guidance = GuidanceModule.from_unet(unet, conditioning_embedding_out_channels=tuple(
        conditioning_embedding_out_channels))
    result = guidance.controlnet.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(f"guidance checkpoint {path} does not fit this UNet's ControlNet: "
                         f"{len(result.missing_keys)} missing keys (e.g. {result.missing_keys[:3]}), "
                         f"{len(result.unexpected_keys)} unexpected (e.g. {result.unexpected_keys[:3]})")
    return guidance


def load_sd_components(sd_path: str | Path, *, guidance_path: str | Path | None = None,
                       scheduler: str = "DDIMScheduler",
                       guidance_embedding_channels: Sequence[int] = (16, 32, 96, 256)) -> GeneratorComponents:
    """Components from a local SD 1.5 folder in diffusers layout (offline), see the module docstring."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    root = check_sd_folder(sd_path)
    unet = UNet2DConditionModel.from_pretrained(root, subfolder="unet", local_files_only=True)
    vae = AutoencoderKL.from_pretrained(root, subfolder="vae", local_files_only=True)
    text_encoder = CLIPTextModel.from_pretrained(root, subfolder="text_encoder", local_files_only=True)
    tokenizer = load_clip_tokenizer(root / "tokenizer" if (root / "tokenizer" / "vocab.json").is_file() else None)
    scheduler_file = root / "scheduler" / "scheduler_config.json"
    scheduler_config = json.loads(scheduler_file.read_text()) if scheduler_file.is_file() else SD15_SCHEDULER_CONFIG
    if guidance_path is None and (root / "guidance" / "config.json").is_file():
        guidance_path = root / "guidance"
    if guidance_path is not None:
        guidance = load_guidance(unet, guidance_path, conditioning_embedding_out_channels=guidance_embedding_channels)
    else:
        guidance = GuidanceModule.from_unet(
            unet, conditioning_embedding_out_channels=tuple(guidance_embedding_channels))
    return _finish(tokenizer, text_encoder, vae, unet, _make_scheduler(scheduler, scheduler_config), guidance)


def build_components(config: GeneratorConfig) -> GeneratorComponents:
    """The components described by `config` (on the CPU, in config.dtype)."""
    if config.sd_path:
        components = load_sd_components(config.sd_path, guidance_path=config.guidance_path,
                                        scheduler=config.scheduler,
                                        guidance_embedding_channels=config.guidance_embedding_channels)
    else:
        components = build_tiny_components(config.tiny, seed=config.seed, scheduler=config.scheduler,
                                           guidance_embedding_channels=config.guidance_embedding_channels)
        if config.guidance_path:
            components.guidance = load_guidance(components.unet, config.guidance_path,
                                                conditioning_embedding_out_channels=config.guidance_embedding_channels)
    if config.dtype != "float32":
        components.to(dtype=getattr(torch, config.dtype))
    return components


def save_components(components: GeneratorComponents, folder: str | Path, *, trained_by: str | None = None) -> Path:
    """Write the components as an SD folder in diffusers layout plus `guidance/` (loadable with `sd_path`).

    trained_by: recorded as model_index.json's "_trained_by" (how checkpoint cards tell the project's own
    generators from Stable Diffusion weights). The folder is written next to its destination and renamed into
    place, so a reader never sees half of it.
    """
    import diffusers

    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
    index = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": diffusers.__version__,
             "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
             "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
             "scheduler": ["diffusers", type(components.scheduler).__name__],
             "safety_checker": [None, None], "feature_extractor": [None, None], "requires_safety_checker": False}
    if trained_by:
        index["_trained_by"] = trained_by
    (tmp / "model_index.json").write_text(json.dumps(index, indent=2))
    components.unet.save_pretrained(tmp / "unet")
    components.vae.save_pretrained(tmp / "vae")
    components.text_encoder.save_pretrained(tmp / "text_encoder")
    components.tokenizer.save_pretrained(tmp / "tokenizer")
    components.scheduler.save_pretrained(tmp / "scheduler")
    components.guidance.controlnet.save_pretrained(tmp / "guidance")
    if folder.exists():
        old = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.old."))
        os.replace(folder, old / folder.name)
        os.replace(tmp, folder)
        shutil.rmtree(old)
    else:
        os.replace(tmp, folder)
    os.chmod(folder, 0o777 & ~_umask())  # mkdtemp made it 0700
    return folder


def is_project_generator(sd_path: str | Path) -> bool:
    """Whether an sd_path holds one of the project's own generators (the shipped weights, or an export of
    ``python -m generator.train --train-modules all``, marked in its model_index.json), not Stable Diffusion."""
    try:
        if Path(sd_path).resolve().is_relative_to(SHIPPED_WEIGHTS.resolve()):
            return True
        index = json.loads((Path(sd_path) / "model_index.json").read_text())
    except (OSError, ValueError):
        return False
    return bool(index.get("_trained_by"))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
