"""Metrics against hand-computed cases, references written here in numpy from MTI-Net's definitions
(never calls into faar.metrics), and Delta_m on the paper's numbers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from faar.metrics import (
    LOWER_IS_BETTER,
    SALIENCY_THRESHOLDS,
    MultiTaskMetrics,
    delta_m,
    trivial_baseline,
)
from faar.tasks import TASKS, TaskSpec, resolve_tasks


def one_task(name: str, **kw) -> dict[str, TaskSpec]:
    return {name: TASKS[name]} if not kw else resolve_tasks([name], **kw)


def logits_of(prob: list) -> torch.Tensor:
    """(H,W) probabilities -> (1,1,H,W) logits."""
    return torch.logit(torch.tensor(prob, dtype=torch.float64)).float()[None, None]


def run(tasks: dict[str, TaskSpec], pred: torch.Tensor, target: torch.Tensor, **kw) -> dict[str, float]:
    (name,) = tasks
    m = MultiTaskMetrics(tasks, **kw)
    m.update({name: pred}, {name: target})
    return m.compute()[name]


# --- label tasks ---------------------------------------------------------------------------------------


def semseg_case() -> tuple[dict[str, TaskSpec], torch.Tensor, torch.Tensor]:
    tasks = one_task("semseg", num_classes={"semseg": 4})
    gt = torch.tensor([[[0, 0, 1], [1, 255, 2]]])
    label = torch.tensor([[[0, 1, 1], [1, 2, 0]]])  # the 2 under the ignore pixel must not count
    return tasks, F.one_hot(label, 4).permute(0, 3, 1, 2).float(), gt


def test_semseg_miou_by_hand() -> None:
    tasks, pred, gt = semseg_case()
    r = run(tasks, pred, gt)
    # valid pixels (gt, pred): (0,0) (0,1) (1,1) (1,1) (2,0)
    # class 0: tp 1, fp 1, fn 1 -> 1/3; class 1: tp 2, fp 1 -> 2/3; class 2: tp 0, fn 1 -> 0;
    # class 3 absent from both: IoU 0 in the published mean (MTI-Net), left out of miou_present.
    assert r["miou"] == pytest.approx(100 * (1 / 3 + 2 / 3 + 0 + 0) / 4)
    assert r["miou_present"] == pytest.approx(100 * (1 / 3 + 2 / 3 + 0) / 3)
    assert r["pixel_acc"] == pytest.approx(100 * 3 / 5)
    assert r["classes_present"] == 3
    assert r["iou_background"] == pytest.approx(100 / 3)
    assert r["iou_aeroplane"] == pytest.approx(200 / 3)
    assert r["iou_bicycle"] == 0
    assert "iou_bird" not in r


def test_confusion_accumulates_over_batches_and_resets() -> None:
    tasks, pred, gt = semseg_case()
    flipped = gt.flip(-1), pred.flip(-1)
    m = MultiTaskMetrics(tasks)
    m.update({"semseg": pred}, {"semseg": gt})
    m.update({"semseg": flipped[1]}, {"semseg": flipped[0]})
    both = MultiTaskMetrics(tasks)
    both.update({"semseg": torch.cat([pred, flipped[1]])}, {"semseg": torch.cat([gt, flipped[0]])})
    assert m.compute() == both.compute()
    m.reset()
    assert math.isnan(m.compute()["semseg"]["miou"])


def test_labels_out_of_range_raise() -> None:
    tasks, pred, gt = semseg_case()
    gt[0, 0, 0] = 7
    with pytest.raises(ValueError, match="outside"):
        run(tasks, pred, gt)


def test_prediction_is_resized_to_the_label() -> None:
    tasks = one_task("human_parts")
    pred = torch.zeros(1, 7, 2, 2)
    pred[:, 3] = 1  # every pixel says class 3
    gt = torch.full((1, 8, 8), 3)
    gt[0, 0] = 255
    r = run(tasks, pred, gt)
    assert r["miou_present"] == 100 and r["pixel_acc"] == 100 and r["classes_present"] == 1
    assert r["miou"] == pytest.approx(100 / 7)  # six of the seven classes absent: IoU 0 each


def reference_miou(label: np.ndarray, gt: np.ndarray, n: int) -> float:
    """MTI-Net's eval_semseg: per class tp / fp / fn over valid pixels, jaccard = tp / max(tp+fp+fn, 1e-8),
    mean over all n classes."""
    valid = gt != 255
    jac = []
    for c in range(n):
        tp = np.sum((gt == c) & (label == c) & valid)
        fp = np.sum((gt != c) & (label == c) & valid)
        fn = np.sum((gt == c) & (label != c) & valid)
        jac.append(tp / max(tp + fp + fn, 1e-8))
    return 100 * float(np.mean(jac))


def test_miou_matches_the_reference_definition() -> None:
    tasks = one_task("semseg")  # 21 classes; the random labels below never use classes 15..20
    g = torch.Generator().manual_seed(3)
    gt = torch.randint(0, 12, (4, 9, 11), generator=g)
    gt[:, 0] = 255
    logits = torch.randn(4, 21, 9, 11, generator=g)
    logits[:, 15:] -= 100
    r = run(tasks, logits, gt)
    expected = reference_miou(logits.argmax(1).numpy(), gt.numpy(), 21)
    assert r["miou"] == pytest.approx(expected, abs=1e-9)
    assert r["miou_present"] > r["miou"]


# --- saliency ------------------------------------------------------------------------------------------


def saliency_case() -> tuple[torch.Tensor, torch.Tensor]:
    # Image A: two salient pixels; image B: nothing salient, one ignored pixel that would be a false positive.
    pred = torch.cat([logits_of([[0.95, 0.55], [0.33, 0.10]]), logits_of([[0.62, 0.10], [0.10, 0.99]])])
    gt = torch.tensor([[[[1.0, 1.0], [0.0, 0.0]]], [[[0.0, 0.0], [0.0, 255.0]]]])
    return pred, gt


def test_saliency_by_hand() -> None:
    pred, gt = saliency_case()
    r = run(one_task("saliency"), pred, gt)
    # Per threshold t (predicted: prob > t), IoU of A / B:
    #   0.20-0.30: A 2/3, B 0 (one false positive) -> 1/3
    #   0.35-0.50: A 1,   B 0                      -> 1/2
    #   0.55-0.60: A 1/2, B 0                      -> 1/4
    #   0.65-0.90: A 1/2, B 1 (both empty)         -> 3/4   <- max, first at 0.65
    assert r["miou"] == pytest.approx(75.0)
    assert r["miou_threshold"] == pytest.approx(0.65)
    # Image-averaged P, R: 0.35-0.50 has P = R = 1/2, the max of both F = 2PR/(P+R) and F_beta
    # (0.20-0.30: P 1/3, R 1/2 -> F 0.4; later: P 1/2, R 1/4 -> F 1/3).
    assert r["maxf"] == pytest.approx(50.0)
    assert r["maxf_beta"] == pytest.approx(50.0)
    # Pooled counts: 0.65-0.90 has tp 1, predicted 1, positives 2 -> P 1, R 1/2 -> 1.3*0.5/(0.3+0.5).
    assert r["maxf_beta_pooled"] == pytest.approx(100 * 1.3 * 0.5 / 0.8)


def test_saliency_maxf_is_f1_not_f_beta() -> None:
    """One image where the two F-measures peak at different thresholds (MTI-Net's maxF is F1)."""
    pred = logits_of([[0.95, 0.57], [0.32, 0.47]])
    gt = torch.tensor([[[[1.0, 1.0], [1.0, 0.0]]]])
    r = run(one_task("saliency"), pred, gt)
    # 0.20-0.30: all four predicted: P 3/4, R 1 -> F1 6/7 (the max), F_beta 0.796
    # 0.35-0.45: P 2/3, R 2/3; 0.50-0.55: P 1, R 2/3 -> F1 0.8, F_beta 0.8966 (its max)
    assert r["maxf"] == pytest.approx(100 * 6 / 7)
    assert r["maxf_beta"] == pytest.approx(100 * 1.3 * (2 / 3) / (0.3 + 2 / 3))


def test_saliency_thresholds_are_the_references() -> None:
    assert np.allclose(SALIENCY_THRESHOLDS, np.linspace(0.2, 0.9, 15))


def test_saliency_threshold_is_strict() -> None:
    # prob exactly 0.5, nothing salient: predicted at t < 0.5 (IoU 0), empty from t = 0.5 on (IoU 1)
    r = run(one_task("saliency"), torch.zeros(1, 1, 3, 3), torch.zeros(1, 1, 3, 3))
    assert r["miou"] == 100
    assert r["miou_threshold"] == pytest.approx(0.5)


def test_saliency_skips_images_without_valid_pixels() -> None:
    pred, gt = saliency_case()
    r = run(one_task("saliency"), pred, gt)
    pred2 = torch.cat([pred, torch.zeros(1, 1, 2, 2)])
    gt2 = torch.cat([gt, torch.full((1, 1, 2, 2), 255.0)])
    assert run(one_task("saliency"), pred2, gt2) == r


def brute_force_saliency(prob: np.ndarray, gt: np.ndarray) -> dict[str, float]:
    """ASTMT's / MTI-Net's loop: per threshold and image jaccard / precision / recall, the averages over
    images, F = 2PR/(P+R) of the averages, the max over thresholds; plus the two F-beta variants."""
    ious, precs, recs, tps, preds = [], [], [], [], []
    for t in np.linspace(0.2, 0.9, 15):
        iou, prec, rec = [], [], []
        for p, g in zip(prob, gt, strict=True):
            m, g = p > t, g.astype(bool)
            inter, union = (m & g).sum(), (m | g).sum()
            iou.append(1.0 if union == 0 else inter / union)
            prec.append(inter / (m.sum() + 1e-12))
            rec.append(inter / (g.sum() + 1e-12))
        ious.append(np.mean(iou))
        precs.append(np.mean(prec))
        recs.append(np.mean(rec))
        tps.append(((prob > t) & gt.astype(bool)).sum())
        preds.append((prob > t).sum())
    p, r = np.array(precs), np.array(recs)
    pp, pr = np.array(tps) / np.maximum(preds, 1), np.array(tps) / gt.astype(bool).sum()
    return {"miou": 100 * max(ious), "maxf": 100 * (2 * p * r / (p + r + 1e-12)).max(),
            "maxf_beta": 100 * (1.3 * p * r / (0.3 * p + r + 1e-12)).max(),
            "maxf_beta_pooled": 100 * (1.3 * pp * pr / (0.3 * pp + pr + 1e-12)).max()}


def test_saliency_matches_brute_force_reference() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 1, 9, 7, generator=g) * 2
    gt = (torch.rand(6, 1, 9, 7, generator=g) < 0.4).float()
    gt[2] = 0  # an image with nothing salient
    r = run(one_task("saliency"), logits, gt)
    expected = brute_force_saliency(logits.sigmoid().squeeze(1).numpy(), gt.squeeze(1).numpy())
    for key, value in expected.items():
        assert r[key] == pytest.approx(value, abs=1e-6), key


# --- normals -------------------------------------------------------------------------------------------


def normals_case() -> tuple[torch.Tensor, torch.Tensor, list[float]]:
    angles = [0.0, 12.0, 25.0, 45.0, 60.0, 90.0, 33.0, 70.0]  # the last two pixels are invalid
    rad = torch.deg2rad(torch.tensor(angles))
    # Tilt about y, not unit length: the metric must normalise the raw output.
    pred = 2.5 * torch.stack([rad.sin(), torch.zeros(8), rad.cos()]).view(1, 3, 2, 4)
    gt = torch.tensor([0.0, 0.0, 1.0])[:, None].repeat(1, 8)
    gt[:, 6] = 0  # unlabelled
    gt[:, 7] = 255  # ignore
    return pred, gt.view(1, 3, 2, 4), angles[:6]


def test_normals_by_hand() -> None:
    pred, gt, errors = normals_case()
    r = run(one_task("normals"), pred, gt)
    # errors 0, 12, 25, 45, 60, 90 degrees; the shares count strictly below each bound
    assert r["mean"] == pytest.approx(232 / 6, abs=1e-4)
    assert r["median"] == pytest.approx((25 + 45) / 2, abs=0.01)
    assert r["rmse"] == pytest.approx(math.sqrt(sum(e * e for e in errors) / 6), abs=1e-4)
    assert r["within_11.25"] == pytest.approx(100 / 6)
    assert r["within_22.5"] == pytest.approx(200 / 6)
    assert r["within_30"] == pytest.approx(300 / 6)


@pytest.mark.parametrize("n", [1001, 1000])
def test_normals_median_is_within_a_hundredth_of_a_degree(n: int) -> None:
    g = torch.Generator().manual_seed(n)
    pred = torch.randn(1, 3, 1, n, generator=g)
    gt = F.normalize(torch.randn(1, 3, 1, n, generator=g), dim=1)
    m = MultiTaskMetrics(one_task("normals"))
    for chunk in range(0, n, 300):  # several updates: the histogram must accumulate
        m.update({"normals": pred[..., chunk:chunk + 300]}, {"normals": gt[..., chunk:chunk + 300]})
    cos = (F.normalize(pred, dim=1) * gt).sum(1).double().clamp(-1, 1)
    exact = np.degrees(np.arccos(cos.numpy())).ravel()
    r = m.compute()["normals"]
    assert r["median"] == pytest.approx(np.median(exact), abs=0.01)
    assert r["mean"] == pytest.approx(exact.mean(), abs=1e-3)


# --- depth ---------------------------------------------------------------------------------------------


def test_depth_by_hand() -> None:
    gt = torch.tensor([[[[1.0, 2.0, 4.0], [0.0, 0.5, 3.0]]]])
    pred = torch.tensor([[[[1.2, 2.0, 6.0], [5.0, -1.0, 3.0]]]])  # -1 is clamped to 0; 5 sits on invalid
    r = run(one_task("depth"), pred, gt)
    # valid: (1, 1.2) (2, 2) (4, 6) (0.5, 0) (3, 3)
    assert r["rmse"] == pytest.approx(math.sqrt((0.2**2 + 0 + 2**2 + 0.5**2 + 0) / 5))
    assert r["abs_rel"] == pytest.approx((0.2 + 0 + 0.5 + 1 + 0) / 5)
    assert r["delta1"] == pytest.approx(100 * 3 / 5)  # ratios 1.2, 1, 1.5, inf, 1
    # log-rmse as MTI-Net: the prediction clamped to 1e-9 before the log
    logs = [math.log(1 / 1.2), 0, math.log(4 / 6), math.log(0.5 / 1e-9), 0]
    assert r["log_rmse"] == pytest.approx(math.sqrt(sum(v * v for v in logs) / 5))


def test_depth_matches_the_reference_definition() -> None:
    """MTI-Net's eval_depth on random maps: pixels pooled over images, label 0 = no label."""
    g = torch.Generator().manual_seed(4)
    gt = torch.rand(3, 1, 8, 6, generator=g) * 6
    gt[gt < 0.8] = 0
    pred = torch.randn(3, 1, 8, 6, generator=g) * 3 + 2  # some negative: clamped
    r = run(one_task("depth"), pred, gt)
    label, p = gt.numpy().astype(np.float64), pred.numpy().astype(np.float64)
    valid = label != 0
    p = np.maximum(p, 0)  # the depth task's activation
    p[p <= 0] = 1e-9
    assert r["rmse"] == pytest.approx(np.sqrt(np.mean((label[valid] - p[valid]) ** 2)), rel=1e-9)
    assert r["log_rmse"] == pytest.approx(np.sqrt(np.mean((np.log(label[valid]) - np.log(p[valid])) ** 2)),
                                          rel=1e-9)


# --- edge ----------------------------------------------------------------------------------------------


def test_edge_best_f_without_tolerance() -> None:
    prob = [[0.605, 0.02, 0.02], [0.02, 0.8, 0.02], [0.02, 0.02, 0.02]]
    gt = torch.tensor([[[[0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0]]]])
    r = run(one_task("edge"), logits_of(prob), gt, edge_tolerance=0.0)
    # t < 0.02: all 9 predicted (P 2/9, R 1 -> 4/11); 0.02 <= t <= 0.60: P 1/2, R 1/2;
    # 0.61 <= t < 0.80: only the centre, P 1, R 1/2 -> F 2/3, first reached at 0.61.
    assert r["odsf"] == pytest.approx(200 / 3)
    assert r["ods_threshold"] == pytest.approx(0.61)


def test_edge_tolerance_matches_nearby_pixels() -> None:
    prob = torch.full((5, 5), 1e-4)
    prob[1, 1] = prob[4, 4] = 0.9
    gt = torch.zeros(1, 1, 5, 5)
    gt[..., 0, 0] = 1
    exact = run(one_task("edge"), logits_of(prob.tolist()), gt, edge_tolerance=0.0)
    assert exact["odsf"] == 0
    # diagonal 7.07 * 0.15 rounds to 1 pixel: (1,1) matches (0,0) -> P 1/2, R 1 -> F 2/3
    near = run(one_task("edge"), logits_of(prob.tolist()), gt, edge_tolerance=0.15)
    assert near["odsf"] == pytest.approx(200 / 3)


def test_edge_loss_is_balanced_bce() -> None:
    gt = torch.tensor([[[[1.0, 0.0], [0.0, 255.0]]]])
    r = run(one_task("edge"), torch.zeros(1, 1, 2, 2), gt)
    # logit 0 -> bce ln 2 per pixel; pos_weight 0.95 for the 1 positive, 0.05 for the 2 negatives
    assert r["loss"] == pytest.approx(math.log(2) * (0.95 + 2 * 0.05) / 3, rel=1e-6)


# --- Delta_m -------------------------------------------------------------------------------------------

PASCAL_SINGLE = {"semseg": {"miou": 67.21}, "human_parts": {"miou": 61.93},
                 "saliency": {"miou": 62.35}, "normals": {"mean": 17.97}}


def pascal(semseg: float, parts: float, sal: float, normals: float) -> dict[str, dict[str, float]]:
    return {"semseg": {"miou": semseg}, "human_parts": {"miou": parts},
            "saliency": {"miou": sal}, "normals": {"mean": normals, "median": 9.0}}


def test_delta_m_on_the_papers_pascal_numbers() -> None:
    d = delta_m(pascal(72.02, 61.25, 66.11, 16.35), PASCAL_SINGLE)
    by_hand = 100 / 4 * (4.81 / 67.21 - 0.68 / 61.93 + 3.76 / 62.35 + 1.62 / 17.97)  # normals sign flipped
    assert d == pytest.approx(by_hand, abs=1e-9)
    assert d == pytest.approx(5.2761, abs=1e-4)  # the paper prints +5.28
    # MTLoRA r=64 gives +2.54 from the printed (rounded) numbers; the paper prints +2.55.
    assert delta_m(pascal(67.90, 59.84, 65.40, 16.60), PASCAL_SINGLE) == pytest.approx(2.5418, abs=1e-4)
    assert delta_m(pascal(67.21, 61.93, 62.35, 17.97), PASCAL_SINGLE) == 0


def test_delta_m_on_the_papers_nyud_numbers() -> None:
    single = {"semseg": {"miou": 42.65}, "depth": {"rmse": 0.60}, "normals": {"mean": 22.83}}
    faar = {"semseg": {"miou": 41.27}, "depth": {"rmse": 0.63}, "normals": {"mean": 26.35}}
    assert delta_m(faar, single) == pytest.approx(100 / 3 * (-1.38 / 42.65 - 0.03 / 0.60 - 3.52 / 22.83))
    assert round(delta_m(faar, single), 2) == -7.88
    assert {"mean", "rmse"} <= LOWER_IS_BETTER and "miou" not in LOWER_IS_BETTER


def test_delta_m_weighs_tasks_not_metrics_and_checks_keys() -> None:
    single = {"semseg": {"miou": 50.0, "pixel_acc": 80.0}, "depth": {"rmse": 1.0}}
    res = {"semseg": {"miou": 55.0, "pixel_acc": 80.0}, "depth": {"rmse": 0.9}}
    assert delta_m(res, single) == pytest.approx(100 * ((0.1 + 0) / 2 + 0.1) / 2)
    with pytest.raises(KeyError):
        delta_m({"semseg": res["semseg"]}, single)


# --- the multi-task wrapper, trivial baseline, devices, distributed -------------------------------------


ALL = ("semseg", "human_parts", "saliency", "normals", "depth", "edge")


def random_targets(seed: int, b: int = 2, h: int = 6, w: int = 5) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    semseg = torch.randint(0, 21, (b, h, w), generator=g)
    semseg[:, :3] = 4  # a clear majority class
    parts = torch.randint(0, 7, (b, h, w), generator=g)
    parts[:, 0] = 255
    up = torch.tensor([0, 0, 2.0])[:, None, None]
    normals = F.normalize(torch.randn(b, 3, h, w, generator=g) + up, dim=1)
    normals[:, :, 0, 0] = 0
    depth = torch.rand(b, 1, h, w, generator=g) * 5
    depth[:, :, 1] = 0
    return {"semseg": semseg, "human_parts": parts, "normals": normals, "depth": depth,
            "saliency": (torch.rand(b, 1, h, w, generator=g) < 0.3).float(),
            "edge": (torch.rand(b, 1, h, w, generator=g) < 0.1).float()}


def random_preds(seed: int, tasks: dict[str, TaskSpec], b: int = 2, h: int = 6, w: int = 5) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(b, s.channels, h, w, generator=g) for n, s in tasks.items()}


def test_trivial_baseline_constants_and_scores() -> None:
    tasks = resolve_tasks(ALL)
    train = [random_targets(s) for s in range(3)]
    base = trivial_baseline(tasks, train)
    out = base(torch.zeros(2, 3, 6, 5))
    assert {k: tuple(v.shape) for k, v in out.items()} == {n: (2, s.channels, 6, 5) for n, s in tasks.items()}
    assert int(out["semseg"][0, :, 0, 0].argmax()) == 4
    sal = torch.cat([t["saliency"] for t in train])
    assert out["saliency"][0, 0, 0, 0].sigmoid().item() == pytest.approx(sal.mean().item(), rel=1e-5)
    depth = torch.cat([t["depth"] for t in train])
    assert out["depth"][0, 0, 0, 0].item() == pytest.approx(depth[depth > 0].mean().item(), rel=1e-5)

    m = MultiTaskMetrics(tasks)
    for t in train:
        m.update(base(torch.zeros(2, 3, 6, 5)), t)
    r = m.compute()
    seg = torch.cat([t["semseg"] for t in train])
    assert r["semseg"]["pixel_acc"] == pytest.approx(100 * (seg == 4).float().mean().item())
    # the mean is the constant with the least rmse: the rmse is the population std of valid depths
    assert r["depth"]["rmse"] == pytest.approx(depth[depth > 0].double().std(unbiased=False).item(), rel=1e-5)
    assert set(r) == set(ALL)


def test_samples_without_a_label_do_not_count() -> None:
    """A sample whose label is all unlabelled (how a missing label arrives) changes no task's metrics."""
    tasks = resolve_tasks(ALL)
    targets, preds = random_targets(5, b=3), random_preds(6, tasks, b=3)
    subset = MultiTaskMetrics(tasks)
    subset.update({n: p[[0, 2]] for n, p in preds.items()}, {n: t[[0, 2]] for n, t in targets.items()})
    mixed = MultiTaskMetrics(tasks)
    unlabelled = {n: t.clone() for n, t in targets.items()}
    for name, spec in tasks.items():
        unlabelled[name][1] = spec.rules.unlabelled(spec, (6, 5))
    mixed.update(preds, unlabelled)
    assert mixed.compute() == subset.compute()


def test_missing_task_raises() -> None:
    tasks = resolve_tasks(["semseg", "depth"])
    t = random_targets(0)
    with pytest.raises(KeyError, match="depth"):
        MultiTaskMetrics(tasks).update(random_preds(0, tasks), {"semseg": t["semseg"]})


def test_all_reduce_without_process_group_is_a_no_op() -> None:
    tasks = resolve_tasks(ALL)
    m = MultiTaskMetrics(tasks)
    m.update(random_preds(1, tasks), random_targets(1))
    before = m.compute()
    m.all_reduce()
    assert m.compute() == before


def test_all_reduce_sums_every_accumulator(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two simulated ranks: rank 0 saw batch 0, the other rank batches 1 and 2; rank 2 saw nothing.

    A fake collective adds the other rank's state tensor by tensor, so a meter that forgot an
    accumulator, or reduced a copy instead of in place, gives a different result from one pass.
    """
    tasks = resolve_tasks(ALL)
    batches = [(random_preds(s, tasks), random_targets(s)) for s in range(3)]
    one_pass, other = MultiTaskMetrics(tasks), MultiTaskMetrics(tasks)
    for i, (p, t) in enumerate(batches):
        one_pass.update(p, t)
        if i:
            other.update(p, t)
    rank0, idle = MultiTaskMetrics(tasks), MultiTaskMetrics(tasks)
    rank0.update(*batches[0])
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_backend", lambda: "gloo")
    for mine, theirs in ((rank0, other), (idle, one_pass)):
        sent = iter([t for meter in theirs.meters.values() for t in meter.state.values()])
        monkeypatch.setattr(dist, "all_reduce", lambda t, op, sent=sent: t.add_(next(sent)))
        mine.all_reduce()
        assert next(sent, None) is None
        got = mine.compute()
        for task, metrics in one_pass.compute().items():
            assert got[task] == pytest.approx(metrics, rel=1e-12)


def test_all_reduce_runs_on_a_real_gloo_group(tmp_path) -> None:
    """World size 1: checks that gloo takes every accumulator's dtype and shape, and sums nothing away."""
    tasks = resolve_tasks(ALL)
    m = MultiTaskMetrics(tasks)
    m.update(random_preds(0, tasks), random_targets(0))
    before = m.compute()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        m.all_reduce()
    finally:
        dist.destroy_process_group()
    assert m.compute() == before


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu() -> None:
    tasks = resolve_tasks(ALL)
    cpu, gpu = MultiTaskMetrics(tasks), MultiTaskMetrics(tasks)
    for seed in range(2):
        preds, targets = random_preds(seed, tasks), random_targets(seed)
        cpu.update(preds, targets)
        gpu.update({k: v.cuda() for k, v in preds.items()}, {k: v.cuda() for k, v in targets.items()})
    expected = cpu.compute()
    for task, metrics in gpu.compute().items():
        assert metrics == pytest.approx(expected[task], rel=1e-5, abs=1e-4)
