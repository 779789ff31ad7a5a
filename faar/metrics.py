"""Evaluation metrics as the MTI-Net / MTLoRA family computes them, plus Delta_m and a trivial baseline.

Every meter keeps only fixed-size accumulators (confusion matrices, per-threshold sums, a histogram),
so memory does not grow with the evaluation set, and sums them across processes in ``all_reduce``.
Percentages (mIoU, accuracies, F-scores, shares) are reported in percent, as the papers print them.

The published names follow MTI-Net's / ASTMT's evaluation code (``evaluation/eval_*.py``), where the
published PASCAL-Context and NYUDv2 numbers come from; a variant keeps its own explicit name:
- label tasks: ``miou`` averages the IoU of *every* class, a class absent from both ground truth and
  prediction counting 0, as the reference does; ``miou_present`` leaves such classes out (on a small
  subset it is not dragged down by classes that never occur).
- saliency: ``maxf`` is F = 2PR/(P+R) of the image-averaged precision and recall at each of the 15
  thresholds, the max kept; ``maxf_beta`` is F-beta (beta^2 = 0.3, the salient-object literature's
  weighting) of the same averages, ``maxf_beta_pooled`` F-beta of precision and recall from pixel counts
  pooled over the set (MTLoRA's "Beta maxF", without its second sigmoid).
- depth: ``rmse`` and ``log_rmse`` (MTI-Net's pair: pixels pooled over the set, the prediction clamped
  to 1e-9 before the log), plus ``abs_rel`` and ``delta1``.

Where this module departs from the reference code on purpose:
- saliency: thresholds apply to the sigmoid probability itself (the reference first rounds it to
  uint8); pixels labelled 255 are ignored; images without a valid pixel are skipped.
- normals: errors use ``2*atan2(|p-g|, |p+g|)`` on normalised vectors (accurate near 0 degrees);
  ``rmse`` is the true root mean square. The reference's "rmse", which the papers quote, is the mean.
- edge: a pixel-level proxy (see ``EdgeMeter``); the real benchmark needs the MATLAB SEISM toolkit.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .losses import IGNORE_INDEX, balanced_bce, depth_valid, normals_valid

if TYPE_CHECKING:  # tasks.py builds its kinds from the meters below
    from .tasks import TaskSpec

# Metrics where smaller is better; every other metric compared by ``delta_m`` is higher-is-better.
LOWER_IS_BETTER: frozenset[str] = frozenset({"mean", "median", "rmse", "log_rmse", "abs_rel", "loss"})

# ASTMT / MTI-Net / MTLoRA: 15 thresholds 0.20, 0.25, ..., 0.90.
SALIENCY_THRESHOLDS: tuple[float, ...] = tuple(0.2 + 0.05 * i for i in range(15))
SALIENCY_BETA2 = 0.3  # F-beta weighting used for salient-object detection
# SEISM uses 99 thresholds and a match distance of 0.0075 of the image diagonal.
EDGE_THRESHOLDS: tuple[float, ...] = tuple(i / 100 for i in range(1, 100))
EDGE_TOLERANCE = 0.0075
DEPTH_LOG_FLOOR = 1e-9  # MTI-Net clamps the predicted depth to this before the log
NORMALS_BIN_DEG = 0.01  # histogram bin for the median: reported median is within 0.005 degrees
NORMALS_WITHIN = (11.25, 22.5, 30.0)


def _count_above(values: torch.Tensor, thresholds: torch.Tensor, groups: torch.Tensor | None = None,
                 n_groups: int = 1) -> torch.Tensor:
    """Per group and threshold, how many ``values`` are strictly above it: (n_groups, T) int64, one pass."""
    t = thresholds.numel()
    bucket = torch.bucketize(values, thresholds)  # number of thresholds strictly below each value
    if groups is not None:
        bucket = bucket + groups * (t + 1)
    hist = torch.bincount(bucket, minlength=n_groups * (t + 1)).view(n_groups, t + 1)
    # count(value > thresholds[k]) = sum of buckets k+1..T
    return hist.flip(1).cumsum(1).flip(1)[:, 1:]


def _div(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """num / den with 0 where den is 0 (the reference code's convention for empty precision/recall)."""
    return torch.where(den > 0, num / den.clamp(min=1e-300), torch.zeros_like(num))


class Meter:
    """Accumulator state as named tensors, so reset, device moves and all-reduce are generic."""

    def __init__(self) -> None:
        self.state = self._zeros()

    def _zeros(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def reset(self) -> None:
        self.state = self._zeros()

    def to(self, device: torch.device) -> None:
        self.state = {k: v.to(device) for k, v in self.state.items()}

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        raise NotImplementedError

    def compute(self) -> dict[str, float]:
        raise NotImplementedError


class ConfusionMeter(Meter):
    """Semantic segmentation / human parts: mIoU and pixel accuracy from one confusion matrix."""

    def __init__(self, spec: TaskSpec) -> None:
        self.spec = spec
        self.n = spec.channels
        names = spec.classes if len(spec.classes) == self.n else tuple(str(i) for i in range(self.n))
        self.class_names = names
        super().__init__()

    def _zeros(self) -> dict[str, torch.Tensor]:
        return {"confusion": torch.zeros(self.n, self.n, dtype=torch.int64)}  # rows: truth, cols: pred

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        label = self.spec.postprocess(pred).flatten()
        gt = target.long().flatten()
        valid = gt != IGNORE_INDEX
        gt, label = gt[valid], label[valid]
        if gt.numel() and (gt.min() < 0 or gt.max() >= self.n):
            raise ValueError(f"{self.spec.name}: labels outside [0, {self.n}) that are not {IGNORE_INDEX}")
        counts = torch.bincount(gt * self.n + label, minlength=self.n * self.n)
        self.state["confusion"] += counts.view(self.n, self.n)

    def compute(self) -> dict[str, float]:
        """``miou`` over every class (absent = 0), ``miou_present`` over present ones; NaN if no pixel was seen."""
        cm = self.state["confusion"].double().cpu()
        tp = cm.diag()
        union = cm.sum(0) + cm.sum(1) - tp
        present = union > 0
        iou = tp[present] / union[present] * 100
        total = cm.sum()
        seen = bool(total > 0)
        out = {
            "miou": iou.sum().item() / self.n if seen else math.nan,
            "miou_present": iou.mean().item() if seen else math.nan,
            "pixel_acc": (tp.sum() / total * 100).item() if seen else math.nan,
            "classes_present": float(present.sum()),
        }
        # Absent classes get no key: an IoU of 0/0 is not a measurement.
        present_names = [n for n, p in zip(self.class_names, present.tolist(), strict=True) if p]
        out.update({f"iou_{n}": v for n, v in zip(present_names, iou.tolist(), strict=True)})
        return out


class SaliencyMeter(Meter):
    """Salient-object detection: max-over-thresholds mean IoU and maxF.

    Per threshold t (strictly ``prob > t``) and image: IoU (1 when prediction and truth are both empty,
    as ASTMT's ``jaccard``), precision and recall (0 when their denominator is 0). ``miou`` is the max
    over thresholds of the image-averaged IoU, ``miou_threshold`` its argmax. ``maxf`` is the max over
    thresholds of F = 2PR/(P+R) of the *image-averaged* precision and recall (MTI-Net's and ASTMT's
    code); ``maxf_beta`` the same with F-beta (beta^2 = 0.3); ``maxf_beta_pooled`` F-beta of precision and
    recall from pixel counts pooled over the whole set (MTLoRA's "Beta maxF", without its second sigmoid).
    """

    def __init__(self, spec: TaskSpec) -> None:
        self.spec = spec
        self.thresholds = torch.tensor(SALIENCY_THRESHOLDS)
        super().__init__()

    def _zeros(self) -> dict[str, torch.Tensor]:
        t = len(SALIENCY_THRESHOLDS)
        f64 = torch.float64
        return {
            "iou_sum": torch.zeros(t, dtype=f64), "prec_sum": torch.zeros(t, dtype=f64),
            "rec_sum": torch.zeros(t, dtype=f64), "images": torch.zeros((), dtype=f64),
            "tp": torch.zeros(t, dtype=torch.int64), "pred_pos": torch.zeros(t, dtype=torch.int64),
            "gt_pos": torch.zeros((), dtype=torch.int64),
        }

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        b = pred.shape[0]
        prob = self.spec.activate(pred).reshape(b, -1)
        gt = target.reshape(b, -1)
        valid = gt != IGNORE_INDEX
        pos = valid & (gt > 0.5)
        image = torch.arange(b, device=pred.device)[:, None].expand_as(prob)
        thr = self.thresholds.to(prob.device, prob.dtype)
        pred_pos = _count_above(prob[valid], thr, image[valid], b)  # (B, T)
        tp = _count_above(prob[pos], thr, image[pos], b)
        gt_pos = pos.sum(1, keepdim=True)
        has_pixels = valid.any(1)
        tp, pred_pos, gt_pos = tp.double(), pred_pos.double(), gt_pos.double()
        union = pred_pos + gt_pos - tp
        iou = torch.where(union > 0, _div(tp, union), torch.ones_like(tp))
        keep = has_pixels[:, None].double()
        s = self.state
        s["iou_sum"] += (iou * keep).sum(0)
        s["prec_sum"] += (_div(tp, pred_pos) * keep).sum(0)
        s["rec_sum"] += (_div(tp, gt_pos) * keep).sum(0)
        s["images"] += has_pixels.sum()
        s["tp"] += tp.sum(0).long()
        s["pred_pos"] += pred_pos.sum(0).long()
        s["gt_pos"] += gt_pos.sum().long()

    def compute(self) -> dict[str, float]:
        s = {k: v.double().cpu() for k, v in self.state.items()}
        if s["images"] == 0:
            return dict.fromkeys(("miou", "miou_threshold", "maxf", "maxf_beta", "maxf_beta_pooled"), math.nan)
        miou = s["iou_sum"] / s["images"]
        best = int(miou.argmax())
        prec, rec = s["prec_sum"] / s["images"], s["rec_sum"] / s["images"]
        pooled_prec, pooled_rec = _div(s["tp"], s["pred_pos"]), _div(s["tp"], s["gt_pos"].expand_as(s["tp"]))
        return {
            "miou": miou[best].item() * 100,
            "miou_threshold": SALIENCY_THRESHOLDS[best],
            "maxf": _fbeta(prec, rec, 1.0).max().item() * 100,
            "maxf_beta": _fbeta(prec, rec, SALIENCY_BETA2).max().item() * 100,
            "maxf_beta_pooled": _fbeta(pooled_prec, pooled_rec, SALIENCY_BETA2).max().item() * 100,
        }


def _fbeta(prec: torch.Tensor, rec: torch.Tensor, beta2: float) -> torch.Tensor:
    return _div((1 + beta2) * prec * rec, beta2 * prec + rec)


class EdgeMeter(Meter):
    """Edge detection proxy: ODS-style best F1 over thresholds at pixel level, and the balanced BCE.

    Not the benchmark number: MTI-Net/MTLoRA report ODS from the MATLAB SEISM toolkit (thinned edges,
    one-to-one bipartite matching). Here a predicted edge pixel counts as correct if a true edge lies
    within ``r = round(tolerance * image diagonal)`` pixels (Chebyshev distance, via max-pooling), and a
    true edge pixel is recalled if a predicted one lies within r; counts are pooled over the set per
    threshold (ODS: one threshold for the whole set). Without thinning or one-to-one matching this is
    optimistic, so compare it only between runs of this code. ``loss`` is MTLoRA's validation number
    for edges: the balanced BCE with the task's ``pos_weight``, averaged over valid pixels.
    """

    def __init__(self, spec: TaskSpec, tolerance: float = EDGE_TOLERANCE) -> None:
        self.spec = spec
        self.tolerance = tolerance
        self.thresholds = torch.tensor(EDGE_THRESHOLDS)
        super().__init__()

    def _zeros(self) -> dict[str, torch.Tensor]:
        t = len(EDGE_THRESHOLDS)
        i64 = torch.int64
        return {
            "pred_pos": torch.zeros(t, dtype=i64), "pred_match": torch.zeros(t, dtype=i64),
            "gt_pos": torch.zeros((), dtype=i64), "gt_match": torch.zeros(t, dtype=i64),
            "loss_sum": torch.zeros((), dtype=torch.float64), "pixels": torch.zeros((), dtype=i64),
        }

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        valid = target != IGNORE_INDEX
        prob = self.spec.activate(pred) * valid
        gt = (target > 0.5) & valid
        h, w = target.shape[-2:]
        r = round(self.tolerance * math.hypot(h, w))
        near_gt = F.max_pool2d(gt.float(), 2 * r + 1, 1, r) > 0
        near_pred = F.max_pool2d(prob, 2 * r + 1, 1, r)  # (near_pred > t) == dilate(prob > t)
        thr = self.thresholds.to(prob.device, prob.dtype)
        s = self.state
        s["pred_pos"] += _count_above(prob[valid], thr)[0]
        s["pred_match"] += _count_above(prob[valid & near_gt], thr)[0]
        s["gt_pos"] += gt.sum()
        s["gt_match"] += _count_above(near_pred[gt], thr)[0]
        n = valid.sum()
        s["loss_sum"] += balanced_bce(pred, target, self.spec.pos_weight).double() * n
        s["pixels"] += n

    def compute(self) -> dict[str, float]:
        s = {k: v.double().cpu() for k, v in self.state.items()}
        if s["pixels"] == 0:
            return {"odsf": math.nan, "ods_threshold": math.nan, "loss": math.nan}
        prec = _div(s["pred_match"], s["pred_pos"])
        rec = _div(s["gt_match"], s["gt_pos"].expand_as(s["gt_match"]))
        f = _fbeta(prec, rec, 1.0)
        best = int(f.argmax())
        return {"odsf": f[best].item() * 100, "ods_threshold": EDGE_THRESHOLDS[best],
                "loss": (s["loss_sum"] / s["pixels"]).item()}


class NormalsMeter(Meter):
    """Surface normals: angular error in degrees over pixels whose label is neither all-zero nor 255.

    ``mean`` is the number the papers call "rmse" (MTLoRA's meter reports the mean under that name);
    ``rmse`` here is the true root mean square. Mean, rmse and the shares below 11.25/22.5/30 degrees
    come from exact sums; the median from a histogram of ``NORMALS_BIN_DEG`` bins (the middle order
    statistic's bin centre, so within half a bin, 0.005 degrees, of the exact median).
    """

    def __init__(self, spec: TaskSpec) -> None:
        self.spec = spec
        self.bins = round(180 / NORMALS_BIN_DEG)
        super().__init__()

    def _zeros(self) -> dict[str, torch.Tensor]:
        f64 = torch.float64
        return {
            "hist": torch.zeros(self.bins, dtype=torch.int64), "sum": torch.zeros((), dtype=f64),
            "sum_sq": torch.zeros((), dtype=f64),
            "within": torch.zeros(len(NORMALS_WITHIN), dtype=torch.int64),
        }

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        valid = normals_valid(target)[:, 0]
        p = self.spec.activate(pred).movedim(1, -1)[valid]
        g = F.normalize(target, dim=1).movedim(1, -1)[valid]
        err = torch.rad2deg(2 * torch.atan2((p - g).norm(dim=-1), (p + g).norm(dim=-1))).double()
        s = self.state
        idx = (err / NORMALS_BIN_DEG).long().clamp(0, self.bins - 1)
        s["hist"] += torch.bincount(idx, minlength=self.bins)
        s["sum"] += err.sum()
        s["sum_sq"] += (err * err).sum()
        s["within"] += torch.stack([(err < a).sum() for a in NORMALS_WITHIN])

    def compute(self) -> dict[str, float]:
        hist = self.state["hist"].cpu()
        n = int(hist.sum())
        if n == 0:
            keys = ("mean", "median", "rmse", *(f"within_{a:g}" for a in NORMALS_WITHIN))
            return {k: math.nan for k in keys}
        cum = hist.cumsum(0)
        ranks = torch.tensor([(n - 1) // 2, n // 2])  # the two middle order statistics (0-based)
        median_bins = torch.searchsorted(cum, ranks, right=True).double()
        out = {
            "mean": self.state["sum"].item() / n,
            "median": ((median_bins + 0.5) * NORMALS_BIN_DEG).mean().item(),
            "rmse": math.sqrt(self.state["sum_sq"].item() / n),
        }
        for a, count in zip(NORMALS_WITHIN, self.state["within"].tolist(), strict=True):
            out[f"within_{a:g}"] = count / n * 100
        return out


class DepthMeter(Meter):
    """Depth over label > 0: rmse (metres), log-rmse (natural log; MTI-Net's, the prediction clamped to
    1e-9), abs-rel error, share with max(p/g, g/p) < 1.25 (percent); pixels pooled over the set."""

    def __init__(self, spec: TaskSpec) -> None:
        self.spec = spec
        super().__init__()

    def _zeros(self) -> dict[str, torch.Tensor]:
        f64 = torch.float64
        return {"sum_sq": torch.zeros((), dtype=f64), "sum_sq_log": torch.zeros((), dtype=f64),
                "sum_abs_rel": torch.zeros((), dtype=f64), "delta1": torch.zeros((), dtype=torch.int64),
                "pixels": torch.zeros((), dtype=torch.int64)}

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        valid = depth_valid(target)
        p = self.spec.postprocess(pred)[valid].double()
        g = target[valid].double()
        s = self.state
        s["sum_sq"] += ((p - g) ** 2).sum()
        s["sum_sq_log"] += ((g.log() - p.clamp(min=DEPTH_LOG_FLOOR).log()) ** 2).sum()
        s["sum_abs_rel"] += ((p - g).abs() / g).sum()
        s["delta1"] += (torch.maximum(p / g, g / p) < 1.25).sum()  # p = 0 gives inf: not within
        s["pixels"] += valid.sum()

    def compute(self) -> dict[str, float]:
        n = int(self.state["pixels"])
        if n == 0:
            return dict.fromkeys(("rmse", "log_rmse", "abs_rel", "delta1"), math.nan)
        return {"rmse": math.sqrt(self.state["sum_sq"].item() / n),
                "log_rmse": math.sqrt(self.state["sum_sq_log"].item() / n),
                "abs_rel": self.state["sum_abs_rel"].item() / n,
                "delta1": int(self.state["delta1"]) / n * 100}


class MultiTaskMetrics:
    """One meter per task. ``update`` takes raw network outputs and dataset-convention labels.

    Predictions whose spatial size differs from the label are resized bilinearly (raw outputs, before
    activation), as the reference evaluation resizes to the label. Under torch.distributed call
    ``all_reduce()`` once, on every rank, before ``compute()``; calling it twice double-counts.
    """

    def __init__(self, tasks: Mapping[str, TaskSpec], edge_tolerance: float = EDGE_TOLERANCE) -> None:
        self.meters = {name: spec.rules.meter(spec, edge_tolerance) for name, spec in tasks.items()}

    @torch.no_grad()
    def update(self, preds: Mapping[str, torch.Tensor], targets: Mapping[str, torch.Tensor]) -> None:
        for name, meter in self.meters.items():
            if name not in preds or name not in targets:
                raise KeyError(f"metrics: task '{name}' missing from predictions or targets")
            pred, target = preds[name].detach().float(), targets[name].detach()
            if target.device != pred.device:
                target = target.to(pred.device)
            if pred.shape[-2:] != target.shape[-2:]:
                pred = F.interpolate(pred, size=target.shape[-2:], mode="bilinear", align_corners=False)
            meter.to(pred.device)
            meter.update(pred, target)

    def compute(self) -> dict[str, dict[str, float]]:
        """Metrics per task; NaN where a task saw no valid pixel."""
        return {name: meter.compute() for name, meter in self.meters.items()}

    def reset(self) -> None:
        for meter in self.meters.values():
            meter.reset()

    def all_reduce(self) -> None:
        """Sum every accumulator over processes (no-op without an initialised process group)."""
        if not (dist.is_available() and dist.is_initialized()):
            return
        # NCCL reduces CUDA tensors only; a rank that saw no batch still holds CPU zeros.
        if dist.get_backend() == "nccl":
            device = torch.device("cuda", torch.cuda.current_device())
        else:
            device = torch.device("cpu")
        for meter in self.meters.values():
            meter.to(device)
            for tensor in meter.state.values():
                dist.all_reduce(tensor, op=dist.ReduceOp.SUM)


def delta_m(results: Mapping[str, Mapping[str, float]],
            single_task: Mapping[str, Mapping[str, float]]) -> float:
    """Mean relative gain in percent over single-task baselines (Maninis et al. 2019, Vandenhende et al.).

    ``100 * mean_t [ mean_{k in single_task[t]} s_k (M_t,k - S_t,k) / S_t,k ]`` with s_k = -1 for
    metrics in ``LOWER_IS_BETTER``. Only the metrics named in ``single_task`` are compared; with one
    metric per task (the papers' use) this is the usual formula, with several each task still weighs
    1/T. Both sides must use ``compute()``'s units (mIoU in percent, depth in metres, angles in degrees);
    the ratio is unit-free otherwise, but percent vs fraction would not be.
    """
    if not single_task:
        raise ValueError("delta_m needs at least one single-task baseline")
    gains = []
    for task, baseline in single_task.items():
        if task not in results:
            raise KeyError(f"delta_m: no result for task '{task}'")
        per_metric = []
        for metric, base in baseline.items():
            if metric not in results[task]:
                raise KeyError(f"delta_m: no result for '{task}.{metric}'")
            sign = -1.0 if metric in LOWER_IS_BETTER else 1.0
            per_metric.append(sign * (results[task][metric] - base) / base)
        gains.append(sum(per_metric) / len(per_metric))
    return 100 * sum(gains) / len(gains)


class TrivialBaseline:
    """The input-blind predictor: one constant raw output per task, shaped like the model's."""

    def __init__(self, tasks: Mapping[str, TaskSpec], constants: Mapping[str, torch.Tensor]) -> None:
        self.tasks = dict(tasks)
        self.constants = dict(constants)

    def __call__(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        b, _, h, w = images.shape
        return {name: c.to(images.device)[None, :, None, None].expand(b, -1, h, w).contiguous()
                for name, c in self.constants.items()}


def trivial_baseline(tasks: Mapping[str, TaskSpec],
                     targets: Iterable[Mapping[str, torch.Tensor]]) -> TrivialBaseline:
    """Fit the trivial predictor on training targets, so the model can be shown to beat it.

    Each task kind fits its own constant (``TaskKind.baseline_output``): the class prior for label
    maps, the mean positive rate, the mean normal, the mean depth.
    """
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, torch.Tensor] = {}
    for batch in targets:
        for name, spec in tasks.items():
            s, n = spec.rules.baseline_sums(spec, batch[name].detach().cpu())
            sums[name] = sums.get(name, 0) + s
            counts[name] = counts.get(name, 0) + torch.tensor(float(n), dtype=torch.float64)
    if set(sums) != set(tasks):
        raise ValueError("trivial_baseline: no targets to fit")
    constants = {name: spec.rules.baseline_output(spec, sums[name], counts[name]).float()
                 for name, spec in tasks.items()}
    return TrivialBaseline(tasks, constants)
