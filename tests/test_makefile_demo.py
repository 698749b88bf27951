"""`make demo`: its recon.train and recon.test commands, as make would run them, parse as those modules read them
(a typo in a flag or an override would otherwise surface only after the synthlab write, minutes into a user's
first run), and its synthlab write is the studio one, guarded so that it runs once."""
import os
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from recon import test as recon_test
from recon.config import load_config
from recon.train import _flags, check_config, parse_args

ROOT = Path(__file__).resolve().parents[1]


def _demo_commands(**variables: str) -> list[list[str]]:
    settings = [f"{key}={value}" for key, value in {"STAMP": "", **variables}.items()]  # no install prerequisite
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL") and not k.startswith("DEMO_")}
    listing = subprocess.run(
        ["make", "--no-print-directory", "-n", "demo", *settings], cwd=ROOT, capture_output=True, text=True, check=True,
        env=env,  # not the variables of a `make test DEMO_STEPS=...` that runs this test
    ).stdout
    return [shlex.split(line) for line in listing.replace("\\\n", " ").splitlines() if line.strip()]


def _module_argv(commands: list[list[str]], module: str) -> list[str]:
    found = [words[words.index(module) + 1:] for words in commands if module in words and words[words.index(module) - 1] == "-m"]
    assert len(found) == 1, f"make demo runs {module} {len(found)} times"
    return found[0]


def _gnu_make() -> bool:
    if shutil.which("make") is None:
        return False
    version = subprocess.run(["make", "--version"], capture_output=True, text=True)
    return version.returncode == 0 and "GNU Make" in version.stdout


@pytest.mark.skipif(not _gnu_make(), reason="GNU make is not installed (the Makefile is GNU make's)")
def test_make_demo_trains_interwild_on_the_studio_synthlab_and_draws_its_predictions(tmp_path):
    data, out = tmp_path / "studio", tmp_path / "demo"
    commands = _demo_commands(DEMO_DATA=str(data), DEMO_OUT=str(out))

    writer = [words for words in commands if "hands.datasets.synthlab" in words]
    assert len(writer) == 1 and writer[0][:3] == ["test", "-f", f"{data}/synthlab.json"]  # written once, then reused
    write = writer[0][writer[0].index("hands.datasets.synthlab") + 1:]
    assert write == ["--out", str(data), "--viewpoints", "studio", "--sizes", "5000", "500", "0", "500"]

    args = parse_args(_module_argv(commands, "recon.train"))
    cfg = load_config(profile=args.profile, arch=args.arch, config_file=args.config, flags=_flags(args), overrides=args.overrides)
    check_config(cfg)
    assert (cfg.arch, cfg.profile, cfg.train.synthetic_ratio) == ("interwild", "demo", 0.3)
    assert (cfg.data.root, cfg.out, args.overwrite) == (str(data), str(out), True)
    assert (cfg.train.max_steps, cfg.threads, cfg.train.channels_last, cfg.train.average_last) == (2400, 2, True, 3)
    assert cfg.train.max_minutes == 13.0  # a time budget: the run ends at the first checkpoint after 13 minutes

    figure = recon_test.build_parser().parse_args(_module_argv(commands, "recon.test"))
    assert (figure.ckpt, figure.data_root, figure.figure) == (f"{out}/averaged", str(data), 4)

    one_thread = parse_args(_module_argv(_demo_commands(DEMO_THREADS="1", DEMO_STEPS="1200", DEMO_MINUTES="20"), "recon.train"))
    assert {"threads=1", "train.max_minutes=20"} <= set(one_thread.overrides) and one_thread.max_steps == 1200
