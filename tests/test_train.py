"""faar-train end to end on generated scenes: files, shrinking, resume after SIGKILL, DDP."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.utils.data import default_collate

from faar.adapters import adapters_of
from faar.cli import train_main
from faar.config import load_config
from faar.data import Scenes
from faar.model import build_model
from faar.ranks import rank_report, report_line
from faar.run import latest_state, load_model
from faar.train import TrainError, amp_dtype, task_losses, train

# Two steps an epoch, three epochs: enough for shrinking to show, quick on 2 cores.
SMALL = ["data.num_train=16", "data.num_val=8", "train.epochs=3"]


def _cmd(out: Path, *extra: str) -> list[str]:
    cmd = [sys.executable, "-m", "faar", "--config", "tiny", "--out", str(out), "--quiet"]
    for item in [*SMALL, *extra]:
        cmd += ["--set", item]
    return cmd


ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=ENV)


def _saved_epoch(out: Path) -> int:
    state = latest_state(out) if out.exists() else None
    return json.loads((state / "state.json").read_text())["epoch"] if state else 0


@pytest.fixture(scope="module")
def full_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "full"
    proc = _run(_cmd(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out


def test_run_directory_contents(full_run: Path) -> None:
    for name in ("config.yaml", "model.safetensors", "model.json", "metrics.json", "ranks.json", "ranks.png"):
        assert (full_run / name).is_file(), name
    metrics = json.loads((full_run / "metrics.json").read_text())
    assert [e["epoch"] for e in metrics["epochs"]] == [1, 2, 3]
    assert set(metrics["trivial"]) == set(metrics["epochs"][-1]["val"])
    ranks = json.loads((full_run / "ranks.json").read_text())
    initial = [r["rank"] for r in ranks["initial"].values()]
    final = ranks["epochs"][-1]["ranks"]
    assert set(initial) == {8}
    assert sum(final.values()) < sum(initial), "PDRS removed no rank"
    assert min(final.values()) >= 1
    # the saved weights really are shrunk, and the run rebuilds without its config
    tensors = load_file(str(full_run / "model.safetensors"))
    name = next(iter(final))
    assert tensors[f"{name}.lora_A"].shape[0] == final[name]
    model = load_model(full_run)
    assert model.ranks() == final
    assert (latest_state(full_run) / "state.json").is_file()


def test_refuses_to_overwrite_a_run(full_run: Path) -> None:
    with pytest.raises(TrainError, match="--resume"):
        train(load_config("tiny", SMALL), full_run)


def test_sigkill_then_resume_matches_uninterrupted(full_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "killed"
    proc = subprocess.Popen(_cmd(out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    deadline = time.monotonic() + 300
    while _saved_epoch(out) < 1:
        assert proc.poll() is None, "training exited before its first epoch was saved"
        assert time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert _saved_epoch(out) < 3, "the run finished before it could be killed"
    proc = _run(_cmd(out) + ["--resume"])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "resuming" in proc.stdout + proc.stderr
    a = json.loads((full_run / "ranks.json").read_text())["epochs"][-1]["ranks"]
    b = json.loads((out / "ranks.json").read_text())["epochs"][-1]["ranks"]
    assert a == b
    ma = json.loads((full_run / "metrics.json").read_text())["epochs"][-1]
    mb = json.loads((out / "metrics.json").read_text())["epochs"][-1]
    assert ma["train_loss"] == pytest.approx(mb["train_loss"], rel=1e-3)
    assert ma["val"]["semseg"]["miou"] == pytest.approx(mb["val"]["semseg"]["miou"], abs=0.5)


def test_resuming_a_finished_run_reports_the_final_ranks(full_run: Path) -> None:
    """--resume of a finished run trains nothing and prints the rank report of the ranks the run ended
    with (it used to print the one saved with the last state, computed an epoch earlier)."""
    lines: list[str] = []
    history = train(load_config("tiny", SMALL), full_run, resume=True, quiet=True, log=lines.append)
    assert len(history["epochs"]) == 3 and history["epochs"][-1]["adapters_shrunk"] > 0
    final = load_model(full_run).ranks()
    record = {n: {**r, "rank": final[n]} for n, r in history["ranks"]["initial"].items()}
    report = rank_report(record)
    assert history["ranks"]["report"] == report
    assert json.loads((full_run / "ranks.json").read_text())["report"] == report
    assert json.loads((latest_state(full_run) / "state.json").read_text())["history"]["ranks"]["report"] == report
    assert lines[-1] == report_line(report)
    assert min(final.values()) >= load_config("tiny").pdrs.min_rank


@pytest.mark.parametrize("capability,dtype", [((7, 5), torch.float16), ((7, 0), torch.float16),
                                              ((8, 0), torch.bfloat16), ((8, 9), torch.bfloat16),
                                              ((9, 0), torch.bfloat16)])
def test_amp_uses_bfloat16_only_on_hardware_that_has_it(capability: tuple[int, int], dtype: torch.dtype) -> None:
    """A T4 (7.5) emulates bf16 (torch.cuda.is_bf16_supported() says yes there): float16 + GradScaler."""
    assert amp_dtype(capability) is dtype


def test_summary_prints_json_last_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert train_main(["--config", "mtlora_pascal_r64", "--summary"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    summary = json.loads(last)
    assert summary["trainable_parameters"] == 8_344_634
    assert set(summary["trainable_by_group"]) == {"adapters", "other_backbone", "decoder", "spectral"}
    assert train_main(["--config", "faar_pascal_swin_t", "--summary"]) == 0
    tspd = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["trainable_by_group"]["spectral"]
    assert tspd == 150_456  # TS-PD as published (test_model.py shows how the number arises)


def test_print_config_is_the_resolved_config_and_loads_back(capsys: pytest.CaptureFixture[str],
                                                             tmp_path: Path) -> None:
    """The README's config reference: every key with its value, and a file faar-train accepts."""
    assert train_main(["--config", "demo", "--set", "pdrs.margin=3", "--print-config"]) == 0
    text = capsys.readouterr().out
    assert "spectral_filter: channel" in text and "margin: 3" in text
    (tmp_path / "c.yaml").write_text(text)
    assert load_config(str(tmp_path / "c.yaml")) == load_config("demo", ["pdrs.margin=3"])


def test_cli_errors_are_clear(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert train_main(["--config", "tiny", "--set", "model.nope=1", "--out", str(tmp_path / "x")]) == 2
    assert "model.nope" in capsys.readouterr().err


def test_ddp_two_processes_gloo(tmp_path: Path) -> None:
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "faar", "--config", "tiny", "--out", str(out), "--quiet",
           "--set", "data.num_train=32", "--set", "data.num_val=8", "--set", "train.epochs=2",
           "--set", "train.batch_size=4"]
    proc = _run(cmd)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = json.loads((out / "ranks.json").read_text())
    assert len(ranks["epochs"]) == 2
    assert load_model(out).ranks() == ranks["epochs"][-1]["ranks"]


# --- partial labels ---------------------------------------------------------------------------


@pytest.fixture
def one_thread():
    """Small in-process models run in one intra-op thread: on a loaded machine two threads spin-wait
    on each other (about 10x slower here) and nothing is gained at this size."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# Which labels each sample of the partial-label batch lacks (a missing key in its raw sample).
MISSING = {1: ("semseg", "saliency", "depth"), 2: ("normals", "edge", "human_parts"), 3: ("semseg", "normals")}


class MissingLabels(Scenes):
    def _load(self, index: int) -> dict:
        sample = super()._load(index)
        for task in MISSING.get(index, ()):
            sample.pop(task)
        return sample


def _task_grads(model: torch.nn.Module, batch: dict) -> dict[str, tuple[float, list[torch.Tensor]]]:
    """Every task's loss and its gradient with respect to every trainable parameter."""
    params = [p for p in model.parameters() if p.requires_grad]
    losses = task_losses(model.tasks, model(batch["image"]), batch)
    out = {}
    for task, loss in losses.items():
        grads = torch.autograd.grad(loss, params, allow_unused=True, retain_graph=True)
        out[task] = loss.item(), [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads, strict=True)]
    return out


def test_a_mixed_batch_trains_each_task_as_its_labelled_samples_alone(one_thread) -> None:
    """Through the dataset, the default collate and the training loss: for every task, the loss and
    gradients of a batch where some samples lack the task's label equal those of its labelled samples.

    The model is in eval mode so that BatchNorm uses its running statistics: in train mode every
    sample's normalisation depends on the whole batch, labelled or not, which is batch training's
    coupling, not label handling's."""
    cfg = load_config("tiny")
    ds = MissingLabels(4, 0, "train", cfg.model.tasks, tuple(cfg.model.img_size))
    torch.manual_seed(0)
    model = build_model(cfg.model, classes=ds.classes).eval()
    with torch.no_grad():
        for a in adapters_of(model).values():
            a.lora_B.normal_(std=0.05)
    mixed = _task_grads(model, default_collate([ds[i] for i in range(4)]))
    for task in cfg.model.tasks:
        labelled = [i for i in range(4) if task not in MISSING.get(i, ())]
        assert 2 <= len(labelled) < 4
        loss, grads = _task_grads(model, default_collate([ds[i] for i in labelled]))[task]
        assert mixed[task][0] == pytest.approx(loss, rel=1e-5), task
        assert any(g.abs().max() > 0 for g in grads), task
        for a, b in zip(mixed[task][1], grads, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=task)


def test_a_batch_without_a_task_label_adds_zero_loss(one_thread) -> None:
    cfg = load_config("tiny")
    ds = Scenes(2, 0, "train", cfg.model.tasks, tuple(cfg.model.img_size))
    torch.manual_seed(0)
    model = build_model(cfg.model, classes=ds.classes).eval()
    batch = default_collate([ds[0], ds[1]])
    for task in cfg.model.tasks:
        spec = model.tasks[task]
        batch[task] = torch.stack([spec.rules.unlabelled(spec, ds.img_size)] * 2)
    losses = task_losses(model.tasks, model(batch["image"]), batch)
    assert {t: v.item() for t, v in losses.items()} == dict.fromkeys(cfg.model.tasks, 0.0)
