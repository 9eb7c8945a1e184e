"""``leuk_ray.serve``: request checks without Ray, ``serve.yaml`` against Ray's own schema, and a real
local Ray Serve on 127.0.0.1 (slow): predict == serve, bad input gets a 4xx and the service keeps
answering, a few hundred concurrent requests each get their own answer."""
from __future__ import annotations

import asyncio
import os
import random
import shutil
import socket
import threading
from pathlib import Path

import numpy as np
import pytest
import yaml

pytest.importorskip("ray.serve")
requests = pytest.importorskip("requests")

from starlette.datastructures import Headers  # noqa: E402
from urllib3.filepost import encode_multipart_formdata  # noqa: E402

from leuk_ray.artifact import load_artifact  # noqa: E402
from leuk_ray.config import serve_config  # noqa: E402
from leuk_ray.data import read_image  # noqa: E402
from leuk_ray.errors import UserError  # noqa: E402
from leuk_ray.predict import predict_paths  # noqa: E402
from leuk_ray.serve import (Limits, RequestError, build_app, decode_uploads,  # noqa: E402
                            parse_tta, read_uploads)
from serving_helpers import cell_images, junk_uploads, make_artifact  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
LIMITS = Limits(max_files=4, max_file_bytes=200_000, max_request_bytes=400_000)


@pytest.fixture(scope="module")
def artifact(tmp_path_factory) -> Path:
    return make_artifact(tmp_path_factory.mktemp("art") / "ensemble")


@pytest.fixture(scope="module")
def cells(tmp_path_factory) -> list[Path]:
    return cell_images(tmp_path_factory)


# ------------------------------------------------------------------------------ without Ray
def _read(fields, limits: Limits = LIMITS, content_type: str | None = None,
          chunk: int = 65536, length: bool = True) -> list[tuple[str, bytes]]:
    body, ctype = encode_multipart_formdata(fields)
    headers = {"content-type": content_type or ctype}
    if length:
        headers["content-length"] = str(len(body))

    async def stream():
        for i in range(0, len(body), chunk):
            yield body[i:i + chunk]
    return asyncio.run(read_uploads(Headers(headers), stream(), limits))


def _status(fn, *a, **k) -> RequestError:
    with pytest.raises(RequestError) as e:
        fn(*a, **k)
    return e.value


def test_read_uploads_keeps_order_and_names(cells):
    files = [("files", (p.name, p.read_bytes())) for p in cells[:3]]
    got = _read(files)
    assert [n for n, _ in got] == [p.name for p in cells[:3]]
    assert [d for _, d in got] == [p.read_bytes() for p in cells[:3]]


def test_read_uploads_refuses_what_it_must(cells):
    one = cells[0].read_bytes()
    e = _status(_read, [("files", ("a.bmp", one))], content_type="application/json")
    assert e.status == 415 and "multipart/form-data" in e.message
    e = _status(_read, [("files", (f"c{i}.bmp", b"x")) for i in range(5)])
    assert e.status == 413 and "more than 4 files" in e.message
    big = b"BM" + b"\0" * 250_000
    e = _status(_read, [("files", ("ok.bmp", b"BM")), ("files", ("big.bmp", big))])
    assert e.status == 413 and "big.bmp" in e.message and "ok.bmp" not in e.message
    assert [f[0] for f in e.files] == ["big.bmp"]
    many = [("files", (f"m{i}.bmp", b"\1" * 150_000)) for i in range(3)]
    for length in (True, False):  # told up front, or counted while the body streams in
        e = _status(_read, many, length=length)
        assert e.status == 413 and "request body" in e.message
    e = _status(_read, [("image", ("a.bmp", one))])
    assert e.status == 400 and "'image'" in e.message and "'files'" in e.message
    e = _status(_read, [("files", "just text")])
    assert e.status == 400 and "not a file" in e.message
    e = _status(_read, [])
    assert e.status == 400 and "no images" in e.message
    e = _status(asyncio.run, read_uploads(
        Headers({"content-type": "multipart/form-data; boundary=zzz"}), _once(b"garbage"), LIMITS))
    assert e.status == 400 and "malformed" in e.message


async def _once(b: bytes):
    yield b


def test_decode_uploads_is_predicts_decoder_and_names_every_bad_file(artifact, cells):
    ens = load_artifact(artifact)
    prep = ens.preprocessing
    ups = [(p.name, p.read_bytes()) for p in cells[:3]]
    imgs = decode_uploads(ups, prep)
    for img, p in zip(imgs, cells[:3]):
        np.testing.assert_array_equal(img, read_image(p, prep.image_size, prep.interpolation))
    junk = junk_uploads(cells[0])
    e = _status(decode_uploads, ups[:1] + list(junk.items()), prep)
    assert e.status == 422
    assert [n for n, _ in e.files] == list(junk)
    reasons = dict(e.files)
    assert "empty upload" in reasons["empty.bmp"] and "not an image" in reasons["notes.txt"]
    assert "truncated PNG" in reasons["cut.png"] and "truncated BMP" in reasons["cut.bmp"]
    assert e.message.startswith("notes.txt: ") and "cut.bmp" in e.message


def test_parse_tta():
    assert parse_tta(None) is False and parse_tta("") is False and parse_tta("0") is False
    assert parse_tta("true") is True and parse_tta("1") is True and parse_tta("Yes") is True
    assert _status(parse_tta, "maybe").status == 400


def test_serve_yaml_is_a_valid_serve_config_for_this_app():
    from ray.serve.schema import ServeDeploySchema
    raw = yaml.safe_load((ROOT / "serve.yaml").read_text())
    schema = ServeDeploySchema.model_validate(raw)
    assert schema.http_options.host == "127.0.0.1"
    (app,) = schema.applications
    assert app.import_path == "leuk_ray.serve:build_app"
    sc = serve_config(app.args, where="serve.yaml")         # every arg is a known, valid setting
    assert sc.model and sc.gpus_per_replica > 0
    # what `serve deploy` / `serve run serve.yaml` do with the import path: Ray's own loader,
    # which refuses a builder that does not take exactly one argument
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
    built = call_user_app_builder_with_args_if_necessary(build_app, app.args)
    assert type(built).__name__ == "Application"


def test_settings_are_checked_with_the_key_named():
    with pytest.raises(UserError, match=r"serve.yaml args: unknown setting 'port'"):
        build_app({"model": "x", "port": 8000})
    with pytest.raises(UserError, match=r"max_files = 0 is out of range"):
        build_app({"model": "x", "max_files": 0})
    with pytest.raises(UserError, match=r"model is missing"):
        build_app({})


def test_cli_tampered_artifact_is_one_line_exit_2_before_ray(artifact, tmp_path):
    import subprocess
    import sys
    art = Path(shutil.copytree(artifact, tmp_path / "art"))
    (art / "fold_1.pt").unlink()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "RAY_ADDRESS": "127.0.0.1:1"}  # a cluster reachable nowhere: must not get that far
    r = subprocess.run([sys.executable, "-m", "leuk_ray.serve", "--model", str(art)], cwd=tmp_path,
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "fold_1.pt" in lines[0] and str(art) in lines[0]


@pytest.mark.slow
def test_cli_serves_on_loopback_and_stops_on_sigterm(artifact, cells, tmp_path):
    """The command line: a local Ray, the app on 127.0.0.1:<port>, one line when ready; `kill`
    (SIGTERM) shuts Serve down and exits 0. (Runs before this module's in-process Ray starts.)"""
    import os
    import signal
    import subprocess
    import sys
    import time
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen([sys.executable, "-m", "leuk_ray.serve", "--model", str(artifact),
                             "--port", str(port), "--cpus-per-replica", "1"], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()  # blocks until the service is up (or the command ended)
        assert line.startswith("serving ") and f"http://127.0.0.1:{port}" in line, \
            (line, proc.poll(), proc.stderr.read() if proc.poll() is not None else "")
        r = requests.get(f"http://127.0.0.1:{port}/healthz", timeout=30)
        assert r.status_code == 200 and r.json()["model"] == artifact.name
        r = _post(f"http://127.0.0.1:{port}", [(cells[0].name, cells[0].read_bytes())])
        assert r.status_code == 200 and len(r.json()["predictions"]) == 1
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0, proc.stderr.read()[-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    time.sleep(1)
    with pytest.raises(requests.ConnectionError):
        requests.get(f"http://127.0.0.1:{port}/healthz", timeout=5)


# ------------------------------------------------------------------- a real local Ray Serve
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def service(artifact):
    """The application on a local Ray (2 CPUs) with small limits, on 127.0.0.1:<free port>."""
    import ray
    from ray import serve
    port = _free_port()
    # ray.init() sets RAY_AUTH_MODE=token in this process's environment, which a Ray cluster a
    # later test starts from this process would inherit: put it back as it was
    saved = os.environ.get("RAY_AUTH_MODE")
    ray.init(num_cpus=2, include_dashboard=False, dashboard_host="127.0.0.1",
             log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app({"model": str(artifact), "max_files": 4, "max_file_mb": 0.2,
                             "max_request_mb": 0.4, "max_batch": 8, "batch_wait_ms": 10,
                             "cpus_per_replica": 1}), name="leuk-ray-test", route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            if saved is None:
                os.environ.pop("RAY_AUTH_MODE", None)
            else:
                os.environ["RAY_AUTH_MODE"] = saved


def _post(url: str, files: list[tuple[str, bytes]], **params) -> requests.Response:
    return requests.post(f"{url}/predict", params=params, timeout=120,
                         files=[("files", (n, d, "application/octet-stream")) for n, d in files])


@pytest.fixture(scope="module")
def expected(artifact, cells) -> dict[str, tuple[float, str]]:
    rows, skipped = predict_paths(load_artifact(artifact), cells, batch_size=16)
    assert not skipped
    return {Path(r.path).name: (r.prob_all, r.pred) for r in rows}


@pytest.mark.slow
def test_healthz(service, artifact):
    r = requests.get(f"{service}/healthz", timeout=30)
    assert r.status_code == 200
    h = r.json()
    assert h["status"] == "ok" and h["model"] == artifact.name and h["folds"] == 2
    assert h["image_size"] == 64 and h["threshold"] == pytest.approx(0.42)
    assert h["limits"] == {"max_files": 4, "max_file_bytes": int(0.2 * 2**20),
                           "max_request_bytes": int(0.4 * 2**20)}


@pytest.mark.slow
def test_serve_gives_what_predict_gives(service, artifact, cells, expected):
    sent = cells[:4][::-1]
    r = _post(service, [(p.name, p.read_bytes()) for p in sent])
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == artifact.name and body["threshold"] == pytest.approx(0.42)
    assert body["tta"] is False
    assert [p["name"] for p in body["predictions"]] == [p.name for p in sent]  # order sent
    for p in body["predictions"]:
        prob, pred = expected[p["name"]]
        assert p["prob_all"] == pytest.approx(prob, abs=1e-6) and p["pred"] == pred
    # TTA per request: predict --tta's numbers (its own calibration and threshold)
    ens = load_artifact(artifact)
    tta_rows, _ = predict_paths(ens, sent[:2], tta=True)
    r = _post(service, [(p.name, p.read_bytes()) for p in sent[:2]], tta="true")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["tta"] is True and body["threshold"] == pytest.approx(0.55)
    for got, want in zip(body["predictions"], tta_rows):
        assert got["prob_all"] == pytest.approx(want.prob_all, abs=1e-6) and got["pred"] == want.pred


@pytest.mark.slow
def test_bad_input_gets_4xx_naming_the_file_and_the_service_keeps_answering(service, cells,
                                                                             expected):
    good = (cells[1].name, cells[1].read_bytes())
    junk = junk_uploads(cells[0])
    cases = [
        ([good, ("notes.txt", junk["notes.txt"])], {}, 422, "notes.txt"),
        ([("cut.png", junk["cut.png"]), good], {}, 422, "cut.png"),
        ([("cut.bmp", junk["cut.bmp"])], {}, 422, "cut.bmp"),
        ([("empty.bmp", b""), good], {}, 422, "empty.bmp"),
        ([good] * 5, {}, 413, "more than 4 files"),
        ([("big.bmp", b"BM" + b"\0" * 250_000)], {}, 413, "big.bmp"),
        ([(f"m{i}.bmp", b"\1" * 150_000) for i in range(3)], {}, 413, "request body"),
        ([good], {"tta": "maybe"}, 400, "tta"),
    ]
    for files, params, status, named in cases:
        r = _post(service, files, **params)
        assert r.status_code == status, (named, r.status_code, r.text)
        assert named in r.json()["error"]
        ok = _post(service, [good])                      # and the next request is answered
        assert ok.status_code == 200
        assert ok.json()["predictions"][0]["prob_all"] == pytest.approx(expected[good[0]][0],
                                                                        abs=1e-6)
    r = requests.post(f"{service}/predict", data=b"{}", timeout=30,
                      headers={"content-type": "application/json"})
    assert r.status_code == 415 and "multipart/form-data" in r.json()["error"]


@pytest.mark.slow
def test_concurrent_clients_each_get_their_own_answer(service, cells, expected):
    """300 requests from 12 client threads, 1-3 images each in a random order, every 10th one
    bad: each answer holds exactly its own images' predictions, in its order."""
    data = {p.name: p.read_bytes() for p in cells}
    names = sorted(data)
    junk = junk_uploads(cells[0])
    failures: list[str] = []
    counts = {"ok": 0, "bad": 0}
    lock = threading.Lock()

    def client(seed: int) -> None:
        rng = random.Random(seed)
        with requests.Session() as s:
            for j in range(25):
                bad = (seed * 25 + j) % 10 == 0
                pick = rng.sample(names, rng.randint(1, 3))
                files = [(n, data[n]) for n in pick]
                if bad:
                    files.insert(rng.randrange(len(files) + 1), ("notes.txt", junk["notes.txt"]))
                r = s.post(f"{service}/predict", timeout=300,
                           files=[("files", (n, d, "application/octet-stream")) for n, d in files])
                try:
                    if bad:
                        assert r.status_code == 422 and "notes.txt" in r.json()["error"]
                    else:
                        assert r.status_code == 200, r.text
                        preds = r.json()["predictions"]
                        assert [p["name"] for p in preds] == pick
                        for p in preds:
                            prob, pred = expected[p["name"]]
                            assert abs(p["prob_all"] - prob) <= 1e-6 and p["pred"] == pred
                except AssertionError as e:
                    with lock:
                        failures.append(f"client {seed} request {j}: {e}")
                with lock:
                    counts["bad" if bad else "ok"] += 1

    threads = [threading.Thread(target=client, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert not any(t.is_alive() for t in threads)
    assert not failures, failures[:5]
    assert counts == {"ok": 270, "bad": 30}
    h = requests.get(f"{service}/healthz", timeout=30).json()  # @serve.batch gathered images of
    assert h["images_predicted"] > 1.5 * h["forward_passes"], h   # several requests per pass
