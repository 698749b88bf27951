"""generator.tas_effect and generator.segmenter: the measures on hand-made cases, and the command end to end on a
random tiny generator (what it writes)."""
from __future__ import annotations

import json
import re

import pytest
import torch

from generator.segmenter import HandSegmenter, iou, silhouette_iou, silhouettes
from generator.tas_effect import attention_in_mask, image_change


def test_attention_in_mask_weights_cells_by_silhouette_coverage():
    mesh = torch.zeros(2, 3, 8, 8)
    mesh[:, :, :4, :4] = 0.5  # the top-left quarter of the image = the top-left cell of a 2 x 2 grid
    maps = torch.full((2, 2, 2, 77), 0.01)
    maps[0, 0, 0, 5] = 0.07  # token 5 of sample 0: 7 / (7 + 1 + 1 + 1) of its map on the silhouette
    maps[1, :, :, 3] = 0.02  # flat map: the silhouette's area, 1/4
    maps[1, :, :, 4] = 0.02
    share = attention_in_mask(maps, [[5], [3, 4]], mesh)
    torch.testing.assert_close(share, torch.tensor([0.7, 0.25]))
    assert torch.isnan(attention_in_mask(maps, [[], [3]], mesh)[0])


def test_image_change_splits_on_the_silhouette():
    mesh = torch.zeros(1, 3, 4, 4)
    mesh[..., :2, :] = 1.0
    a, b = torch.zeros(1, 3, 4, 4), torch.zeros(1, 3, 4, 4)
    b[..., :2, :] = 0.3
    b[..., 2:, :] = 0.1
    inside, outside = image_change(a, b, mesh)
    assert inside == pytest.approx(0.3) and outside == pytest.approx(0.1)


def test_iou_and_the_segmenter_score():
    a = torch.zeros(2, 1, 4, 4, dtype=torch.bool)
    b = torch.zeros(2, 1, 4, 4, dtype=torch.bool)
    a[0, :, :2] = True
    b[0, :, :1] = True
    torch.testing.assert_close(iou(a, b), torch.tensor([0.5, 1.0]))  # both empty: 1
    seg = HandSegmenter(width=4)
    with torch.no_grad():
        for p in seg.parameters():
            p.zero_()
        seg.head[-1].bias.fill_(5.0)  # predicts "hand" everywhere
    mesh = torch.zeros(1, 3, 8, 8)
    mesh[..., :4, :] = 0.6
    score = silhouette_iou(seg, torch.rand(1, 3, 8, 8), mesh)
    torch.testing.assert_close(score, torch.tensor([0.5]))
    assert silhouettes(mesh).sum() == 32


def test_tas_effect_command_writes_the_measures_and_the_figure(tmp_path):
    """On a random tiny generator with a tiny synthlab: every documented key, finite, and a PNG."""
    from PIL import Image

    from generator.segmenter import save_segmenter
    from generator.tas_effect import main
    from hands.datasets.synthlab import write_synthlab
    from hands.mano import HandModel

    root = write_synthlab(tmp_path / "synthlab", seed=1, sizes={"train-lab": 0, "test-lab": 0, "train-wild": 0,
                                                                  "test-wild": 3},
                          resolution=64, hand_model=HandModel(), show_progress=False)
    save_segmenter(HandSegmenter(width=24), tmp_path / "seg.safetensors", {"width": 24})
    rc = main(["--out", str(tmp_path / "out"), "--samples", "2", "--generator-config", "tiny", "--size", "64",
               "--data-root", str(root), "--steps", "3", "--tas-steps", "2", "--segmenter",
               str(tmp_path / "seg.safetensors"), "--device", "cpu"])
    assert rc == 0
    result = json.loads((tmp_path / "out" / "tas-effect.json").read_text())
    for key in ("l_tas_with_tas", "l_tas_without_tas", "attention_in_mask_with_tas", "attention_in_mask_without_tas",
                "image_change_in_mask", "image_change_out_mask", "silhouette_iou_with_tas",
                "silhouette_iou_without_tas", "silhouette_iou_real", "silhouette_area", "tas_update_loss_first",
                "mesh_swap_ratio"):
        assert isinstance(result[key], float) and result[key] == result[key], key
    assert 0 <= result["attention_in_mask_without_tas"] <= 1 and result["tas_steps"] == 2
    assert len(result["per_sample"]["attention_in_mask_with_tas"]) == 2
    assert Image.open(tmp_path / "out" / "tas-effect-samples.png").width == 2 * (4 * 132 + 12) + 4
    figure = Image.open(tmp_path / "out" / "tas-effect.png")
    assert figure.width >= 4 * 160 and figure.height >= 2 * 2 * 160

    # --versus the first run, on the same samples: paired differences written with each side's mean
    common = ["--samples", "2", "--generator-config", "tiny", "--size", "64", "--data-root", str(root), "--steps", "3",
              "--tas-steps", "2", "--segmenter", str(tmp_path / "seg.safetensors"), "--device", "cpu"]
    first = tmp_path / "out" / "tas-effect.json"
    assert main(["--out", str(tmp_path / "out2"), "--versus", str(first)] + common) == 0
    second = json.loads((tmp_path / "out2" / "tas-effect.json").read_text())
    pairs = second["versus"]["differences"]
    assert set(pairs) == set(second["per_sample"])
    for key, d in pairs.items():
        assert d["n"] == 2 and d["this"] == pytest.approx(sum(second["per_sample"][key]) / 2)
        assert d["other"] == pytest.approx(sum(result["per_sample"][key]) / 2)
        assert d["mean"] == pytest.approx(d["this"] - d["other"], abs=1e-9)

    # other samples (another seed) are refused in one line before any sampling
    import generator.tas_effect as tas_effect

    def no_sampling(*args, **kwargs):
        raise AssertionError("sampled before refusing --versus")

    original, tas_effect.measure = tas_effect.measure, no_sampling
    try:
        with pytest.raises(SystemExit, match=r"--versus .*: seed differs \(0 there, 1 here\)"):
            main(["--out", str(tmp_path / "out3"), "--versus", str(first), "--seed", "1"] + common)
    finally:
        tas_effect.measure = original


def _effect(values, **settings):
    base = {"dataset": "synthlab", "split": "test-wild", "indices": [0, 5, 9, 14], "prompts": ["a", "b", "c", "d"],
            "seed": 0, "size": 64, "num_inference_steps": 20, "tas_steps": 10, "sd_path": "gen"}
    return {**base, **settings, "per_sample": {"attention_in_mask_without_tas": values}}


def test_versus_gives_the_paired_difference_and_its_t_interval():
    """Two generators on the same samples: per-sample differences (this - other), their mean and the 95 %
    t-interval computed by hand; a NaN pair (a sample without hand tokens) is left out and counted."""
    import math

    from generator.tas_effect import versus

    mine = _effect([0.9, 0.8, 0.7, float("nan")])
    theirs = _effect([0.8, 0.8, 0.5, 0.6], sd_path="other")
    d = versus(mine, theirs)["differences"]["attention_in_mask_without_tas"]
    # differences 0.1, 0.0, 0.2: mean 0.1, sample std 0.1, t(0.975, 2) = 4.3027
    assert d["n"] == 3 and d["mean"] == pytest.approx(0.1)
    assert d["this"] == pytest.approx(0.8) and d["other"] == pytest.approx(0.7)
    assert d["half_width"] == pytest.approx(4.302653 * 0.1 / math.sqrt(3), rel=1e-5)
    assert d["low"] == pytest.approx(0.1 - d["half_width"]) and d["high"] == pytest.approx(0.1 + d["half_width"])


def test_versus_refuses_other_samples_naming_the_setting():
    from generator.tas_effect import versus

    mine = _effect([0.9, 0.8, 0.7, 0.6])
    with pytest.raises(ValueError, match="indices differs"):
        versus(mine, _effect([0.9, 0.8, 0.7, 0.6], indices=[0, 1, 2, 3]))
    with pytest.raises(ValueError, match="tas_steps differs"):
        versus(mine, _effect([0.9, 0.8, 0.7, 0.6], tas_steps=5))


def test_versus_flag_refuses_an_unreadable_file_in_one_line(tmp_path, capsys):
    from generator.tas_effect import main

    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(SystemExit, match=r"--versus .*bad\.json: cannot read a tas-effect\.json"):
        main(["--out", str(tmp_path / "out"), "--versus", str(tmp_path / "bad.json"), "--generator-config", "tiny"])
    (tmp_path / "other.json").write_text(json.dumps({"l_tas_with_tas": 0.9}))
    with pytest.raises(SystemExit, match="not a tas-effect.json"):
        main(["--out", str(tmp_path / "out"), "--versus", str(tmp_path / "other.json"), "--generator-config", "tiny"])
    (tmp_path / "nulls.json").write_text(json.dumps(_effect([0.9, None, 0.7, 0.6])))
    with pytest.raises(SystemExit, match=r"per_sample\.attention_in_mask_without_tas: expected 4 numbers"):
        main(["--out", str(tmp_path / "out"), "--versus", str(tmp_path / "nulls.json"), "--generator-config", "tiny"])
    (tmp_path / "short.json").write_text(json.dumps(_effect([0.9, 0.7])))
    with pytest.raises(SystemExit, match="expected 4 numbers"):
        main(["--out", str(tmp_path / "out"), "--versus", str(tmp_path / "short.json"), "--generator-config", "tiny"])


def test_prompts_flag_picks_the_split_captions_or_the_bank_naming_each_mesh_hands(tmp_path, monkeypatch):
    """--prompts bank gives every mesh a prompt of the generator's bank naming its hands (mixing's prompts),
    bank-both the bank's two-hand prompts, captions (default) the split's own captions; recorded in settings."""
    import generator.tas_effect as tas_effect
    from generator.prompts import prompt_bank
    from hands.datasets.synthlab import write_synthlab
    from hands.mano import HandModel

    root = write_synthlab(tmp_path / "synthlab", seed=2, sizes={"train-lab": 0, "test-lab": 0, "train-wild": 0,
                                                                  "test-wild": 12},
                          resolution=64, hand_model=HandModel(), show_progress=False)
    seen = {}

    class Stop(Exception):
        pass

    def capture(pipe, mesh_images, prompts, **kwargs):
        seen["prompts"] = list(prompts)
        raise Stop

    monkeypatch.setattr(tas_effect, "measure", capture)
    common = ["--out", str(tmp_path / "out"), "--samples", "12", "--generator-config", "tiny", "--size", "64",
              "--data-root", str(root), "--segmenter", "none", "--device", "cpu"]
    drawn = {}
    for source in ("captions", "bank", "bank-both"):
        with pytest.raises(Stop):
            tas_effect.main(common + ["--prompts", source])
        drawn[source] = seen.pop("prompts")
    captions = [json.loads((root / "captions" / "test-wild.json").read_text())[k]
                for k in sorted(json.loads((root / "captions" / "test-wild.json").read_text()), key=int)]
    assert sorted(drawn["captions"]) == sorted(captions)
    bank = prompt_bank("wild")  # the tiny config's bank
    singles = [c for c in drawn["captions"] if re.search(r"\b(left|right) hand\b", c)]
    assert singles, "the fixture should hold one-hand images"
    for caption, prompt, both in zip(drawn["captions"], drawn["bank"], drawn["bank-both"]):
        assert any(action in both for action in bank.actions)
        side = re.search(r"\b(left|right) hand\b", caption)
        if side:  # synthlab captions a one-hand image with its side
            assert f"{side.group(1)} hand" in prompt and not re.search(r"\bhands\b", prompt), (caption, prompt)
        else:
            assert any(action in prompt for action in bank.actions), (caption, prompt)
