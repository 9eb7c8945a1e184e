"""``python -m leuk_ray.serve --model ARTIFACT_DIR [--port 8000] [--replicas N] [--gpus-per-replica G]``

Serves an ensemble artifact over HTTP with Ray Serve (a local Ray, or ``--address`` for a cluster;
``serve.yaml`` deploys the same application with ``serve deploy``). The HTTP proxy binds
127.0.0.1 unless ``--host`` says otherwise; there is no authentication, so keep it there (or
behind an SSH tunnel or a gateway).

    POST /predict[?tta=true]   multipart/form-data, one or more images in field ``files``
        200 {"model": ..., "threshold": ..., "tta": false,
             "predictions": [{"name": ..., "prob_all": ..., "pred": "all"|"hem"}, ...]}
             in the order sent
        4xx {"error": "<one line naming the file(s)>", "files": [{"name": ..., "error": ...}]}
    GET /healthz               200 {"status": "ok", "model": ..., "folds": ..., ...}

Every upload is decoded and resized by ``leuk_ray.data.decode.decode_resized`` (what predict's
``read_image`` does with a file's bytes) and predicted by ``leuk_ray.predict.predict_images``
(normalisation on the device, fold models, per-fold temperature, mean, threshold): the same image
gets the same ``prob_all`` as from ``python -m leuk_ray.predict``. Images from concurrent requests
are gathered into one forward pass by ``@serve.batch`` (``max_batch`` images, 64 on a GPU, 16 on
CPU, waiting at most ``batch_wait_ms``); the forward runs in a thread of its own, so the replica
keeps reading and decoding other requests meanwhile.

A bad request gets a 4xx JSON answer and touches nothing else: 415 not multipart; 413 more than
``max_files`` files, a file over ``max_file_mb`` or a body over ``max_request_mb`` (each named);
422 an upload that is empty or cannot be decoded (every such file named, none predicted); 400 a
malformed body, an unknown form field, no files, or ``tta`` that is not true/false (or TTA asked of
an artifact built without it). The artifact's checksums are verified before Ray starts (by the
command line) and again by every replica as it loads the artifact.
"""
# No ``from __future__ import annotations`` here: FastAPI reads the endpoints' annotations (the
# ``Request`` parameter) at run time, and Serve's ingress re-creates the methods elsewhere.
import argparse
import asyncio
import hashlib
import signal
import sys
import time
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import ray
from fastapi import FastAPI
from ray import serve
from starlette.datastructures import Headers, UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import Request
from starlette.responses import JSONResponse

from leuk_ray.artifact import MANIFEST, Ensemble, load_artifact, read_manifest
from leuk_ray.cli import check_port_free, run_main
from leuk_ray.cluster import connect
from leuk_ray.config import ServeConfig, serve_config
from leuk_ray.data.decode import decode_resized
from leuk_ray.data.transforms import Preprocessing
from leuk_ray.errors import UserError
from leuk_ray.predict import Prediction, predict_images

APP_NAME = "leuk-ray"
DEPLOYMENT = "EnsembleService"
FIELD = "files"
MIB = 1 << 20
GPU_BATCH, CPU_BATCH = 64, 16     # images per forward pass when ServeConfig.max_batch is 0
MAX_TEXT_FIELDS = 16              # non-file form fields tolerated by the parser (then refused)
TRUE, FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off", "")


# ------------------------------------------------------------------------ request checks (no Ray)
class RequestError(Exception):
    """A bad request: its HTTP status and a one-line message naming what to fix."""

    def __init__(self, status: int, message: str,
                 files: Sequence[tuple[str, str]] = ()) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.files = list(files)

    def response(self) -> JSONResponse:
        body: dict[str, Any] = {"error": self.message}
        if self.files:
            body["files"] = [{"name": n, "error": why} for n, why in self.files]
        return JSONResponse(body, status_code=self.status)


@dataclass(frozen=True)
class Limits:
    """What one request may hold (from ``ServeConfig``)."""

    max_files: int
    max_file_bytes: int
    max_request_bytes: int

    @classmethod
    def of(cls, sc: ServeConfig) -> "Limits":
        return cls(sc.max_files, int(sc.max_file_mb * MIB), int(sc.max_request_mb * MIB))


def parse_tta(value: str | None) -> bool:
    """The ``tta`` query parameter: true/false (1/0, yes/no, on/off); absent is false."""
    v = (value or "").strip().lower()
    if v in TRUE:
        return True
    if v in FALSE:
        return False
    raise RequestError(400, f"tta={value!r}: use tta=true or tta=false")


def batch_size(sc: ServeConfig, on_gpu: bool) -> int:
    """Images per forward pass: ``max_batch``, or 64 on a GPU and 16 on CPU when it is 0."""
    return sc.max_batch or (GPU_BATCH if on_gpu else CPU_BATCH)


async def _bounded(stream: AsyncIterator[bytes], limit: int) -> AsyncIterator[bytes]:
    n = 0
    async for chunk in stream:
        n += len(chunk)
        if n > limit:
            raise RequestError(413, f"request body over {limit} bytes (the limit, max_request_mb "
                                    f"= {limit / MIB:g}): send fewer or smaller images per request")
        yield chunk


async def read_uploads(headers: Headers, stream: AsyncIterator[bytes],
                       limits: Limits) -> list[tuple[str, bytes]]:
    """[(file name, bytes)] of the multipart field ``files``, in the order sent; a RequestError
    for anything else (see the module docstring)."""
    ctype = headers.get("content-type", "")
    if not ctype.lower().startswith("multipart/form-data"):
        raise RequestError(415, f"content type {ctype or 'none'!r}: send multipart/form-data with "
                                f"the images in field '{FIELD}' (curl -F {FIELD}=@cell.bmp)")
    length = headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limits.max_request_bytes:
        raise RequestError(413, f"request body of {length} bytes is over the limit of "
                                f"{limits.max_request_bytes} (max_request_mb = "
                                f"{limits.max_request_bytes / MIB:g}): send fewer or smaller "
                                "images per request")
    parser = MultiPartParser(headers, _bounded(stream, limits.max_request_bytes),
                             max_files=limits.max_files, max_fields=MAX_TEXT_FIELDS)
    try:
        form = await parser.parse()
    except MultiPartException as e:
        if e.message.startswith("Too many files"):
            raise RequestError(413, f"more than {limits.max_files} files in one request (the "
                                    "limit, max_files): split them over several requests") from None
        raise RequestError(400, f"malformed multipart body ({e.message})") from None
    uploads: list[tuple[str, bytes]] = []
    too_big: list[tuple[str, str]] = []
    try:
        for key, value in form.multi_items():
            if key != FIELD:
                raise RequestError(400, f"unknown form field {key!r}: send the images in field "
                                        f"'{FIELD}' (and tta as a query parameter: ?tta=true)")
            if not isinstance(value, UploadFile):
                raise RequestError(400, f"field '{FIELD}' holds text ({value[:40]!r}), not a "
                                        "file: upload each image as a file (curl -F "
                                        f"{FIELD}=@cell.bmp)")
            name = value.filename or f"{FIELD}[{len(uploads)}]"
            data = await value.read()
            if len(data) > limits.max_file_bytes:
                too_big.append((name, f"{len(data)} bytes, over the limit of "
                                      f"{limits.max_file_bytes}"))
            uploads.append((name, data))
    finally:
        await form.close()
    if too_big:
        raise RequestError(413, f"{_names(too_big)}: over the limit of {limits.max_file_bytes} "
                                f"bytes per image (max_file_mb = "
                                f"{limits.max_file_bytes / MIB:g})", too_big)
    if not uploads:
        raise RequestError(400, f"no images: send one or more image files in multipart field "
                                f"'{FIELD}'")
    return uploads


def _names(files: Sequence[tuple[str, str]]) -> str:
    shown = ", ".join(n for n, _ in files[:5])
    return shown + (f" and {len(files) - 5} more" if len(files) > 5 else "")


def decode_uploads(uploads: Sequence[tuple[str, bytes]], prep: Preprocessing) -> np.ndarray:
    """(n, size, size, 3) uint8 images decoded and resized as ``prep`` says (the decoder predict
    uses); a 422 RequestError naming every upload that is empty or cannot be decoded."""
    size = prep.image_size
    images = np.empty((len(uploads), size, size, 3), dtype=np.uint8)
    bad: list[tuple[str, str]] = []
    for i, (name, data) in enumerate(uploads):
        img, why = decode_resized(np.frombuffer(data, dtype=np.uint8), size, prep.interpolation)
        if img is None:
            bad.append((name, "empty upload (0 bytes)" if not data else
                        f"cannot decode image ({why})"))
        else:
            images[i] = img
    if bad:
        first = f"{bad[0][0]}: {bad[0][1]}"
        more = f" (and {len(bad) - 1} more: {_names(bad[1:])})" if len(bad) > 1 else ""
        raise RequestError(422, f"{first}{more}; send cell images (BMP, PNG, JPEG, TIFF) - "
                                "nothing in this request was predicted", bad)
    return images


def model_info(ensemble: Ensemble) -> dict[str, Any]:
    """What /healthz and every answer say about the model."""
    art = ensemble.path
    digest = hashlib.sha256((art / MANIFEST).read_bytes()).hexdigest() if art else ""
    return {"model": art.name if art else "", "manifest_sha256": digest,
            "backbone": ensemble.cfg.model.backbone, "folds": len(ensemble.models),
            "image_size": ensemble.image_size, "class_names": list(ensemble.class_names),
            "threshold": ensemble.threshold, "tta_available": ensemble.tta_calibration is not None,
            "device": str(ensemble.device)}


# ------------------------------------------------------------------------------ the deployment
api = FastAPI(title="leuk-ray", description="ALL vs HEM cell classifier (a leuk-ray ensemble)")


@serve.deployment(name=DEPLOYMENT)
@serve.ingress(api)
class EnsembleService:
    """One replica: the whole ensemble on its device, requests batched across clients."""

    def __init__(self, settings: dict[str, Any]) -> None:
        import torch
        sc = serve_config(settings)
        torch.set_num_threads(max(1, int(sc.cpus_per_replica)))
        # load_artifact verifies the manifest and every checksum before unpickling anything
        self.ensemble = load_artifact(sc.model, device="cuda" if sc.gpus_per_replica > 0 else "cpu")
        self.limits = Limits.of(sc)
        self.batch = batch_size(sc, self.ensemble.device.type == "cuda")
        self.info = {**model_info(self.ensemble), "max_batch": self.batch,
                     "limits": asdict(self.limits)}
        self._forward = ThreadPoolExecutor(1, thread_name_prefix="leuk-ray-forward")
        self.stats = {"forward_passes": 0, "images_predicted": 0}  # since the replica started
        self._infer.set_max_batch_size(self.batch)
        self._infer.set_batch_wait_timeout_s(sc.batch_wait_ms / 1000.0)

    @api.get("/healthz")
    async def healthz(self) -> dict[str, Any]:
        return {"status": "ok", **self.info, **self.stats}

    @api.post("/predict")
    async def predict(self, request: Request) -> JSONResponse:
        try:
            tta = parse_tta(request.query_params.get("tta"))
            if tta and self.ensemble.tta_calibration is None:
                raise RequestError(400, "tta=true: this ensemble was built without a TTA "
                                        "calibration (final.tta = false); ask without tta")
            uploads = await read_uploads(request.headers, request.stream(), self.limits)
            images = await asyncio.to_thread(decode_uploads, uploads, self.ensemble.preprocessing)
        except RequestError as e:
            return e.response()
        try:
            rows = await asyncio.gather(*(self._infer((img, tta)) for img in images))
        except Exception as e:  # the replica stays up; the client learns what happened
            return JSONResponse({"error": f"inference failed ({type(e).__name__}: {e})"},
                                status_code=500)
        return JSONResponse({
            "model": self.info["model"],
            "threshold": self.ensemble.calibration_for(tta).threshold,
            "tta": tta,
            "predictions": [{"name": name, "prob_all": r.prob_all, "pred": r.pred}
                            for (name, _), r in zip(uploads, rows)],
        })

    @serve.batch(max_batch_size=CPU_BATCH, batch_wait_timeout_s=0.005)
    async def _infer(self, items: list[tuple[np.ndarray, bool]]) -> list[Prediction]:
        """One forward pass over the images of every request waiting (per TTA setting)."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._forward, self._forward_pass, items)

    def _forward_pass(self, items: list[tuple[np.ndarray, bool]]) -> list[Prediction]:
        out: list[Prediction | None] = [None] * len(items)
        for tta in (False, True):
            idx = [i for i, (_, t) in enumerate(items) if t == tta]
            if idx:
                rows = predict_images(self.ensemble, [str(i) for i in idx],
                                      np.stack([items[i][0] for i in idx]), tta=tta,
                                      batch_size=len(idx))
                for i, r in zip(idx, rows):
                    out[i] = r
                self.stats["forward_passes"] += 1
                self.stats["images_predicted"] += len(idx)
        return out  # type: ignore[return-value]


def build_app(args: dict[str, Any]) -> serve.Application:
    """The Serve application for a ``ServeConfig`` mapping: what ``serve.yaml``'s
    ``import_path: leuk_ray.serve:build_app`` builds with its ``args``. Ray Serve calls an
    application builder with exactly one argument, so the command line goes through
    ``_build_app`` to name where its settings came from."""
    return _build_app(args, where="serve.yaml args")


def _build_app(args: dict[str, Any] | None, *, where: str) -> serve.Application:
    sc = serve_config(args, where=where)
    actor: dict[str, Any] = {"num_cpus": sc.cpus_per_replica}
    if sc.gpus_per_replica > 0:
        actor["num_gpus"] = sc.gpus_per_replica
    return EnsembleService.options(
        num_replicas=sc.replicas, ray_actor_options=actor,
        max_ongoing_requests=sc.max_ongoing_requests).bind(asdict(sc))


# ---------------------------------------------------------------------------------- command line
FLAGS = {f: "--" + f.replace("_", "-") for f in ServeConfig.__dataclass_fields__}


def build_parser() -> argparse.ArgumentParser:
    d = ServeConfig()
    p = argparse.ArgumentParser(
        prog="python -m leuk_ray.serve", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Serve an ensemble artifact over HTTP with Ray Serve: POST /predict "
                    "(multipart field 'files', ?tta=true for TTA), GET /healthz.")
    p.add_argument("--model", required=True, metavar="ARTIFACT_DIR",
                   help="ensemble artifact directory written by leuk_ray.final")
    p.add_argument("--host", default="127.0.0.1",
                   help="address the HTTP proxy binds; anything but loopback exposes an "
                        "unauthenticated service")
    p.add_argument("--port", type=int, default=8000, help="HTTP port")
    p.add_argument("--address", default=None,
                   help="Ray cluster to join (default: RAY_ADDRESS, else a local Ray)")
    p.add_argument("--replicas", type=int, default=d.replicas, help="model replicas")
    p.add_argument("--gpus-per-replica", type=float, default=d.gpus_per_replica,
                   help="GPU share per replica (0 = CPU; 0.5 = two replicas per GPU)")
    p.add_argument("--cpus-per-replica", type=float, default=d.cpus_per_replica,
                   help="CPUs per replica (its torch threads)")
    p.add_argument("--max-batch", type=int, default=d.max_batch,
                   help=f"images per forward pass across requests (0 = {GPU_BATCH} on a GPU, "
                        f"{CPU_BATCH} on CPU)")
    p.add_argument("--batch-wait-ms", type=float, default=d.batch_wait_ms,
                   help="how long a forward pass waits for more images")
    p.add_argument("--max-ongoing-requests", type=int, default=d.max_ongoing_requests,
                   help="requests a replica holds at once")
    p.add_argument("--max-files", type=int, default=d.max_files, help="images per request")
    p.add_argument("--max-file-mb", type=float, default=d.max_file_mb, help="MiB per image")
    p.add_argument("--max-request-mb", type=float, default=d.max_request_mb,
                   help="MiB per request body")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    sc = serve_config({k: getattr(args, k) for k in FLAGS}, where="command line", names=FLAGS)
    sc.model = str(Path(sc.model).expanduser().absolute())
    read_manifest(sc.model)  # checksums and format, before Ray starts (each replica checks again)
    joined = bool(args.address)
    if not joined:
        check_port_free(args.host, args.port)
    connect(args.address)
    gpus = ray.cluster_resources().get("GPU", 0.0)
    need = sc.gpus_per_replica * sc.replicas
    if need > gpus + 1e-9:
        msg = (f"--gpus-per-replica {sc.gpus_per_replica:g} x --replicas {sc.replicas} needs "
               f"{need:g} GPU(s); the cluster has {gpus:g} now")
        if not joined:
            raise UserError(f"{msg}: use --gpus-per-replica 0 (CPU) or fewer replicas")
        print(f"warning: {msg}; replicas wait until the autoscaler adds GPU nodes",
              file=sys.stderr)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: --host {args.host}: the service has no authentication; anyone who can "
              "reach this address can use it", file=sys.stderr)
    serve.start(http_options={"host": args.host, "port": args.port})
    t0 = time.perf_counter()
    serve.run(_build_app(asdict(sc), where="command line"), name=APP_NAME, route_prefix="/")
    print(f"serving {sc.model} ({sc.replicas} replica(s), ready in "
          f"{time.perf_counter() - t0:.0f} s) on http://{args.host}:{args.port}: POST /predict "
          f"(multipart field '{FIELD}'), GET /healthz; Ctrl-C stops it", flush=True)
    def stop(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)  # `kill` stops it as Ctrl-C does
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("stopping", file=sys.stderr, flush=True)
        if joined:
            serve.delete(APP_NAME)
        else:
            serve.shutdown()
    return 0


if __name__ == "__main__":
    run_main(main)
