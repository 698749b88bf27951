"""generator.caption: the cleaning rule, the captions file, and the captioner end to end on a tiny
random-initialised Qwen2-VL built here from a config (no download)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from generator.caption import QUESTION, Captioner, clean_caption, main
from hands.datasets import build_dataset
from hands.datasets.captions import default_captions_path, load_captions, read_captions
from tests.generator_helpers import TINY_YAML

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
# Qwen2-VL's chat layout: the image placeholder the processor expands to the image's tokens, then the question
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def write_tiny_qwen2_vl(folder) -> None:
    """A 0.1 M-parameter Qwen2-VL (random init, seeded) with a byte-level BPE tokenizer trained on a few words,
    saved with its processor in transformers' layout."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import (PreTrainedTokenizerFast, Qwen2VLConfig, Qwen2VLForConditionalGeneration,
                              Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor)

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator([QUESTION + " a person is holding a cup with both hands. user assistant"], trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in SPECIAL}
    processor = Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 16),
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(),
        chat_template=CHAT_TEMPLATE,
    )
    config = Qwen2VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
            bos_token_id=ids["<|im_start|>"],
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]},
        ),
        vision_config=dict(depth=1, embed_dim=32, hidden_size=32, num_heads=2, patch_size=14, spatial_merge_size=2,
                           temporal_patch_size=2, mlp_ratio=2),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        bos_token_id=ids["<|im_start|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
    )
    torch.manual_seed(0)
    model = Qwen2VLForConditionalGeneration(config)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)


@pytest.fixture(scope="module")
def tiny_vlm(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_qwen2_vl")
    write_tiny_qwen2_vl(folder)
    return folder


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    from hands.datasets.fixtures import write_coco_fixture
    from hands.mano import HandModel

    root = tmp_path_factory.mktemp("coco_captions")
    write_coco_fixture(root, HandModel())
    return root


def test_cleaning_keeps_hand_related_sentences():
    raw = ("In the image, a man is holding a tennis racket with both hands. The sky is blue and there are trees in "
           "the background. His left thumb touches the grip! A dog sleeps. She waves. He carried a bag.")
    assert clean_caption(raw) == "A man is holding a tennis racket with both hands. His left thumb touches the grip! She waves."
    assert clean_caption(raw, max_sentences=1) == "A man is holding a tennis racket with both hands."
    assert clean_caption("A street with cars and buildings. The light is red.") == ""
    assert clean_caption("The image shows a woman typing on a laptop.") == "A woman typing on a laptop."
    assert clean_caption("  Fingers   spread\nwide. ") == "Fingers spread wide."


def test_captions_file_survives_an_interrupted_write(tmp_path):
    path = tmp_path / "captions.jsonl"
    good = [{"image_id": i, "file_name": f"{i}.jpg", "raw": "r", "caption": c} for i, c in ((1, "hands up."), (2, ""))]
    path.write_text("".join(json.dumps(e) + "\n" for e in good) + '{"image_id": 3, "file_na')
    assert read_captions(path) == good
    assert load_captions(path) == {"1.jpg": "hands up."}  # empty captions fall back to the default prompt
    read_captions(path, repair=True)
    assert path.read_text().endswith("\n") and len(path.read_text().splitlines()) == 2
    path.write_text("not json\n" + json.dumps(good[0]) + "\n")
    with pytest.raises(ValueError, match="captions.jsonl:1"):
        read_captions(path)


def test_batched_answers_equal_one_by_one(tiny_vlm):
    from PIL import Image

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, size=size, dtype=np.uint8)) for size in ((60, 80, 3), (90, 50, 3), (40, 40, 3))]
    captioner = Captioner(tiny_vlm, max_new_tokens=6, dtype="float32")
    assert QUESTION in captioner.prompt
    batched = captioner(images)
    assert len(batched) == 3 and all(isinstance(a, str) for a in batched)
    assert batched == [captioner([image])[0] for image in images]
    half = Captioner(tiny_vlm, max_new_tokens=3, dtype="bfloat16")  # pixels are cast to the model's dtype
    assert half.model.dtype == torch.bfloat16 and len(half(images[:2])) == 2


def test_caption_cli_end_to_end_resumes_and_feeds_the_reader(tiny_vlm, coco, capsys):
    argv = ["--dataset", "coco", "--root", str(coco), "--model", str(tiny_vlm), "--batch-size", "2",
            "--max-new-tokens", "5", "--device", "cpu", "--dtype", "float32"]
    assert main([*argv, "--limit", "2"]) == 0
    out_file = default_captions_path(coco, "train")
    first = out_file.read_text().splitlines()
    assert len(first) == 2 and "2 image(s) captioned now, 0 before" in capsys.readouterr().out
    assert main(argv) == 0  # resumes: only the third image is new
    lines = out_file.read_text().splitlines()
    assert lines[:2] == first and len(lines) == 3
    assert "1 image(s) captioned now, 2 before" in capsys.readouterr().out
    entries = [json.loads(line) for line in lines]
    assert [e["file_name"] for e in entries] == ["000000000001.jpg", "000000000002.jpg", "000000000003.jpg"]
    assert all(e["caption"] == clean_caption(e["raw"]) for e in entries)
    # the reader reads the default captions file: a hand-related caption becomes the sample's prompt
    entries[0]["caption"] = "A person is holding a cup with both hands."
    out_file.write_text("".join(json.dumps(e) + "\n" for e in entries))
    reader = build_dataset("coco", coco, "train")
    prompts = {r["path"]: reader.load_labels(i).meta.get("prompt") for i, r in enumerate(reader.records)}
    assert prompts["000000000001.jpg"] == "A person is holding a cup with both hands."
    assert build_dataset("coco", coco, "train", captions=None).load_labels(0).meta.get("prompt") is None
    out_file.unlink()


def test_caption_cli_errors_in_one_line(coco, tmp_path, capsys):
    assert main(["--root", str(coco), "--model", str(tmp_path / "nothing")]) == 1
    err = capsys.readouterr().err.strip()
    assert "--model" in err and "config.json" in err and err.count("\n") == 0
    assert main(["--root", str(tmp_path), "--model", str(tmp_path)]) == 1
    assert "coco_wholebody_train_v1.0.json" in capsys.readouterr().err


def test_generator_trains_on_coco_one_person_with_its_captions(coco, tmp_path):
    from generator.train import FramedDataset, make_train_batch, parse_args, train
    from hands.mano import HandModel

    model = HandModel()
    captions = tmp_path / "captions.jsonl"
    entries = [{"image_id": 1, "file_name": "000000000001.jpg", "raw": "x", "caption": "A person holds a cup with both hands."},
               {"image_id": 3, "file_name": "000000000003.jpg", "raw": "x", "caption": ""}]
    captions.write_text("".join(json.dumps(e) + "\n" for e in entries))
    options = ["--dataset-option", "one_person=true", "--dataset-option", "require_fit=true",
               "--dataset-option", f"captions={captions}"]
    cfg = parse_args(["--dataset", "coco", "--data-root", str(coco), "--split", "train", *options])
    assert cfg.dataset_options == {"one_person": True, "require_fit": True, "captions": str(captions)}
    reader = build_dataset("coco", coco, "train", hand_model=model, **cfg.dataset_options)
    assert [r["aid"] for r in reader.records] == [11, 31]  # one person per image, with a fit
    data = FramedDataset(reader, 32)
    batch = make_train_batch([data[0], data[1]], model.faces_for("right"), model.faces_for("left"))
    assert batch.prompts == ["A person holds a cup with both hands.", "a photo of two hands"]  # empty: the default
    assert float(batch.mesh[0].sum()) > 0 and float(batch.mesh[1].sum()) > 0  # the fits are drawn
    config = tmp_path / "tiny.yaml"
    config.write_text(TINY_YAML)
    result = train(parse_args(["--dataset", "coco", "--data-root", str(coco), "--split", "train", *options,
                               "--generator-config", str(config), "--size", "32", "--batch-size", "2", "--steps", "1",
                               "--sample-every", "0", "--sample-steps", "1", "--no-progress", "--device", "cpu",
                               "--tas-updates", "0", "--out", str(tmp_path / "run")]), hand_model=model)
    assert result["step"] == 1 and (tmp_path / "run" / "guidance.safetensors").is_file()
    saved = json.loads((tmp_path / "run" / "train_config.json").read_text())
    assert saved["train"]["dataset_options"]["one_person"] is True
