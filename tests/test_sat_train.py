"""End-to-end: one digits epoch of quantizer=sat/pact/dorefa with each switch trains without NaN."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch

from qrepro.train import compose, train

FAST = [
    "dataset=digits",
    "model=small_cnn",
    "model.width=8",
    "logger=none",
    "trainer.progress=false",
    "trainer.batch_size=128",
    "trainer.log_every=5",
    "trainer.device=cpu",
    "+dataset.image_size=16",
    "optimizer.lr=0.05",
    "optimizer.nesterov=true",
    "optimizer.weight_decay=4.0e-5",
    "+optimizer.groups=[{tags:[norm,bias,depthwise,act_clip],weight_decay:0.0}]",
]


def _run(tmp_path, extra: list[str], sub: str, epochs: int = 1):
    overrides = [*FAST, f"trainer.epochs={epochs}", *extra]
    cfg = compose(overrides)
    res = train(cfg, run_dir=tmp_path / sub, experiment="unit_sat", overrides=extra)
    rec = json.loads(res.record_path.read_text())
    assert rec["complete"] is True
    for k in ("train_loss", "test_loss"):
        assert all(math.isfinite(v) for v in rec["curves"][k]), (extra, k)
    return res, rec


SWITCHES = [
    ["quantizer=sat", "precision=w4a4", "quantizer.diagnostics=true", "dataset.raw255=true"],
    [
        "quantizer=sat",
        "precision=w2a2",
        "quantizer.scheme=modified",
        "quantizer.rescale=all",
        "quantizer.rescale_method=std",
        "quantizer.first_last=same",
    ],
    ["quantizer=sat", "precision=w3a3", "quantizer.scheme=centered", "quantizer.cg=false", "quantizer.signed_act=true"],
    ["quantizer=sat", "precision=w2a32", "quantizer.rescale=no_bn"],
    ["quantizer=sat", "precision=w1a1"],
    ["quantizer=pact", "precision=w4a4", "quantizer.rescale=last"],
    ["quantizer=dorefa", "precision=w8a8", "quantizer.signed_act=false"],
]


@pytest.mark.parametrize("extra", SWITCHES, ids=["_".join(e[:1] + [x.split("=")[-1] for x in e[1:]]) for e in SWITCHES])
def test_digits_epoch_without_nan(tmp_path, extra):
    torch.set_num_threads(1)
    _, rec = _run(tmp_path, extra, "run")
    if "quantizer.diagnostics=true" in extra:
        assert math.isfinite(rec["curves"]["sat_kappa0"][0])
        assert math.isfinite(rec["curves"]["sat_kappa1_median"][0])


def test_fp_to_quantized_chain(tmp_path):
    """The paper's protocol: the clamped FP model (sat, w32a32) initialises the quantized one; quantizer
    state absent from the FP checkpoint keeps its initial value (alpha = 8 convs / 10 last FC)."""
    torch.set_num_threads(1)
    fp, _ = _run(tmp_path, ["quantizer=sat", "precision=w32a32"], "fp")
    ckpt = fp.record_path.parent / "checkpoints" / "last.pt"
    # lr 1e-30: far below the float32 spacing of the weights (lr must be > 0), so the loaded weights stay exact
    q, _ = _run(tmp_path, ["quantizer=sat", "precision=w4a4", f"init_from={ckpt}", "optimizer.lr=1e-30"], "q")
    sd_fp = torch.load(ckpt, map_location="cpu", weights_only=False)["model"]
    sd_q = torch.load(q.record_path.parent / "checkpoints" / "last.pt", map_location="cpu", weights_only=False)["model"]
    for k, v in sd_fp.items():
        if k.endswith("weight") and v.dim() > 1:
            assert torch.equal(sd_q[k], v), k  # FP weights loaded (lr 1e-30 keeps them)
    alphas = {k: float(v) for k, v in sd_q.items() if k.endswith("aq.alpha")}
    assert alphas == {"features.4.aq.alpha": 8.0, "features.8.aq.alpha": 8.0, "fc.aq.alpha": 10.0}


def _group_choices(root, text: str) -> dict:
    """The group choices a config file's defaults list makes: its included recipes' first, then its own."""
    picks = {}
    for inc in re.findall(r"^  - /((?:recipe|experiment)/\S+)$", text, re.M):
        picks.update(_group_choices(root, (root / f"{inc}.yaml").read_text()))
    picks.update(re.findall(r"override /(\w+): (\S+)", text))
    return picks


def test_sat_tables_match_their_experiments():
    """Every SAT table cell names an existing experiment whose model / precision / dataset agree with it."""
    import re
    from pathlib import Path

    import yaml

    from qrepro.tables.schema import derive_sources

    root = Path(__file__).resolve().parents[1] / "configs"
    tables = sorted((root / "table").glob("sat_*.yaml"))
    assert len(tables) >= 5
    for tp in tables:
        t = yaml.safe_load(tp.read_text())
        t["cells"] = derive_sources(t["cells"])  # init_from_cell from the experiments' init_from_experiment
        assert t["paper"] == "SAT" and t["name"] == tp.stem
        ids = {c["id"] for c in t["cells"]}
        for c in t["cells"]:
            if c.get("why") or c.get("method") not in ("SAT", "FP", "PACT", "PACT+CG", "PACT+SAT", None):
                continue  # paper-only rows, and the other compared methods' rows (their own recipes and sources)
            ep = root / "experiment" / f"{c['experiment']}.yaml"
            assert ep.exists(), (tp.name, c["id"])
            text = ep.read_text()
            picks = _group_choices(root, text)
            assert picks["model"] == c["model"] and picks["dataset"] == c["dataset"], (tp.name, c["id"])
            wb, ab = re.fullmatch(r"w(\d+)a(\d+)", picks["precision"]).groups()
            assert (int(wb), int(ab)) == (c["w_bits"], c["a_bits"]), (tp.name, c["id"])
            assert c.get("init_from_cell") in ids | {None} and c.get("fp_cell") in ids | {None}
            if c["w_bits"] < 32 and c["experiment"].startswith("sat_"):  # SAT's protocol (PACT as published: scratch)
                assert c.get("init_from_cell"), f"{c['id']}: quantized cells start from an FP cell"
