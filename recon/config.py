"""The configuration of a training run: typed dataclasses, YAML files, ``key=value`` overrides.

One config system (OmegaConf structured configs) with strict keys. A run's config is built in layers, each
overriding the previous one:

1. the dataclass defaults below;
2. ``configs/recon/<profile>.yaml`` (``demo``: sized for 2 CPU cores; ``paper``: the recipe of the paper);
3. ``configs/recon/<arch>.yaml`` and ``configs/recon/<arch>.<profile>.yaml`` when they exist (the
   regressor's constructor arguments under ``model:``);
4. ``--config FILE``;
5. the command-line flags (``--epochs``, ``--batch-size``, ...);
6. ``key=value`` overrides (``optim.lr=3e-4 model.backbone=resnet34``).

An unknown key or a value of the wrong type fails with one line naming the key and where it came from. A value
that a ``--config FILE`` leaves ``???`` (OmegaConf's mandatory value) must be given by a flag or an override,
else one line names it. A relative ``train.backbone_weights`` written in a ``--config FILE`` is relative to that
file's folder (as a generator config's ``sd_path``), so that ``configs/recon/intaghand-pretrained.yaml`` finds the
shipped encoder from any working directory; it is recorded relative to the working directory when the file lies
under it, else as an absolute path. One given by a flag or an override is relative to the working directory.
The ``model`` section is checked against the regressor's constructor signature (its annotated keyword
arguments are its schema). :func:`from_config` is the one place where a config becomes constructor
arguments.
"""
import dataclasses
import inspect
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from mixing.config import MixingConfig

__all__ = [
    "ConfigError",
    "DataConfig",
    "OptimConfig",
    "TrainConfig",
    "EvalConfig",
    "RunConfig",
    "CONFIG_DIR",
    "load_config",
    "from_config",
    "model_schema",
    "to_dict",
    "from_dict",
]

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "recon"
PROFILES = ("demo", "paper")


class ConfigError(ValueError):
    """A config problem, in one line that names the key and its source."""


@dataclass
class DataConfig:
    """Which data to train and test on and how samples become model inputs.

    root: a folder holding one sub-folder per dataset (``<root>/ih26m``, ``<root>/reih``, ``<root>/hic``,
        ``<root>/synthlab``), or the one dataset's own folder when a single dataset is named; None: the
        embedded synthlab benchmark (written on first use into the cache folder).
    train / test: dataset specs ``name`` or ``name:split`` (split defaults: synthlab train-lab / test-lab and
        test-wild; others train / test).
    image_size: (H, W) pixels of the model input.
    crop: the input protocol: "image" (the whole image made to the input's aspect ratio and resized; InterWild,
        whose box net finds the hands), "hands" (the union of the ground-truth hand boxes x1.3; the baseline) or
        "verts" (the square of 1.25x the extent of both hands' projected ground-truth vertices; IntagHand's
        ``cut_img``). Each arch states it in configs/recon/<arch>.yaml; a regressor that declares
        ``input_crop`` refuses the others (recon.data.check_input_protocol).
    augment: apply the training augmentation (else the test-time crop); augmentation: whose —
        "interwild" (:class:`hands.datasets.transforms.InterWildAugment`) or "intaghand"
        (:class:`hands.datasets.transforms.IntagHandAugment`), "dir" or "internet".
    augment_kwargs: keyword arguments for that augmentation's constructor, to change a range the reference fixes
        (e.g. ``data.augment_kwargs.rot_range_deg=30`` for IntagHand's in-plane turn of U[-30, 30] degrees instead of
        U[-90, 90]); empty: the reference's ranges. An argument the augmentation lacks is refused, named.
    """

    root: Optional[str] = None
    train: List[str] = field(default_factory=lambda: ["synthlab"])
    test: List[str] = field(default_factory=lambda: ["synthlab"])
    image_size: Tuple[int, int] = (128, 128)
    crop: str = "hands"  # "hands": the union of the ground-truth hand boxes x1.3; "image": the whole image
    augment: bool = True
    augmentation: str = "interwild"  # which training augmentation: interwild | intaghand | dir | internet (recon.data.train_transform)
    augment_kwargs: Dict[str, Any] = field(default_factory=dict)  # its constructor's arguments; {}: the reference's ranges
    train_frames: str = "all"  # "interacting_both_fits": IntagHand's training frames (recon.data._select_frames)
    num_workers: int = 0
    max_train_samples: Optional[int] = None
    max_test_samples: Optional[int] = None


@dataclass
class OptimConfig:
    """Adam (``optimizer: adamw``: AdamW) with step decay: ``lr * lr_decay_gamma ** (number of lr_decay_epochs
    <= epoch + number of lr_decay_steps <= step)`` (milestones in epochs, and in optimizer steps for schedules
    that must not depend on how many real samples a batch holds, as recon.table2's equal-steps runs); or
    ``schedule: cosine``: ``lr * (1 + cos(pi * epoch / train.epochs)) / 2``, set per epoch (PyTorch's
    CosineAnnealingLR stepped once per epoch with T_max = the epochs and eta_min = 0, DIR's schedule), or per
    step over ``train.max_steps`` when that is set. ``cosine_phases`` (epochs per phase) restarts the cosine at
    the start of each phase and anneals it over that phase's ``cosine_periods`` entry (default: its length):
    IHMR's baseline (20 epochs over 20) then its refinement stages (each a fresh optimizer whose cosine runs over
    the reference's ``total_epoch`` default of 100, so its rate barely moves). Past the last phase the rate stays
    where the last phase's cosine reaches.
    With ``warmup_epochs`` > 0 the rate of epoch ``e < warmup_epochs`` is also multiplied by
    ``f + (1 - f) * e / warmup_epochs``, ``f = warmup_start`` (IntagHand's StepLR_withWarmUp: 3 epochs from
    1e-3 x lr)."""

    optimizer: str = "adam"  # adam | adamw
    schedule: str = "step"  # step | cosine
    lr: float = 1e-4
    weight_decay: float = 0.0
    lr_decay_epochs: List[int] = field(default_factory=list)
    lr_decay_steps: List[int] = field(default_factory=list)
    lr_decay_gamma: float = 0.1
    cosine_phases: List[int] = field(default_factory=list)  # schedule=cosine restarted per phase (epochs each)
    cosine_periods: List[int] = field(default_factory=list)  # each phase's cosine period in epochs (default: its length)
    warmup_epochs: int = 0
    warmup_start: float = 1e-3
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping


@dataclass
class TrainConfig:
    epochs: int = 1
    max_steps: Optional[int] = None  # stop after this many optimizer steps (across epochs)
    # a time budget (like Lightning's Trainer(max_time), but it ends the run at a checkpoint step and a resumed run
    # starts its budget again): end the run at the first checkpoint step (a multiple of ckpt_every) reached after
    # this many minutes of this process's training loop (setup, the first generated batch and the evaluation not
    # counted), at most max_steps; None: no budget. The run's length then depends on the machine (its steps are in
    # the final checkpoint, and with eval.at_end in metrics.json's "time_budget"); the learning-rate schedule still
    # runs over max_steps / epochs and is cut where the budget ends it. For demos on machines of unknown speed
    # (`make demo`); recon.table2 refuses it (its runs are compared at equal steps)
    max_minutes: Optional[float] = None
    batch_size: int = 16  # per process
    synthetic_ratio: float = 0.0  # share of each batch from the generator (mixing package), 0 <= r < 1
    # what batch_size counts when r > 0 (mixing.mixer.batch_parts): "share": every sample, round(r * B) of them
    # generated (fewer real images a step than at r = 0); "add": the real samples, the generated ones on top, about
    # the share r of the batch (round(r * B / (1 - r)); 16 real at r = 0.3: 16 + 7), the same real images a step as
    # at r = 0
    synthetic_batch: str = "share"
    ckpt_every: int = 200  # steps between checkpoints (a final one is always written)
    # evaluate and export (OUT/averaged/) the mean of the weights of the run's last N checkpoints (SWA over saved
    # checkpoints, BatchNorm statistics averaged too; recon.checkpoint.average_checkpoints); 1: the final weights
    average_last: int = 1
    # the clock of everything counted in epochs (optim.lr_decay_epochs, the warm-up, the per-epoch cosine and its
    # phases, the regressor's set_epoch: IntagHand's edge term) in optimizer steps: epoch = step // epoch_steps;
    # None: the passes over the real data. recon.table2's equal-steps runs set it to the reference run's steps per
    # epoch, so that a run with r > 0 (fewer real samples a batch) switches everything at the reference's steps
    epoch_steps: Optional[int] = None
    log_every: int = 10  # steps between TensorBoard scalars
    image_every: int = 100  # steps between TensorBoard image grids; 0 disables them
    backbone_weights: Optional[str] = None  # a file the regressor's load_backbone_weights() reads
    # speed (docs/performance.md): mixed precision of the forward pass: off | bf16 | fp16 (with a GradScaler) |
    # auto (on CUDA bf16 where supported, else fp16; off on the CPU); losses, MANO and evaluation stay fp32
    amp: str = "off"
    channels_last: bool = False  # the regressor and its input images in channels-last memory format
    compile: bool = False  # torch.compile the training forward pass (evaluation runs the plain model)


@dataclass
class EvalConfig:
    batch_size: int = 16
    at_end: bool = True


@dataclass
class RunConfig:
    """Everything a run needs; written into every checkpoint."""

    arch: str = "baseline"
    profile: str = "demo"
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    threads: Optional[int] = None  # torch intra-op CPU threads (torch.set_num_threads); None: torch's default
    out: str = "runs/recon"
    mano_dir: Optional[str] = None  # official MANO_RIGHT/LEFT.pkl; None: the procedural hand
    model: Dict[str, Any] = field(default_factory=dict)  # the regressor's constructor arguments
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    mixing: MixingConfig = field(default_factory=MixingConfig)  # how generated samples enter (r > 0)


def _schema() -> DictConfig:
    """RunConfig as a strict OmegaConf node; ``model`` and ``data.augment_kwargs`` stay open (the regressor's and the
    augmentation's signatures check them)."""
    cfg = OmegaConf.structured(RunConfig)
    OmegaConf.set_struct(cfg, True)
    OmegaConf.set_struct(cfg.model, False)
    OmegaConf.set_struct(cfg.data.augment_kwargs, False)
    return cfg


def _one_line(error: OmegaConfBaseException, source: str) -> ConfigError:
    key = getattr(error, "full_key", None) or "?"
    message = str(getattr(error, "msg", None) or error).splitlines()[0]
    if "not in" in message and "Key" in message:
        return ConfigError(f"config ({source}): unknown key '{key}'")
    return ConfigError(f"config ({source}): bad value for '{key}': {message}")


# String keys that take the word "off": YAML (a config file, a key=value override) reads a bare off as false.
OFF_KEYS = ("train.amp", "mixing.compile")


def _merge(base: DictConfig, layer: Any, source: str) -> DictConfig:
    try:
        layer_cfg = layer if isinstance(layer, DictConfig) else OmegaConf.create(layer)
        for key in OFF_KEYS:
            if OmegaConf.select(layer_cfg, key, default=None) is False:
                layer_cfg = OmegaConf.create(OmegaConf.to_container(layer_cfg))  # a copy: the layer may be read-only
                OmegaConf.update(layer_cfg, key, "off")
        return OmegaConf.merge(base, layer_cfg)
    except OmegaConfBaseException as error:
        raise _one_line(error, source) from None


def _read_yaml(path: Path, source: str) -> DictConfig:
    if not path.is_file():
        raise ConfigError(f"config ({source}): no such file {path}")
    try:
        loaded = OmegaConf.load(path)
    except Exception as error:  # yaml.YAMLError and OmegaConf's own errors
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ConfigError(f"config ({source}): cannot parse {path}: {first}") from None
    if not isinstance(loaded, DictConfig):
        raise ConfigError(f"config ({source}): {path} must hold a mapping at the top level")
    return loaded


def _parse_overrides(overrides: List[str]) -> DictConfig:
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ConfigError(f"override {item!r}: expected key=value (e.g. optim.lr=3e-4)")
    try:
        return OmegaConf.from_dotlist(list(overrides))
    except OmegaConfBaseException as error:
        raise _one_line(error, "key=value overrides") from None
    except yaml.YAMLError as error:  # the value is not YAML, e.g. a flow mapping written without spaces
        for item in overrides:
            try:
                OmegaConf.from_dotlist([item])
            except yaml.YAMLError as item_error:
                problem = str(getattr(item_error, "problem", None) or item_error).splitlines()[0]
                hint = ""
                if "{" in item.split("=", 1)[1]:
                    hint = ("; set one key at a time, e.g. model.backbone_kwargs.channels=[32,64,128,256], "
                            "or write {key: value} with a space")
                raise ConfigError(f"override {item!r}: its value is not YAML ({problem}){hint}") from None
        raise ConfigError(f"key=value overrides: not YAML ({error})".splitlines()[0]) from None


_ABSENT = object()  # a key no flag or override gives (an explicit KEY=null override gives null, on purpose)
# the command-line flag of a key a config file may leave ??? (recon.train's flags; named in the error)
_FLAG_OF = {"train.backbone_weights": "--backbone-weights FILE", "mano_dir": "--mano-dir DIR", "data.root": "--data-root DIR"}


def load_config(
    *,
    profile: Optional[str] = None,
    arch: Optional[str] = None,
    config_file: Optional[str] = None,
    flags: Optional[Dict[str, Any]] = None,
    overrides: Optional[List[str]] = None,
    base: Optional[DictConfig] = None,
) -> DictConfig:
    """Build a run's config from the layers described in the module docstring.

    profile / arch: None takes them from the later layers (or the defaults). flags: dotted keys from
    command-line flags, e.g. ``{"train.epochs": 2}`` (None values are skipped). overrides: ``key=value``
    strings. base: a complete config (a checkpoint's, when resuming) that replaces layers 1-4.
    Returns a read-only, fully typed DictConfig. Raises ConfigError with one line.
    """
    flags = {key: value for key, value in (flags or {}).items() if value is not None}
    override_cfg = _parse_overrides(overrides or [])
    file_cfg = _read_yaml(Path(config_file), f"--config {config_file}") if config_file else OmegaConf.create()
    if config_file:
        _paths_relative_to(file_cfg, Path(config_file).parent)
    flag_cfg = OmegaConf.create()
    for key, value in flags.items():
        OmegaConf.update(flag_cfg, key, value, force_add=True)

    if base is not None:
        cfg = _merge(_schema(), base, "checkpoint config")
        cfg = _merge(cfg, flag_cfg, "command-line flags")
        cfg = _merge(cfg, override_cfg, "key=value overrides")
        OmegaConf.set_readonly(cfg, True)
        return cfg

    # The profile and the arch decide which files come in; the later layers may name them.
    def pick(key: str, explicit: Optional[str], default: str) -> str:
        if explicit is not None:
            return explicit
        for layer in (override_cfg, flag_cfg, file_cfg):
            value = OmegaConf.select(layer, key)
            if value is not None:
                return str(value)
        return default

    profile = pick("profile", profile, RunConfig.profile)
    arch = pick("arch", arch, RunConfig.arch)
    if profile not in PROFILES:
        raise ConfigError(f"--profile {profile}: expected one of {', '.join(PROFILES)}")

    cfg = _schema()
    cfg = _merge(cfg, _read_yaml(CONFIG_DIR / f"{profile}.yaml", f"profile {profile}"), f"{profile}.yaml")
    for name in (f"{arch}.yaml", f"{arch}.{profile}.yaml"):
        if (CONFIG_DIR / name).is_file():
            cfg = _merge(cfg, _read_yaml(CONFIG_DIR / name, name), name)
    for key in sorted(OmegaConf.missing_keys(file_cfg)):  # merging ??? keeps the earlier layers' value: ask here
        if all(OmegaConf.select(layer, key, default=_ABSENT) is _ABSENT for layer in (flag_cfg, override_cfg)):
            flag = _FLAG_OF.get(key)
            raise ConfigError(f"--config {config_file}: {key} is required (??? there); give "
                              + (f"{flag} or " if flag else "") + f"{key}=VALUE")
    cfg = _merge(cfg, file_cfg, f"--config {config_file}")
    cfg = _merge(cfg, flag_cfg, "command-line flags")
    cfg = _merge(cfg, override_cfg, "key=value overrides")
    cfg = _merge(cfg, {"profile": profile, "arch": arch}, "command-line flags")
    OmegaConf.set_readonly(cfg, True)
    return cfg


# Keys whose relative value in a --config file is read from that file's folder (see the module docstring).
FILE_RELATIVE_KEYS = ("train.backbone_weights",)


def _paths_relative_to(layer: DictConfig, folder: Path) -> None:
    """Rewrite each relative :data:`FILE_RELATIVE_KEYS` value of a config file's ``layer`` as the path it names from
    ``folder``: relative to the working directory when it lies under it, else absolute. ``???``, null,
    interpolations and absolute paths stay as written."""
    for key in FILE_RELATIVE_KEYS:
        section_key, _, leaf = key.rpartition(".")
        section = OmegaConf.select(layer, section_key, default=None)
        if not isinstance(section, DictConfig) or leaf not in section:
            continue
        if OmegaConf.is_missing(section, leaf) or OmegaConf.is_interpolation(section, leaf):
            continue
        value = section[leaf]
        if not isinstance(value, str) or not value or Path(value).expanduser().is_absolute():
            continue
        path = (folder / Path(value).expanduser()).resolve()
        try:
            section[leaf] = str(path.relative_to(Path.cwd().resolve()))
        except ValueError:
            section[leaf] = str(path)


def model_schema(cls: type) -> type:
    """A dataclass whose fields are the keyword arguments of ``cls.__init__`` (annotations and defaults),
    so that OmegaConf checks a ``model:`` section against the constructor. Unannotated arguments and types
    OmegaConf cannot check become ``Any``."""
    signature = inspect.signature(cls.__init__)
    try:
        hints = typing.get_type_hints(cls.__init__)
    except Exception:  # an annotation that does not resolve: check names only
        hints = {}
    fields = []
    for name, parameter in signature.parameters.items():
        if name == "self" or parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
            continue
        annotation = hints.get(name, Any)
        default = parameter.default
        if default is inspect.Parameter.empty:
            spec = field(default=None)
            annotation = Optional[annotation] if annotation is not Any else Any
        elif isinstance(default, (list, dict, set)):
            spec = field(default_factory=lambda value=default: type(value)(value))
        else:
            spec = field(default=default)
        fields.append((name, annotation, spec))
    schema = dataclasses.make_dataclass(f"{cls.__name__}Args", fields)
    try:
        OmegaConf.structured(schema)
    except OmegaConfBaseException:
        loose = [(name, Any, spec) for name, _, spec in fields]
        schema = dataclasses.make_dataclass(f"{cls.__name__}Args", loose)
    return schema


def from_config(cfg: DictConfig, cls: type) -> Dict[str, Any]:
    """The regressor's constructor arguments from a run config: the ``model`` section, checked against the
    constructor of ``cls`` (unknown keys / wrong types raise ConfigError naming ``model.<key>``), plus
    ``mano_dir`` when the constructor takes it and the model section does not set it."""
    schema_cls = model_schema(cls)
    known = [f.name for f in dataclasses.fields(schema_cls)]
    for key in cfg.model:
        if key not in known:
            raise ConfigError(
                f"config: unknown key 'model.{key}' for regressor {cfg.arch!r}; it takes: {', '.join(known)}"
            )
    try:
        # Not struct: dict-typed arguments (e.g. backbone_kwargs) take any keys; the types are checked.
        checked = OmegaConf.merge(OmegaConf.structured(schema_cls), cfg.model)
    except OmegaConfBaseException as error:
        key = getattr(error, "full_key", None) or "?"
        message = str(getattr(error, "msg", None) or error).splitlines()[0]
        raise ConfigError(f"config: bad value for 'model.{key}': {message}") from None
    given = set(cfg.model.keys())
    kwargs = OmegaConf.to_container(checked, resolve=True)  # every argument, defaults filled in, typed
    parameters = inspect.signature(cls.__init__).parameters
    if "mano_dir" in parameters and "mano_dir" not in given:
        kwargs["mano_dir"] = cfg.mano_dir
    for name, parameter in parameters.items():
        if parameter.default is inspect.Parameter.empty and name in kwargs and name not in given:
            raise ConfigError(f"config: regressor {cfg.arch!r} needs 'model.{name}' (it has no default)")
    return kwargs


def to_dict(cfg: DictConfig) -> Dict[str, Any]:
    """A plain, JSON-serialisable dict of a config (tuples become lists)."""
    return OmegaConf.to_container(cfg, resolve=True)


def from_dict(data: Dict[str, Any]) -> DictConfig:
    """The inverse of :func:`to_dict`, checked against :class:`RunConfig` (for checkpoints)."""
    cfg = _merge(_schema(), data, "checkpoint")
    OmegaConf.set_readonly(cfg, True)
    return cfg
