"""Every key of ``qrepro.config.NON_SEMANTIC_KEYS`` is left out of run names, record overrides and identities because
it never changes what a run computes. Here each one that a CPU can vary is varied on a tiny digits run (one epoch,
a width-2 CNN) and the final weights and metrics are compared with one shared baseline run: equal bit for bit,
or within float rounding where the key legitimately changes the order of float operations (said per key).
The keys a CPU cannot vary are listed with the reason; a key added to the table without a row here fails."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from omegaconf import open_dict

from qrepro.config import NON_SEMANTIC_KEYS, compose
from qrepro.launch import train

BASE = [
    "+experiment=demo_digits_fp",
    "trainer.epochs=1",
    "trainer.batch_size=256",
    "model.width=2",
    "logger=none",
    "trainer.progress=false",
    "trainer.num_threads=1",
]
ROUNDING = dict(rtol=1e-3, atol=1e-4)  # float32 sums in another order, six SGD steps: <= 3.4e-5 measured (2-core CPU)

# key -> the overrides of its other value (the baseline has the first value); the run's out_root always differs
EXACT = {
    "out_root": [],  # every run below has its own out_root
    "resume": ["resume=true"],  # nothing to resume: a fresh run
    "force": ["force=true"],  # nothing to replace: a fresh run
    "retry": ["retry=true"],
    "logger": ["logger=wandb", "logger.mode=disabled", "logger.project=p", "logger.group=g", "logger.entity=null"],
    "logger.mode": ["logger=wandb", "logger.mode=disabled"],
    "logger.project": ["logger=wandb", "logger.mode=disabled", "logger.project=other"],
    "logger.entity": ["logger=wandb", "logger.mode=disabled", "logger.entity=someone"],
    "logger.group": ["logger=wandb", "logger.mode=disabled", "logger.group=other"],
    "dataset.root": ["dataset.root=elsewhere"],  # digits are bundled: the root is not read (ImageNet below)
    "dataset.download": ["+dataset.download=true"],
    "dataset.workers": ["+dataset.workers=1"],  # digits are held in memory (ImageNet's DataLoader below)
    "trainer.device": ["trainer.device=cpu"],  # auto -> cpu here
    "trainer.progress": ["trainer.progress=true"],
    "trainer.compile": ["trainer.compile=false"],  # auto is eager on a CPU; true: test_compile_true_... (slow)
    "trainer.log_every": ["trainer.log_every=1"],
}
# float rounding only: the key changes the order of float operations, not the computation
ROUNDED = {
    "trainer.num_threads": ["trainer.num_threads=2"],  # intra-op threads split reductions differently
}
# varied by their own tests below
OWN_TEST = {
    "experiment": "test_the_experiment_and_table_names_are_labels",
    "table": "test_the_experiment_and_table_names_are_labels",
    "init_from": "test_init_from_is_named_by_its_content",
    "trainer.members": "test_members_equal_the_separate_run",
    "ptq.eval_fp": "test_ptq_eval_fp_only_adds_the_fp_accuracy",
}
SKIPPED = {
    "trainer.find_unused_parameters": "read only when DDP wraps the model (several processes); "
    "tests/test_ddp.py runs DDP",
    "hydra.verbose": "Hydra's own logging flag: not part of the job's config, so no run can read it",
}


def _run(tmp: Path, name: str, extra: list[str], edit=None) -> dict:
    cfg = compose([*BASE, *extra, f"out_root={tmp / name}"])
    if edit is not None:
        with open_dict(cfg):
            edit(cfg)
    res = train(cfg, overrides=[o for o in extra if not o.startswith("out_root")])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # trainer.num_threads is process-wide
    ck = torch.load(res.record_path.parent / "checkpoints" / "last.pt", map_location="cpu", weights_only=False)
    assert res.record["complete"] and threads >= 1
    return {"model": ck["model"], "metrics": res.record["metrics"], "curves": res.record["curves"], "rec": res.record}


def _numbers(run: dict) -> dict[str, float]:
    m, c = run["metrics"], run["curves"]
    out = {k: float(v) for k, v in m.items() if isinstance(v, (int, float)) and not k.endswith("_s")}
    for k in ("train_loss", "train_top1", "test_loss", "test_top1"):
        if k in c:
            out.update({f"{k}[{i}]": float(v) for i, v in enumerate(c[k])})
    return out


def _same(a: dict, b: dict, exact: bool, what: str) -> None:
    assert a["model"].keys() == b["model"].keys()
    for k, v in a["model"].items():
        if exact:
            assert torch.equal(v, b["model"][k]), f"{what}: {k} differs"
        else:
            assert torch.allclose(v.double(), b["model"][k].double(), **ROUNDING), f"{what}: {k} differs"
    na, nb = _numbers(a), _numbers(b)
    assert na.keys() == nb.keys() and na, what
    for k in na:
        if exact:
            assert na[k] == nb[k], f"{what}: {k} {na[k]} != {nb[k]}"
        elif "top" in k:  # one of the 359 test images may fall on the other side of a decision boundary
            assert abs(na[k] - nb[k]) <= 100 / 359 + 1e-9, f"{what}: {k} {na[k]} vs {nb[k]}"
        else:
            assert na[k] == pytest.approx(nb[k], rel=1e-4, abs=1e-5), f"{what}: {k}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("nonsemantic")
    return tmp, _run(tmp, "baseline", [])


def test_every_non_semantic_key_is_varied_or_skipped_with_a_reason():
    covered = set(EXACT) | set(ROUNDED) | set(OWN_TEST) | set(SKIPPED)
    assert set(NON_SEMANTIC_KEYS) <= covered, sorted(set(NON_SEMANTIC_KEYS) - covered)
    assert set(EXACT) | set(ROUNDED) | set(OWN_TEST) | set(SKIPPED) <= set(NON_SEMANTIC_KEYS)


def test_keys_that_change_nothing(runs):
    tmp, base = runs
    for key, extra in EXACT.items():
        if key == "dataset.root":
            (tmp / "elsewhere").mkdir(exist_ok=True)
            extra = [f"dataset.root={tmp / 'elsewhere'}"]
        _same(_run(tmp, key, extra), base, exact=True, what=key)
    for key, extra in ROUNDED.items():
        _same(_run(tmp, key, extra), base, exact=False, what=key)


def test_the_experiment_and_table_names_are_labels(runs):
    tmp, base = runs

    def relabel(cfg):
        cfg.experiment = "another_label"
        cfg.table = "some_table"

    run = _run(tmp, "labels", [], edit=relabel)
    _same(run, base, exact=True, what="experiment/table")
    assert run["rec"]["identity"] == base["rec"]["identity"]


def test_init_from_is_named_by_its_content(runs):
    """The same checkpoint at two paths (``init_from`` is non-semantic: the identity holds its content hash)."""
    tmp, base = runs
    src = Path(base["rec"]["run_dir"]) / "checkpoints" / "last.pt"
    a, b = tmp / "a" / "last.pt", tmp / "b=1" / "ckpt.pt"
    for p in (a, b):
        p.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, p)
    ra, rb = _run(tmp, "init_a", [f"init_from={a}"]), _run(tmp, "init_b", [f"init_from={b}"])
    _same(ra, rb, exact=True, what="init_from")
    assert ra["rec"]["identity"] == rb["rec"]["identity"] and ra["rec"]["identity"]["init_from_sha256"]


def test_members_equal_the_separate_run(runs):
    """``trainer.members=2``: seeds 0 and 1 as one batched job; member 0 is the baseline (seed 0). The batched
    step runs the K members' convolutions as one grouped kernel (another float summation order): rounding only."""
    tmp, base = runs
    cfg = compose([*BASE, "trainer.members=2", f"out_root={tmp / 'members'}"])
    results = train(cfg, run_dir=tmp / "members" / "demo_digits_fp" / "default", overrides=["trainer.members=2"])
    torch.set_num_threads(1)
    first = results[0]
    ck = torch.load(first.record_path.parent / "checkpoints" / "last.pt", map_location="cpu", weights_only=False)
    run = {"model": ck["model"], "metrics": first.record["metrics"], "curves": first.record["curves"]}
    assert first.record["seed"] == 0 and results[1].record["seed"] == 1
    _same(run, base, exact=False, what="trainer.members")


def test_ptq_eval_fp_only_adds_the_fp_accuracy(runs):
    from qrepro.ptq.__main__ import run_ptq

    tmp, base = runs
    ckpt = Path(base["rec"]["run_dir"]) / "checkpoints" / "last.pt"
    recs = []
    for eval_fp in ("true", "false"):
        over = [*BASE, f"out_root={tmp / 'ptq'}", f"init_from={ckpt}", "precision=w4a4", "ptq.algorithm=minmax"]
        cfg = compose([*over, "ptq.calib_size=64", f"ptq.eval_fp={eval_fp}"], "ptq")
        (path,) = run_ptq(cfg, run_dir=tmp / "ptq" / eval_fp, overrides=[])
        recs.append(__import__("json").loads(path.read_text()))
    assert recs[0]["ptq"]["fp_top1"] is not None and recs[1]["ptq"]["fp_top1"] is None
    assert recs[0]["metrics"] == recs[1]["metrics"]


# ------------------------------------------------------------------------------ a dataset read by a DataLoader
def _image_folder(root: Path, n: int = 12) -> Path:
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for split in ("train", "val"):
        for c in ("a", "b"):
            d = root / split / c
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                px = torch.randint(0, 256, (12, 12, 3), generator=g, dtype=torch.uint8).numpy()
                Image.fromarray(px).save(d / f"{i}.png")
    return root


def test_imagenet_loader_workers_and_root_change_nothing(tmp_path):
    """An ImageFolder read by a DataLoader with random crops and flips: ``dataset.workers`` 0, 1 and 2 and the
    same images under another root give the same batches, two epochs long (order and augmentation are functions
    of the seed, the epoch and the image, not of which process decodes it)."""
    from qrepro.data import build_data

    root = _image_folder(tmp_path / "in")
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)

    def batches(workers: int, where: Path) -> list[torch.Tensor]:
        data = build_data("imagenet", root=str(where), batch_size=5, test_batch_size=7, image_size=8, resize=10,
                          workers=workers, seed=3)  # fmt: skip
        out = []
        for epoch in range(2):
            data.train.set_epoch(epoch)
            out += [torch.cat([x.flatten(), y.float()]) for x, y in data.train]
        return out + [torch.cat([x.flatten(), y.float()]) for x, y in data.test]

    ref = batches(0, root)
    assert len(ref) == 2 * (24 // 5) + 4
    assert not torch.equal(ref[0], ref[4 + 0])  # the second epoch is another order / augmentation
    for workers, where in ((1, root), (2, root), (0, copy)):
        got = batches(workers, where)
        assert len(got) == len(ref) and all(torch.equal(a, b) for a, b in zip(got, ref)), (workers, where)


@pytest.mark.slow
def test_compile_true_changes_rounding_only(runs):
    """``trainer.compile=true`` on a CPU compiles the step with Inductor (fused kernels: another float order)."""
    tmp, base = runs
    _same(_run(tmp, "compile", ["trainer.compile=true"]), base, exact=False, what="trainer.compile=true")
