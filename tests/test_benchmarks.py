"""benchmarks: the quick mode of the cheapest measurement (P4) end to end, the JSON schema, the helpers.

Timing values are not asserted (they depend on the machine and its load); only their presence and form.
"""
import json
import math

import pytest
import torch

from benchmarks import run
from benchmarks.common import interleaved
from benchmarks.mixing import _parse


@pytest.fixture
def restore_threads(monkeypatch):
    """run.main sets torch's thread count and LP_NUM_THREADS; put both back afterwards."""
    threads = torch.get_num_threads()
    monkeypatch.setenv("LP_NUM_THREADS", "1")
    yield
    torch.set_num_threads(threads)


def test_quick_p4_writes_json_and_table(tmp_path, restore_threads):
    pytest.importorskip("moderngl")
    out = tmp_path / "cpu.json"
    assert run.main(["--quick", "--only", "p4", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["command"] == f"python -m benchmarks.run --quick --only p4 --out {out}"
    assert report["quick"] is True
    for key in ("platform", "cpu_count", "python", "torch", "diffusers", "moderngl", "device"):
        assert report["machine"][key]
    assert len(report["load_average"]["start"]) == 3 and len(report["load_average"]["end"]) == 3
    assert "git_commit" in report and "git_dirty" in report  # the code measured
    entry = report["p4_render"]
    assert isinstance(entry["ratio"], float) and entry["ratio"] > 0
    assert entry["target"] == 3.0
    assert entry["met"] is (entry["ratio"] <= 3.0)
    assert set(entry["median_s"]) == {"hands.render", "moderngl"}
    assert all(len(v) == 3 for v in entry["seconds"].values())  # quick: 3 interleaved repetitions each
    assert all(v > 0 for v in entry["peak_mib"].values())
    assert set(entry["peak_growth_mib"]) == {"hands.render", "moderngl"}
    # both renderers draw the same hands (silhouettes agree on nearly every pixel)
    assert entry["silhouette_agreement"] > 0.98
    assert "p1_sampler" not in report
    table = out.with_suffix(".md").read_text()
    assert "| P4 mesh images: hands.render / moderngl (time) |" in table


def test_unknown_target_is_a_usage_error(capsys):
    with pytest.raises(SystemExit):
        run.parse_args(["--only", "p9"])
    assert "--only: unknown target(s) p9" in capsys.readouterr().err


def test_interleaved_alternates_order_and_uses_returned_seconds():
    calls = []
    variants = {"a": lambda: calls.append("a") or 1.5, "b": lambda: calls.append("b") or 2.5}
    timings = interleaved(variants, repeats=3, device=torch.device("cpu"), warmup=1)
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b"]  # warm-up, then a b / b a / a b
    assert timings.seconds == {"a": [1.5] * 3, "b": [2.5] * 3}
    assert timings.median("b") / timings.median("a") == pytest.approx(2.5 / 1.5)


def test_parse_recon_train_output():
    text = ("mixing: 5 of 16 samples per batch from attentionhand (online, labels: train, 64 px)\n"
            "mixing: produced 24, dropped_nonfinite 0, taken 12, mean_reuse 0, trainer_stall_s 1.9, "
            "generator_busy_s 6.14, images_per_s 3.91, stall_fraction 0.31, stall_fraction_of_training 0.321\n"
            "trained 6 steps in 5.9 s; checkpoint /tmp/x/step_000006.json\n")
    parsed = _parse(text)
    assert parsed["steps"] == 6 and parsed["loop_s"] == 5.9
    assert parsed["trainer_stall_s"] == 1.9 and parsed["generator_busy_s"] == 6.14 and parsed["produced"] == 24
    assert _parse("trained 3 steps in 1.0 s; checkpoint c") == {"steps": 3, "loop_s": 1.0}
    with pytest.raises(RuntimeError, match="no 'trained N steps in X s' line"):
        _parse("Traceback ...\nValueError: boom\n")


def test_a_failing_target_is_recorded_and_the_others_are_kept(tmp_path, restore_threads, monkeypatch):
    import benchmarks.render
    import benchmarks.sampler

    def no_egl(settings, device):
        raise RuntimeError("EGL: cannot open display\nmore detail")

    fake_p3 = {"ratio": 1.2, "target": 1.3, "met": True, "better": "lower", "median_s": {"tas": 1.2, "no_tas": 1.0},
               "peak_mib": {"tas": 1.0, "no_tas": 1.0}}
    monkeypatch.setattr(benchmarks.render, "run_p4", no_egl)
    monkeypatch.setattr(benchmarks.sampler, "run_p3", lambda settings, device: dict(fake_p3))
    out = tmp_path / "cpu.json"
    assert run.main(["--quick", "--only", "p4,p3", "--out", str(out)]) == 1
    report = json.loads(out.read_text())
    assert report["p3_tas"]["ratio"] == 1.2  # P3 ran first and is kept
    assert report["p4_render"]["error"] == "RuntimeError: EGL: cannot open display" and report["p4_render"]["met"] is False
    table = out.with_suffix(".md").read_text()
    assert "| P4 mesh images: hands.render / moderngl (time) | - | <= 3.0 | failed | RuntimeError: EGL" in table


def test_p2_runs_on_the_requested_device_and_reads_the_gpu_peak():
    from pathlib import Path

    from benchmarks.mixing import MixingSettings, train_command

    command = train_command(MixingSettings(), 0.3, Path("out"), "cuda:0")
    assert command[command.index("--device") + 1] == "cuda:0"
    # P2 keeps the regressor its results were measured with (full-width ResNet-18, final weights), whatever the
    # baseline's demo profile becomes
    from recon.config import load_config
    from recon.train import _flags, parse_args

    args = parse_args(command[command.index("recon.train") + 1:])
    cfg = load_config(profile=args.profile, arch=args.arch, flags=_flags(args), overrides=args.overrides)
    assert (cfg.arch, cfg.model.backbone_kwargs, cfg.train.average_last) == ("baseline", None, 1)
    parsed = _parse("trained 200 steps in 20.0 s; checkpoint c; peak GPU memory 1234 MiB\n")
    assert parsed == {"steps": 200, "loop_s": 20.0, "gpu_peak_mib": 1234.0}
    assert run.parse_args(["--device", "cuda"]).only == ["p1", "p2", "p3", "p5", "p6", "p4"]
    assert run.parse_args([]).only == ["p1", "p2", "p3", "p6", "p4"]  # P5 (SD1.5-sized) on CUDA only; P7 when named
    assert run.parse_args(["--only", "p7,p1"]).only == ["p1", "p7"]


def test_p7_compares_the_demo_step_with_two_threads_and_channels_last(monkeypatch, tmp_path, restore_threads):
    """P7's sides, their interleaving and the ratios, with recon.train's runs replaced by known step times."""
    from pathlib import Path

    import benchmarks.train_step as p7

    command = p7.train_command(p7.TrainStepSettings(steps=5), "threads2_channels_last", Path("out"))
    assert command[command.index("--arch") + 1] == "interwild" and command[command.index("--synthetic-ratio") + 1] == "0"
    assert command[command.index("--max-steps") + 1] == "5" and command[-2:] == ["threads=2", "train.channels_last=true"]
    assert p7.train_command(p7.TrainStepSettings(), "demo", Path("out"))[-1] == "threads=1"
    seconds = {"demo": 0.6, "threads2": 0.4, "threads2_channels_last": 0.34}
    order = []

    def fake_run(settings, side, workdir, tag):
        order.append(side)
        return {"steps": 10, "loop_s": 10 * seconds[side] * (1.1 if tag.endswith("_1") else 1.0)}, 1 << 20

    monkeypatch.setattr(p7, "run_once", fake_run)
    entry = p7.run_p7(p7.TrainStepSettings(steps=10, repeats=3))
    assert order == ["demo", "threads2", "threads2_channels_last", "threads2", "threads2_channels_last", "demo",
                     "threads2_channels_last", "demo", "threads2"]  # every side first once
    assert entry["step_s_median"] == {name: pytest.approx(value) for name, value in seconds.items()}
    assert entry["ratio"] == pytest.approx(0.34 / 0.6, abs=1e-3) and entry["met"] is True and entry["target"] == 0.625
    assert entry["channels_last_ratio"] == pytest.approx(0.85) and entry["threads_ratio"] == pytest.approx(0.667, abs=1e-3)
    assert entry["steps_for_15_min"] == {"demo": 1500, "threads2": 2250, "threads2_channels_last": 2647}
    with pytest.raises(ValueError, match="run it with --device cpu"):  # a CPU measurement: refused on a GPU
        run.run_target("p7", torch.device("cuda"), sampler=None, mixing=None, render=None, sd15=None, generation=None,
                       train_step=p7.TrainStepSettings())
    monkeypatch.setattr(run, "run_target", lambda target, device, **settings: entry)
    out = tmp_path / "cpu.json"
    assert run.main(["--only", "p7", "--out", str(out)]) == 0
    table = out.with_suffix(".md").read_text()
    assert "| P7 InterWild demo step: 2 threads + channels-last / the demo's 1 thread (time) | 0.57 | <= 0.625 | yes |" in table
    assert "steps in 15 min demo 1500, threads2 2250, threads2_channels_last 2647" in table


def test_scheduler_agreement_is_psnr_and_absolute_differences():
    from benchmarks.schedulers import agreement

    reference = torch.zeros(2, 3, 4, 4)
    images = reference.clone()
    images[0] = 0.1  # half of the pixels off by 0.1: MSE 0.005
    a = agreement(images, reference)
    assert a["psnr_db"] == pytest.approx(10 * math.log10(1 / 0.005), abs=0.01)
    assert a["mean_abs_diff"] == pytest.approx(0.05) and a["max_abs_diff"] == pytest.approx(0.1)
    assert agreement(reference, reference)["psnr_db"] == float("inf")


def test_scheduler_benchmark_arguments_are_checked(capsys):
    from benchmarks.schedulers import parse_args

    assert parse_args(["--steps", "10,8,8"]).steps == [8, 10]
    for bad in (["--steps", "eight"], ["--steps", "0"], ["--n", "0"]):
        with pytest.raises(SystemExit):
            parse_args(bad)
    assert "--steps" in capsys.readouterr().err


def test_train_process_runner_parses_its_log_and_names_a_failure(tmp_path):
    """P2's and P7's subprocess runner: the child's output goes to TAG.log and is parsed; a failed child is an error
    naming the run and the log's last lines."""
    import sys

    pytest.importorskip("psutil")
    from benchmarks.mixing import run_train_process

    ok = [sys.executable, "-c", "import time; time.sleep(0.3); print('trained 3 steps in 1.5 s; checkpoint c')"]
    parsed, peak = run_train_process(ok, tmp_path, "ok", "(threads=2)")
    assert parsed == {"steps": 3, "loop_s": 1.5} and peak > 0  # sampled while the child lived
    assert "trained 3 steps" in (tmp_path / "ok.log").read_text()
    bad = [sys.executable, "-c", "print('boom'); raise SystemExit(3)"]
    with pytest.raises(RuntimeError, match=r"recon.train \(threads=2\) exited with 3:\nboom"):
        run_train_process(bad, tmp_path, "bad", "(threads=2)")
