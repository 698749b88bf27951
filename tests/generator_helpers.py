"""What the generator tests share: the tiny generator's YAML and a tiny synthlab to train it on."""
from __future__ import annotations

from pathlib import Path

TINY_YAML = """
seed: 0
tiny: {unet_channels: [4, 8], attention_heads: 2, cross_attention_dim: 8, latent_size: 4,
       vae_channels: [4, 8, 8, 8], text_layers: 1, text_heads: 2, text_intermediate_size: 8}
guidance_embedding_channels: [4, 4, 4, 4]
attention_downsample: 2
"""
TINY_YAML_2_STEPS = TINY_YAML + "sampling: {num_inference_steps: 2}\n"  # sampling 2 DDIM steps by default


def tiny_generator_env(base: Path, *, yaml: str = TINY_YAML, seed: int = 2, test_wild: int = 0, model=None):
    """(hand model, synthlab root with 4 train-wild images, the tiny generator's YAML file) under ``base``."""
    from hands.datasets.synthlab import write_synthlab
    from hands.mano import HandModel

    model = model or HandModel()
    root = write_synthlab(base / "synthlab", seed=seed, sizes={"train-lab": 0, "test-lab": 0, "train-wild": 4,
                                                                "test-wild": test_wild},
                          resolution=64, hand_model=model, show_progress=False)
    config = base / "tiny.yaml"
    config.write_text(yaml)
    return model, root, config
