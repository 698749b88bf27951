"""SyntheticSource: generated samples carry exactly the labels that were rendered."""
import re

import pytest
import torch

from generator.model import TinyArchitecture, build_tiny_components
from generator.pipeline import AttentionHandPipeline
from hands.mano import HandModel
from hands.render import render_hands
from mixing.labels import PriorLabelSource
from mixing.source import SyntheticSource, frame_labels, hands_union_box

TINY = TinyArchitecture(unet_channels=(8, 16), cross_attention_dim=16, attention_heads=2, latent_size=4,
                        vae_channels=(4, 4, 4, 4), text_layers=1, text_heads=2, text_intermediate_size=16)


@pytest.fixture(scope="module")
def hand_model():
    return HandModel()


@pytest.fixture(scope="module")
def source(hand_model):
    components = build_tiny_components(TINY, seed=0, guidance_embedding_channels=(4, 4, 4, 4))
    pipe = AttentionHandPipeline.from_components(components)
    return SyntheticSource(
        labels=PriorLabelSource(hand_model, image_size=96),
        generator=pipe,
        faces_right=hand_model.faces_for("right"),
        faces_left=hand_model.faces_for("left"),
        size=32,
        seed=3,
        sampling={"num_inference_steps": 2},
    )


def test_generated_batch_has_images_and_framed_labels(source):
    batch = source.generate(3)
    assert batch.image.shape == (3, 3, 32, 32)
    assert torch.isfinite(batch.image).all() and batch.image.min() >= 0 and batch.image.max() <= 1
    assert all(m["is_synthetic"] and m["prompt"] for m in batch.meta)
    for side in ("right", "left"):
        hand = getattr(batch, side)
        for i in range(3):
            if bool(hand.valid[i]):
                # joints_img is the projection of joints_cam with the framed camera
                proj = hand.joints_cam[i] @ batch.camera.K[i].T
                torch.testing.assert_close(proj[:, :2] / proj[:, 2:], hand.joints_img[i], atol=1e-2, rtol=0)
                # and the hands fill the window, inside the image
                assert (hand.joints_img[i] > -1).all() and (hand.joints_img[i] < 33).all()


@pytest.mark.parametrize("framing", ["frame", "hands"])
def test_rerendering_the_labels_gives_the_conditioning_image(source, framing):
    labels = source.labels.draw(2, torch.Generator().manual_seed(11))
    framed = frame_labels(labels, source.size, source.extend, framing)
    mesh_images, local = source.render_conditions(framed)
    again = render_hands(framed.right.verts_cam, framed.left.verts_cam, source.faces_right, source.faces_left,
                         framed.camera.K, (32, 32), right_valid=framed.right.valid, left_valid=framed.left.valid)
    torch.testing.assert_close(again.image, mesh_images)
    assert (mesh_images.flatten(1).amax(1) > 0.2).all()  # the hands are in view
    assert local.shape == (2, 3, 32, 32)
    # the rendered hand pixels lie inside the framed union box of the labels
    box = hands_union_box(framed)
    for i in range(2):
        ys, xs = again.mask[i].nonzero(as_tuple=True)
        assert xs.min() >= box[i, 0] - 2 and xs.max() <= box[i, 2] + 2
        assert ys.min() >= box[i, 1] - 2 and ys.max() <= box[i, 3] + 2


def test_generation_repeats_under_the_same_seed_and_differs_across_ranks(source, hand_model):
    def fresh(rank):
        return SyntheticSource(labels=source.labels, generator=source.generator, faces_right=source.faces_right,
                               faces_left=source.faces_left, size=32, seed=3, rank=rank,
                               sampling={"num_inference_steps": 2})

    a, b, c = fresh(0).generate(1), fresh(0).generate(1), fresh(1).generate(1)
    torch.testing.assert_close(a.image, b.image)
    assert [m["prompt"] for m in a.meta] == [m["prompt"] for m in b.meta]
    assert not torch.allclose(a.right.verts_cam, c.right.verts_cam)


def test_dataset_labels_come_without_images_and_match_the_mesh(tmp_path, hand_model):
    from hands.datasets import build_dataset
    from hands.datasets.synthlab import write_synthlab
    from mixing.labels import DatasetLabelSource

    write_synthlab(tmp_path, seed=5, sizes={"train-lab": 4, "test-lab": 0, "train-wild": 0, "test-wild": 0},
                   resolution=64, hand_model=hand_model, show_progress=False)
    reader = build_dataset("synthlab", tmp_path, "train-lab", hand_model=hand_model)
    full, labels_only = reader[1], reader.load_labels(1)
    assert labels_only.image.abs().sum() == 0 and labels_only.image.shape == full.image.shape
    torch.testing.assert_close(labels_only.right.verts_cam, full.right.verts_cam)
    torch.testing.assert_close(labels_only.left.joints_cam, full.left.joints_cam)
    batch = DatasetLabelSource(reader, hand_model).draw(3, torch.Generator().manual_seed(0))
    assert batch.image.abs().sum() == 0 and len(batch) == 3
    for side in ("right", "left"):
        hand = getattr(batch, side)
        # synthlab's joints are its MANO joints: the mesh-consistent joints equal them
        for i in range(3):
            if bool(hand.mano_valid[i]):
                idx = int(batch.meta[i]["id"])
                ref = getattr(reader[[r["aid"] for r in reader.records].index(idx)], side).joints_cam
                torch.testing.assert_close(hand.joints_cam[i], ref, atol=1e-4, rtol=0)


def test_frame_framing_is_the_whole_source_image_resized(source):
    """framing "frame" (the paper's global image): the window is the whole source frame, so the labels' pixel
    coordinates are the source's scaled by S / source size; "hands" zooms in on the hands."""
    labels = source.labels.draw(2, torch.Generator().manual_seed(5))
    framed = frame_labels(labels, 32, framing="frame")
    scale = 32 / labels.image.shape[-1]
    for side in ("right", "left"):
        a, b = getattr(labels, side), getattr(framed, side)
        for i in range(2):
            if bool(a.valid[i]):
                torch.testing.assert_close(b.joints_img[i], (a.joints_img[i] + 0.5) * scale - 0.5, atol=1e-3, rtol=0)
    zoomed = frame_labels(labels, 32, 1.5, "hands")
    assert (hands_union_box(zoomed)[:, 2:] - hands_union_box(zoomed)[:, :2]).amin() > \
        (hands_union_box(framed)[:, 2:] - hands_union_box(framed)[:, :2]).amin()
    with pytest.raises(ValueError, match="frame, hands"):
        frame_labels(labels, 32, framing="scene")


class _Recorder:
    """An ImageGenerator that records what it is given."""

    def __init__(self, pipe):
        self.pipe, self.calls = pipe, []

    def __call__(self, mesh_images, local_mesh_images, prompts, *, generator, **kwargs):
        self.calls.append(local_mesh_images)
        return self.pipe(mesh_images, local_mesh_images, prompts, generator=generator, **kwargs)


def test_sampling_runs_the_global_branch_only_with_the_same_global_images_at_half_the_rows(source):
    """The local branch's images are thrown away and the global images do not depend on it: the source samples
    the global branch only (the reference's inference), at half the UNet rows, with bit-identical images."""
    recorder = _Recorder(source.generator)

    def fresh(use_local):
        return SyntheticSource(labels=source.labels, generator=recorder, faces_right=source.faces_right,
                               faces_left=source.faces_left, size=32, seed=3, use_local=use_local,
                               sampling={"num_inference_steps": 2})

    rows = []
    unet = source.generator.unet
    handle = unet.register_forward_pre_hook(lambda module, args: rows.append(args[0].shape[0]))
    try:
        default = fresh(False).generate(2)
        with_local = fresh(True).generate(2)
    finally:
        handle.remove()
    assert recorder.calls[0] is None and recorder.calls[1] is not None
    assert torch.equal(default.image, with_local.image)  # bit-identical global images
    assert rows[0] * 2 == rows[-1] and rows[0] == 2 * 2  # classifier-free guidance x2, 2 samples; x2 with local
    assert SyntheticSource.__init__.__kwdefaults__["use_local"] is False


class _OneHandFirst:
    """A label source whose first sample keeps only its right hand and second only its left (whatever the prior
    drew there: a hand it drew is dropped, none is added)."""

    def __init__(self, labels):
        self.inner = labels

    def draw(self, n, generator):
        import dataclasses

        batch = self.inner.draw(n, generator)
        right, left = batch.right.valid.clone(), batch.left.valid.clone()
        left[0], right[1] = False, False
        return dataclasses.replace(batch, right=dataclasses.replace(batch.right, valid=right),
                                   left=dataclasses.replace(batch.left, valid=left))


def test_prompts_name_the_hands_the_mesh_image_shows(source):
    """A label with one hand gets a one-hand prompt naming its side; one with both a two-hand prompt."""
    from generator.prompts import prompt_bank
    from generator.prompts import shown_hands

    one_hand = SyntheticSource(labels=_OneHandFirst(source.labels), generator=source.generator,
                               faces_right=source.faces_right, faces_left=source.faces_left, size=32, seed=3,
                               prompts=prompt_bank("synthlab"), sampling={"num_inference_steps": 2})
    batch = one_hand.generate(3)
    prompts = [m["prompt"] for m in batch.meta]
    assert batch.hand_type[:2] == ["right", "left"]
    assert "right hand" in prompts[0] and not re.search(r"\b(left|both|hands)\b", prompts[0])
    assert "left hand" in prompts[1] and not re.search(r"\b(right|both|hands)\b", prompts[1])
    assert shown_hands(batch) == ["right", "left", "both"] and batch.hand_type[2] == "interacting"
    synthlab_two_hand = set(prompt_bank("synthlab").actions)
    assert any(action in prompts[2] for action in synthlab_two_hand)
    # the blank-mesh control's images show no hand: its prompts stay two-hand ones, naming no label's side
    blank = SyntheticSource(labels=_OneHandFirst(source.labels), generator=source.generator,
                            faces_right=source.faces_right, faces_left=source.faces_left, size=32, seed=3,
                            prompts=prompt_bank("synthlab"), sampling={"num_inference_steps": 2}, blank_mesh=True)
    assert all(any(action in m["prompt"] for action in synthlab_two_hand) for m in blank.generate(3).meta)
