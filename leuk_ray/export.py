"""``python -m leuk_ray.export --model ARTIFACT_DIR --out model.onnx``: the ensemble as one ONNX graph.

The graph holds everything after the resize, so nothing else is needed to deploy it::

    images  uint8 (N, S, S, 3) RGB, S = the artifact's image size, N dynamic
      -> (x / 255 - mean) / std per channel      the artifact's preprocessing (to_model_input)
      -> fold model i -> P(ALL) = softmax(logits)[:, 1]
      -> sigmoid(logit(P) / T_i)                 fold i's temperature (Calibration.combine)
      -> mean over folds
    prob_all  float32 (N,): the ensemble's P(ALL); ALL when >= the threshold in the metadata

Resizing stays outside: a caller brings each cell image to S x S first, with the interpolation
named in the metadata (OpenCV's, as ``leuk_ray.data.decode`` does; another library's resize of the
same name differs by a little). The graph has no TTA (its output matches ``predict`` without
``--tta``). Metadata (``metadata_props``): threshold, class_names, image_size, input, interpolation,
mean, std, temperatures, backbone, folds, manifest_sha256, leuk_ray version.

The fold models run in float32 (the CPU path of predict); ``--verify`` (on by default) runs the
file with ONNX Runtime on a few random images and compares it with ``predict_images``.
Exported with torch's TorchScript-based exporter (``dynamo=False``, opset 17), which needs no
package beyond ``onnx``.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from leuk_ray.artifact import MANIFEST, Ensemble, leuk_ray_version, load_artifact
from leuk_ray.atomic import replacing
from leuk_ray.calibration import EPS, Calibration
from leuk_ray.cli import run_main
from leuk_ray.data.transforms import Preprocessing, to_model_input
from leuk_ray.errors import UserError

OPSET = 17
INPUT, OUTPUT = "images", "prob_all"
TOLERANCE = 1e-4  # |ONNX Runtime - predict| allowed by --verify


def _need(module: str):
    try:
        return __import__(module)
    except ImportError:
        raise UserError(f"{module} is not installed: pip install 'leuk-ray[export]'") from None


class CalibratedMean(nn.Module):
    """(k, N) fold P(ALL) -> (N,) ensemble P(ALL): ``Calibration.combine`` as graph operations
    (each fold's P clipped to [EPS, 1 - EPS], its logit divided by the fold's temperature, the
    sigmoid, the mean over folds; a temperature of exactly 1 leaves P unchanged, as
    ``apply_temperature`` does)."""

    def __init__(self, calibration: Calibration) -> None:
        super().__init__()
        self.temperatures = tuple(float(T) for T in calibration.temperatures)

    def forward(self, per_fold: torch.Tensor) -> torch.Tensor:
        out = []
        for i, T in enumerate(self.temperatures):
            p = per_fold[i]
            if T != 1.0:
                p = p.clamp(EPS, 1.0 - EPS)
                p = torch.sigmoid((torch.log(p) - torch.log1p(-p)) / T)
            out.append(p)
        return torch.stack(out).mean(dim=0)


class EnsembleGraph(nn.Module):
    """uint8 NHWC RGB images at the artifact's size -> the ensemble's calibrated P(ALL)."""

    def __init__(self, ensemble: Ensemble) -> None:
        super().__init__()
        self.prep: Preprocessing = ensemble.preprocessing
        self.folds = nn.ModuleList(ensemble.models)
        self.combine = CalibratedMean(ensemble.calibration_for(False))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = to_model_input(images, images.device, prep=self.prep)
        per_fold = torch.stack([torch.softmax(m(x).float(), dim=1)[:, 1] for m in self.folds])
        return self.combine(per_fold)


def metadata(ensemble: Ensemble) -> dict[str, str]:
    """The graph's metadata_props (strings; lists and numbers as JSON)."""
    prep, cal = ensemble.preprocessing, ensemble.calibration_for(False)
    art = ensemble.path
    digest = hashlib.sha256((art / MANIFEST).read_bytes()).hexdigest() if art else ""
    return {
        "threshold": repr(float(cal.threshold)),
        "class_names": json.dumps(list(ensemble.class_names)),
        "positive_class": ensemble.class_names[1],
        "image_size": str(prep.image_size),
        "input": f"uint8 RGB NHWC (N, {prep.image_size}, {prep.image_size}, 3), already resized",
        "output": "P(ALL) per image: ALL when >= threshold",
        "interpolation": prep.interpolation,
        "mean": json.dumps(list(prep.mean)),
        "std": json.dumps(list(prep.std)),
        "temperatures": json.dumps(list(cal.temperatures)),
        "tta": "not included",
        "backbone": ensemble.cfg.model.backbone,
        "folds": str(len(ensemble.models)),
        "manifest_sha256": digest,
        "leuk_ray_version": leuk_ray_version(),
    }


def export_onnx(ensemble: Ensemble, out: str | Path) -> Path:
    """Write ``ensemble`` (moved to the CPU, float32) as one ONNX graph to ``out`` (atomically)."""
    onnx = _need("onnx")
    ensemble.to("cpu")
    graph = EnsembleGraph(ensemble).eval()
    size = ensemble.image_size
    example = torch.zeros((2, size, size, 3), dtype=torch.uint8)
    p = Path(out).expanduser().absolute()
    with replacing(p) as tmp:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript-based exporter
            warnings.simplefilter("ignore", torch.jit.TracerWarning)  # constants: as intended
            torch.onnx.export(graph, (example,), str(tmp), dynamo=False, opset_version=OPSET,
                              input_names=[INPUT], output_names=[OUTPUT],
                              dynamic_axes={INPUT: {0: "batch"}, OUTPUT: {0: "batch"}},
                              do_constant_folding=True)
        model = onnx.load(str(tmp))
        onnx.helper.set_model_props(model, metadata(ensemble))
        model.doc_string = ("leuk-ray ensemble: uint8 RGB NHWC images -> P(ALL); normalisation, "
                            "fold models, per-fold temperature and mean inside")
        onnx.checker.check_model(model)
        onnx.save(model, str(tmp))
    return p


def run_onnx(path: str | Path, images: np.ndarray, threads: int = 0) -> np.ndarray:
    """P(ALL) of uint8 NHWC ``images`` from the ONNX file, with ONNX Runtime on the CPU."""
    ort = _need("onnxruntime")
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return sess.run([OUTPUT], {INPUT: np.ascontiguousarray(images, dtype=np.uint8)})[0]


def verify(path: str | Path, ensemble: Ensemble, images: np.ndarray | None = None,
           n: int = 4, seed: int = 0) -> float:
    """Largest |ONNX Runtime - predict_images| over ``images`` (default: ``n`` random ones)."""
    from leuk_ray.predict import predict_images
    if images is None:
        s = ensemble.image_size
        images = np.random.default_rng(seed).integers(0, 256, (n, s, s, 3), dtype=np.uint8)
    want = [r.prob_all for r in predict_images(ensemble, [str(i) for i in range(len(images))],
                                               images, device="cpu")]
    got = run_onnx(path, images)
    return float(np.max(np.abs(np.asarray(got, dtype=np.float64) - want)))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m leuk_ray.export", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Write an ensemble artifact as one ONNX graph: uint8 RGB NHWC images at the "
                    "artifact's size in, P(ALL) out (normalisation, fold models, per-fold "
                    "temperature and mean inside; threshold and class names in the metadata).")
    p.add_argument("--model", required=True, metavar="ARTIFACT_DIR",
                   help="ensemble artifact directory written by leuk_ray.final")
    p.add_argument("--out", default="model.onnx", metavar="ONNX", help="output file")
    p.add_argument("--no-verify", dest="verify", action="store_false",
                   help="skip the ONNX Runtime check against predict on random images")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _need("onnx")
    if args.verify:
        _need("onnxruntime")
    t0 = time.perf_counter()
    ensemble = load_artifact(args.model, device="cpu")  # verifies checksums first
    out = export_onnx(ensemble, args.out)
    note = ""
    if args.verify:
        diff = verify(out, ensemble)
        if not (math.isfinite(diff) and diff <= TOLERANCE):
            raise UserError(f"{out}: ONNX Runtime differs from predict by {diff:.2e} (more than "
                            f"{TOLERANCE:g}); do not deploy it, and report this with the artifact")
        note = f"; ONNX Runtime matches predict within {diff:.1e}"
    print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB, {len(ensemble.models)} fold "
          f"models, input uint8 (N, {ensemble.image_size}, {ensemble.image_size}, 3), threshold "
          f"{ensemble.threshold:.4f}) in {time.perf_counter() - t0:.0f} s{note}")
    return 0


if __name__ == "__main__":
    run_main(main)
