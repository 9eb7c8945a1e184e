"""Does ImageNet pretraining help at this size? ``lite0`` pretrained vs the same from scratch.

Runs ``python -m leuk_ray.final --preset lite0`` twice on the real C-NMC sample: once as the preset
is (tf_efficientnet_lite0 with the packaged ImageNet weights) and once with ``model.pretrained=false``
(random init), everything else equal: the same subject-grouped folds (same data, same
``data.seed``), the same epoch budget, early stopping and calibration. Prints per-fold validation
F1, the out-of-fold and held-out test scores side by side.

    python bench/pretrained_vs_scratch.py [--out /tmp/pvs] [--set KEY=VALUE ...]
Last line: test F1 of the ensemble, pretrained / scratch (and the out-of-fold F1 difference).
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from _common import DATA, PY, run


def fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.4f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--out", default=None, help="where both artifacts go (default: a temp dir)")
    ap.add_argument("--set", dest="overrides", action="append", default=[],
                    help="extra config override applied to BOTH runs")
    a = ap.parse_args()
    if not DATA.is_dir():
        raise SystemExit(f"{DATA}: the real C-NMC sample is needed")
    out = Path(a.out or tempfile.mkdtemp(prefix="pvs_"))
    out.mkdir(parents=True, exist_ok=True)
    extra = [x for o in a.overrides for x in ("--set", o)]
    runs = {"pretrained": [],
            "scratch": ["--set", "model.pretrained=false", "--set", "model.pretrained_path="]}
    metrics, walls = {}, {}
    for name, sets in runs.items():
        dest = out / name
        cmd = [PY, "-m", "leuk_ray.final", "--preset", "lite0", "--data", str(DATA),
               "--out", str(dest), *sets, *extra]
        print("running:", " ".join(cmd), flush=True)
        walls[name] = run(cmd, log=out / f"{name}.log")
        metrics[name] = json.loads((dest / "metrics.json").read_text())
        print(f"  {name}: {walls[name]:.0f} s", flush=True)

    def get(m: dict, *keys):
        for k in keys:
            if not isinstance(m, dict) or k not in m:
                return None
            m = m[k]
        return m

    rows = []
    k = max(len(m["folds"]) for m in metrics.values())
    for i in range(k):
        rows.append((f"fold {i} validation F1 (best epoch)",
                     [get(m, "folds")[i]["val_f1"] for m in metrics.values()]))
        rows.append((f"fold {i} best epoch / epochs run",
                     [f"{get(m, 'folds')[i]['best_epoch']}/{get(m, 'folds')[i]['epochs']}"
                      for m in metrics.values()]))
    for key in ("f1", "accuracy", "auc"):
        rows.append((f"out-of-fold {key}", [get(m, "oof", key) for m in metrics.values()]))
    for key in ("f1", "accuracy", "auc", "sensitivity", "specificity"):
        rows.append((f"test ensemble {key}", [get(m, "test", "ensemble", key)
                                              for m in metrics.values()]))
    rows.append(("wall time, s", [walls[n] for n in metrics]))
    print(f"\n| | {' | '.join(metrics)} |\n|---|---|---|")
    for label, vals in rows:
        print(f"| {label} | " + " | ".join(v if isinstance(v, str) else fmt(v) for v in vals) + " |")
    p, s = metrics["pretrained"], metrics["scratch"]
    tf_p, tf_s = get(p, "test", "ensemble", "f1"), get(s, "test", "ensemble", "f1")
    d_oof = get(p, "oof", "f1") - get(s, "oof", "f1")
    print(f"artifacts: {out}/pretrained, {out}/scratch")
    print(f"test ensemble F1 pretrained {fmt(tf_p)} / scratch {fmt(tf_s)} = "
          f"{tf_p / tf_s:.3f}x; out-of-fold F1 difference {d_oof:+.4f}")


if __name__ == "__main__":
    main()
