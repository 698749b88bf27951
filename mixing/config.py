"""The ``mixing`` section of a training run's config (and of ``python -m mixing.pregenerate``).

A typed dataclass, merged by recon's OmegaConf config system with strict keys; :mod:`mixing.build`
translates it into a source and a provider in one place.
"""
from dataclasses import dataclass
from typing import Optional

__all__ = ["MixingConfig", "MIX_MODES", "LABEL_SOURCES", "MESH_CONDITIONS"]

MIX_MODES = ("online", "sync", "offline")
LABEL_SOURCES = ("train", "prior")
GENERATOR_DTYPES = ("auto", "float32", "float16", "bfloat16")
COMPILE_MODES = ("off", "default", "reduce-overhead", "max-autotune")
MESH_CONDITIONS = ("mesh", "blank")


@dataclass
class MixingConfig:
    """How generated samples enter training.

    mode: ``online`` (a device-resident pool filled by a background producer), ``sync`` (generated inline;
        debugging, ablations) or ``offline`` (shards from ``python -m mixing.pregenerate``, in ``shards``).
    generator: ``attentionhand`` or a baseline of Table A (see :data:`generator.baselines.GENERATORS`).
    generator_config: a name in configs/generator/ (``tiny-synthlab``: the trained embedded default;
        ``tiny``: random init; ``sd15``) or a YAML path.
    sd_path / guidance_path: a local Stable Diffusion 1.5 folder (diffusers layout) and a guidance
        checkpoint; they override the generator config's.
    size: generator resolution (square images; 512 for SD 1.5).
    labels: ``train`` (MANO fits and cameras of the training set, never its images: its first reader that
        serves labels), a training dataset's name (that reader's fits, e.g. ``coco`` for MSCOCO's NeuralAnnot
        fits) or ``prior`` (the pose prior of hands.datasets.poses with random cameras).
    capacity / max_reuse / chunk: the pool's bound, how often a sample may be drawn, samples per generator call.
    max_pool_mib / max_producer_share: one device, two jobs (online mode; :class:`mixing.pool.SamplePool`): the
        most MiB the pool's samples hold (null: capacity only) and the most of the wall time the producer may
        spend generating (1: no cap); neither holds it back while the trainer would wait for samples.
    num_inference_steps / guidance_scale / tas_steps: sampling overrides (None: the generator config's).
    scheduler: a diffusers scheduler class name (None: the generator config's, DDIM as the reference samples),
        e.g. ``DPMSolverMultistepScheduler`` or ``UniPCMultistepScheduler`` with num_inference_steps 8-10: their
        agreement with 20-step DDIM and speed are in benchmarks/results/schedulers-cpu.md.
    framing / extend: the generation window, ``frame`` (the whole source frame) or ``hands`` (the union of the
        hand boxes squared, x extend); None: the generator config's (the framing it was trained in).
    use_local: also run VAS's local branch at sampling (its images are not used: the global images are the
        same without it, so it is off, as in the reference's inference).
    mesh_condition: ``mesh`` (the labels' meshes rendered as the generator's conditioning) or ``blank`` (the
        conditioning rendered without hands: images that do not follow their labels, recon.table2's control
        for a gain from regularisation alone; the labels are the drawn ones either way).
    dtype / channels_last / compile: the generator's speed options (:meth:`generator.pipeline.
        AttentionHandPipeline.optimize`, docs/performance.md). dtype ``auto``: bfloat16 on a CUDA device that
        supports it, else float16 there, the generator config's dtype on the CPU; or float32 / float16 / bfloat16.
        compile: ``off``, ``default``, ``reduce-overhead`` or ``max-autotune`` (torch.compile modes).
    math_attention: attention as plain matrix products instead of the fused SDPA kernel (float rounding apart,
        the same images; with ``compile`` on the CPU the faster choice for the tiny generator, benchmark P1;
        on a GPU keep it off).
    """

    mode: str = "online"
    generator: str = "attentionhand"
    generator_config: str = "tiny-synthlab"
    sd_path: Optional[str] = None
    guidance_path: Optional[str] = None
    size: int = 64
    labels: str = "train"
    shards: Optional[str] = None
    capacity: int = 64
    max_reuse: int = 4
    chunk: int = 8
    max_pool_mib: Optional[float] = None
    max_producer_share: float = 1.0
    num_inference_steps: Optional[int] = None
    guidance_scale: Optional[float] = None
    tas_steps: Optional[int] = None
    scheduler: Optional[str] = None
    framing: Optional[str] = None
    extend: Optional[float] = None
    use_local: bool = False
    mesh_condition: str = "mesh"
    dtype: str = "auto"
    channels_last: bool = False
    compile: str = "off"
    math_attention: bool = False

    def check(self) -> None:
        """Raise ValueError naming the key whose value is out of range."""
        if self.mode not in MIX_MODES:
            raise ValueError(f"mixing.mode={self.mode!r}: expected one of {', '.join(MIX_MODES)}")
        from hands.datasets import DATASETS

        if self.labels not in LABEL_SOURCES and self.labels not in DATASETS:
            raise ValueError(
                f"mixing.labels={self.labels!r}: expected one of {', '.join(LABEL_SOURCES)} or a training dataset's name "
                f"({', '.join(sorted(DATASETS))})"
            )
        if self.mode == "offline" and not self.shards:
            raise ValueError("mixing.mode=offline needs mixing.shards=DIR (written by python -m mixing.pregenerate)")
        for key in ("size", "capacity", "max_reuse", "chunk"):
            if getattr(self, key) < 1:
                raise ValueError(f"mixing.{key}={getattr(self, key)}: expected a positive integer")
        if self.max_pool_mib is not None and not self.max_pool_mib > 0:
            raise ValueError(f"mixing.max_pool_mib={self.max_pool_mib}: expected a positive number of MiB (or null)")
        if not 0 < self.max_producer_share <= 1:
            raise ValueError(f"mixing.max_producer_share={self.max_producer_share}: expected a fraction in (0, 1]")
        if self.framing is not None and self.framing not in ("frame", "hands"):
            raise ValueError(f"mixing.framing={self.framing!r}: expected frame or hands (or null: the generator's)")
        if self.mesh_condition not in MESH_CONDITIONS:
            raise ValueError(f"mixing.mesh_condition={self.mesh_condition!r}: expected one of {', '.join(MESH_CONDITIONS)}")
        if self.size % 8:
            raise ValueError(f"mixing.size={self.size}: expected a multiple of 8 (the VAE's factor)")
        if self.dtype not in GENERATOR_DTYPES:
            raise ValueError(f"mixing.dtype={self.dtype!r}: expected one of {', '.join(GENERATOR_DTYPES)}")
        if self.compile not in COMPILE_MODES:
            raise ValueError(f"mixing.compile={self.compile!r}: expected one of {', '.join(COMPILE_MODES)}")
