"""Multi-process training (DDP, gloo on CPU, 2 ranks): replicas stay identical (parameters, quantizer parameters
and buffers, transition counts), rank 0 alone writes the record, a 2-rank run matches a 1-rank run with the same
global batch, and the sharded/all-reduced data paths are exact. Also: the submitit launcher configs compose.

The probe model has no BatchNorm (per-rank batch statistics would make 1-rank and 2-rank runs differ by design;
torch's SyncBatchNorm has no CPU kernel), and the probe quantizer exercises what DDP alone does not synchronise:
a parameter initialised per rank in ``on_train_start`` (standing in for an initialisation from each rank's own
first batch), a parameter initialised lazily in the first training forward, and a running-statistics buffer.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from qrepro.engine import dist as qdist
from qrepro.errors import QreproError
from qrepro.hooks import Hook
from qrepro.models import MODELS
from qrepro.quant.layers import quantized_layers
from qrepro.quant.methods import METHODS, Method
from qrepro.train import compose, train

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable


# ---------------------------------------------------------------------------------------------------------------
# probe model and quantizer (registered at import, so spawned workers have them too)


class ProbeNet(nn.Module):
    """conv-relu-pool x2 + linear, no normalisation layers."""

    def __init__(self, num_classes: int, width: int = 8, in_chans: int = 3) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_chans, width, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(4),
        )
        self.fc = nn.Linear(2 * width * 16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.body(x), 1))


class ProbeWeight(nn.Module):
    """Uniform b-bit weight quantizer with a fixed per-tensor scale (set at bind from the initial weights)."""

    def __init__(self, bits: int) -> None:
        super().__init__()
        self.bits = bits
        self.lo, self.hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        self.register_buffer("scale", torch.ones(()))

    def bind(self, layer: nn.Module) -> None:
        self.scale.fill_(float(3 * layer.weight.detach().std() / 2 ** (self.hi.bit_length())))

    def discrete(self, w: torch.Tensor) -> torch.Tensor:
        return (w / self.scale).clamp(self.lo, self.hi).round()

    def from_discrete(self, wd: torch.Tensor) -> torch.Tensor:
        return wd.float() * self.scale

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w + (self.discrete(w) * self.scale - w).detach()


class ProbeAct(nn.Module):
    """PACT-like activation quantizer with the three kinds of state DDP does not keep equal by itself."""

    def __init__(self, bits: int) -> None:
        super().__init__()
        self.levels = 2**bits - 1
        self.alpha = nn.Parameter(torch.tensor(3.0))  # per rank in on_train_start (see ProbeInit)
        self.beta = nn.Parameter(torch.tensor(1.0))  # per rank in the first training forward
        self.register_buffer("running_max", torch.zeros(()))  # per-rank statistic, DDP copies rank 0's
        self.register_buffer("started", torch.zeros((), dtype=torch.bool))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            with torch.no_grad():
                if not bool(self.started):
                    self.beta.fill_(1.0 + 0.05 * qdist.rank())
                    self.started.fill_(True)
                self.running_max.lerp_(x.detach().amax(), 0.1)
        y = torch.minimum(x.clamp(min=0), self.alpha)
        s = self.alpha / self.levels
        return (y + ((y / s).round() * s - y).detach()) * self.beta


class ProbeInit(Hook):
    def on_train_start(self, ctx) -> None:
        for _, layer in quantized_layers(ctx.model):
            if isinstance(layer.aq, ProbeAct):
                with torch.no_grad():
                    layer.aq.alpha.fill_(3.0 + 0.25 * qdist.rank())


class TransitionProbe(Hook):
    """Counts changes of the discrete weights per step (the transition rate of the TR paper, Eq. 5)."""

    def __init__(self) -> None:
        self.local: list[float] = []
        self.reduced: list[float] = []

    def _levels(self) -> torch.Tensor:
        return torch.cat([lay.wq.discrete(lay.weight).flatten() for lay in self.layers])

    def on_train_start(self, ctx) -> None:
        self.layers = [lay for _, lay in quantized_layers(ctx.model) if isinstance(lay.wq, ProbeWeight)]
        self.prev = self._levels()

    def on_step_end(self, ctx, step: int) -> None:
        cur = self._levels()
        rate = (cur != self.prev).double().mean()
        self.prev = cur
        self.local.append(float(rate))
        self.reduced.append(float(qdist.all_reduce_mean(rate)))  # what a TR optimizer calls (a mean, not a sum)


def build_probe(w_bits: int, a_bits: int) -> Method:
    def quantize_layer(info):
        if info.role != "middle":
            return None
        return ProbeWeight(w_bits), ProbeAct(a_bits)

    return Method("ddp_probe", quantize_layer, hooks=[ProbeInit(), TransitionProbe()])


def register_probe() -> None:
    """Register the probe model and quantizer (in every rank process; removed again after this module's tests so
    that registry-wide tests elsewhere do not see them)."""
    if "ddp_probe_net" not in MODELS.names():
        MODELS.register("ddp_probe_net")(ProbeNet)
    if "ddp_probe" not in METHODS.names():
        METHODS.register("ddp_probe")(build_probe)


@pytest.fixture(scope="module", autouse=True)
def _unregister_probe():
    yield
    MODELS._items.pop("ddp_probe_net", None)
    METHODS._items.pop("ddp_probe", None)


# ---------------------------------------------------------------------------------------------------------------
# harness: N ranks with torch.multiprocessing (the real env:// path of qrepro.engine.dist.setup)

BASE = [
    "logger=none",
    "trainer.progress=false",
    "trainer.device=cpu",
    "trainer.epochs=1",
    "trainer.batch_size=64",
    "trainer.log_every=5",
    "model.name=ddp_probe_net",
    "model.width=8",
    "quantizer.name=ddp_probe",
    "precision=w4a4",
    "optimizer=sgdt",  # the TR paper's SGDT: transition-adaptive LR of the quantized weights
    "optimizer.lr=0.05",
    "dataset.crop_padding=2",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, out: str, overrides: list[str]) -> None:
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank), "WORLD_SIZE": str(world)}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env, LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    register_probe()
    import qrepro.engine.trainer as trainer_mod

    real_fit = trainer_mod.fit

    def fit_and_dump(f):
        res = real_fit(f)
        probe = next((h for h in f.hooks if isinstance(h, TransitionProbe)), TransitionProbe())
        tr = getattr(f.optimizer, "tr_last", {})
        lrs = [g["lr"] for g in f.optimizer.param_groups]
        dump = {
            "state": f.model.state_dict(),
            "local": probe.local,
            "reduced": probe.reduced,
            "tr": tr,
            "optimizer_lrs": lrs,
        }
        torch.save(dump, Path(out) / f"rank{rank}.pt")
        return res

    trainer_mod.fit = fit_and_dump
    try:
        train(compose(overrides), run_dir=Path(out) / "run", experiment="ddp_probe", overrides=overrides)
    finally:
        trainer_mod.fit = real_fit
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        os.environ.pop("LOCAL_RANK", None)


def _run(tmp: Path, world: int, overrides: list[str]) -> tuple[dict, list[dict]]:
    tmp.mkdir(parents=True, exist_ok=True)
    if world == 1:
        _rank_main(0, 1, 0, str(tmp), overrides)
    else:
        mp.spawn(_rank_main, args=(world, _free_port(), str(tmp), overrides), nprocs=world, join=True)
    record = json.loads((tmp / "run" / "record.json").read_text())
    return record, [torch.load(tmp / f"rank{r}.pt", weights_only=True) for r in range(world)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """4-bit probe: 2 ranks (spawned) and 1 rank (in process), same global batch of 64."""
    base = tmp_path_factory.mktemp("ddp")
    return _run(base / "two", 2, BASE), _run(base / "one", 1, BASE)


def test_replicas_identical_parameters_quantizer_state_and_transitions(runs):
    (_, (r0, r1)), _ = runs
    assert r0["state"].keys() == r1["state"].keys()
    for k, v in r0["state"].items():
        assert torch.equal(v, r1["state"][k]), k  # bit-identical: weights, alpha, beta, running_max, scale
    aq = [k for k in r0["state"] if k.endswith("aq.alpha")][0]
    assert float(r0["state"][aq]) != 3.0  # trained away from rank 0's start (3.0; rank 1 started at 3.25)
    assert r0["local"] == r1["local"] and len(r0["local"]) == 23  # 1438 digits / 64 -> 23 steps
    assert r0["reduced"] == r0["local"]  # the count is already global: the mean over ranks changes nothing
    assert any(x > 0 for x in r0["local"])
    # SGDT's own state: transition count k, running TR K, target R and transition-adaptive LR U of the last step
    assert r0["tr"] and r0["tr"] == r1["tr"]
    assert r0["optimizer_lrs"] == r1["optimizer_lrs"]


def test_record_written_once_by_rank0_with_global_metrics(runs):
    (rec2, _), (rec1, _) = runs
    assert rec2["complete"] and rec2["world_size"] == 2 and rec1["world_size"] == 1
    assert rec2["curves"]["epoch"] == [1]
    # train metrics are over the global batch (all-reduced), evaluation over the whole test set
    assert rec2["curves"]["train_loss"][0] == pytest.approx(rec1["curves"]["train_loss"][0], rel=1e-3)
    assert rec2["curves"]["train_top1"][0] == pytest.approx(rec1["curves"]["train_top1"][0], abs=0.5)


def test_transition_rate_two_ranks_equals_one_rank(runs):
    """TR's quantity on the same global batch. Weights are replicated, so each rank's count is the global count;
    2 ranks vs 1 rank differ only where 4-bit activation rounding turns float-summation-order differences
    (~1e-7) into a different level for a few activations, which moves a few weights across a level boundary
    a step earlier or later. Measured on CPU: per-step rates equal for the first steps, then within 3 of 1152
    weights; tolerance: per step 4/1152, epoch mean 10%."""
    (rec2, (r0, _)), (rec1, (s0,)) = runs
    n = sum(v.numel() for k, v in s0["state"].items() if k == "body.3.weight")
    assert r0["local"][:3] == s0["local"][:3]
    assert max(abs(a - b) for a, b in zip(r0["local"], s0["local"])) <= 4 / n + 1e-12
    assert sum(r0["local"]) == pytest.approx(sum(s0["local"]), rel=0.1)
    # what SGDT itself measured and scheduled (record curves from its TR monitor, rank 0)
    c2, c1 = rec2["curves"], rec1["curves"]
    print({k: (c2[k], c1[k]) for k in ("tr", "tr_running", "talr", "tr_target")})
    assert c2["tr_target"] == c1["tr_target"]
    assert c2["tr"][0] == pytest.approx(c1["tr"][0], rel=0.1)
    assert c2["tr_running"][0] == pytest.approx(c1["tr_running"][0], rel=0.1)
    assert c2["talr"][0] == pytest.approx(c1["talr"][0], rel=0.1, abs=1e-4)


@pytest.fixture(scope="module")
def fp_runs(tmp_path_factory):
    """Full-precision probe net: 2 ranks through the real command line (torchrun), as a Hydra multirun of two jobs
    in the same processes (seed=0,1: the process group is reused), and 1 rank in process (seed 0)."""
    base = tmp_path_factory.mktemp("ddp_fp")
    overrides = [o for o in BASE if not o.startswith(("quantizer.", "precision", "optimizer="))]
    cmd = [str(Path(PY).parent / "torchrun"), "--nproc_per_node=2", "--master_port", str(_free_port())]
    cmd += [str(ROOT / "tests" / "ddp_entry.py"), "-m", *overrides, "seed=0,1", f"out_root={base / 'cli'}"]
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="disabled", PYTHONPATH=str(ROOT))
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    return p, base / "cli", _run(base / "one", 1, overrides)


def test_torchrun_cli_rank0_alone_prints_and_writes(fp_runs):
    p, out, _ = fp_runs
    assert p.stdout.count("epoch 1/1") == 2 and p.stdout.count("record: ") == 2 and "ranks=2 (gloo)" in p.stdout
    recs = sorted(out.rglob("record.json"))
    assert len(recs) == 2 and len(list(out.rglob("last.pt"))) == 2
    for r in recs:
        rec = json.loads(r.read_text())
        assert rec["complete"] and rec["world_size"] == 2 and rec["curves"]["epoch"] == [1]


def test_two_ranks_match_one_rank_with_the_same_global_batch(fp_runs):
    """Same global batch (64 = 2 x 32), same samples, same augmentation draws: the only difference is the order
    of floating-point sums (per-rank mean gradients averaged vs one mean). Tolerance 1e-5 on every parameter
    after 23 SGD steps (measured on CPU: max |diff| 1.6e-7), and identical test accuracy."""
    _, out, (rec1, (s0,)) = fp_runs
    run = next(d for d in out.rglob("*seed=0*") if (d / "record.json").exists())
    rec2 = json.loads((run / "record.json").read_text())
    ckpt = torch.load(run / "checkpoints" / "last.pt", weights_only=True)["model"]
    assert ckpt.keys() == s0["state"].keys()
    for k, v in s0["state"].items():
        torch.testing.assert_close(ckpt[k], v, atol=1e-5, rtol=1e-5, msg=k)
    assert rec2["metrics"]["last_top1"] == rec1["metrics"]["last_top1"]
    assert rec2["curves"]["train_loss"][0] == pytest.approx(rec1["curves"]["train_loss"][0], rel=1e-5)
    assert rec2["curves"]["test_loss"][0] == pytest.approx(rec1["curves"]["test_loss"][0], rel=1e-5)


def test_batch_not_divisible_by_ranks_is_an_error():
    from qrepro.train import build_data_from_cfg

    with pytest.raises(QreproError, match="trainer.batch_size=63 is not divisible by the 2 processes"):
        build_data_from_cfg(compose(["trainer.batch_size=63"]), torch.device("cpu"), 0, 2)


# ---------------------------------------------------------------------------------------------------------------
# no processes: utilities, sharded data, launcher configs


def test_single_process_utilities_are_identities():
    t = torch.tensor([1.0, 2.0])
    assert qdist.all_reduce_sum(t) is t and qdist.all_reduce_mean(t) is t
    assert qdist.world_size() == 1 and qdist.rank() == 0 and qdist.is_main() and not qdist.is_distributed()
    assert qdist.out_of_sync(nn.Linear(2, 2)) == []
    assert qdist.per_rank_batch(256, 8) == 32
    with pytest.raises(QreproError, match="not divisible"):
        qdist.per_rank_batch(100, 8)


def test_sharded_training_batches_equal_single_process_batches():
    """Rank r takes positions r::W of each global batch, including the augmentation draws."""
    from qrepro.data import Normalizer, TensorLoader

    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (40, 3, 6, 6), generator=g, dtype=torch.uint8)
    y = torch.arange(40)
    kw = dict(train=True, crop_padding=2, flip=True, seed=3)
    norm = Normalizer(None, None, raw255=True)
    single = TensorLoader(x, y, 8, norm, **kw)
    shards = [TensorLoader(x, y, 4, norm, rank=r, world_size=2, **kw) for r in range(2)]
    for epoch in (0, 1):
        for ld in (single, *shards):
            ld.set_epoch(epoch)
        got = list(zip(*shards))
        ref = list(single)
        assert len(got) == len(ref) == 5
        for (xs, ys), ((x0, y0), (x1, y1)) in zip(ref, got):
            assert torch.equal(ys[0::2], y0) and torch.equal(ys[1::2], y1)
            assert torch.equal(xs[0::2], x0) and torch.equal(xs[1::2], x1)


def test_eval_shards_partition_the_test_set_without_padding():
    from qrepro.data import Normalizer, TensorLoader

    x, y = torch.zeros(11, 3, 4, 4, dtype=torch.uint8), torch.arange(11)
    seen = []
    for r in range(3):
        ld = TensorLoader(x, y, 2, Normalizer(None, None), train=False, rank=r, world_size=3)
        ys = [b for _, b in ld]
        assert len(ld) == len(ys)
        seen += torch.cat(ys).tolist()
    assert sorted(seen) == list(range(11))


def test_sync_bn_on_cpu_is_a_one_line_error():
    """torch's SyncBatchNorm has no CPU kernel: asking for it with the gloo backend fails fast and clearly."""
    from qrepro.engine.dist import DistEnv, use_sync_bn

    cpu2 = DistEnv(world_size=2, device=torch.device("cpu"), backend="gloo")
    with pytest.raises(QreproError, match="sync_bn"):
        use_sync_bn(True, cpu2)
    assert not use_sync_bn(True, DistEnv()) and not use_sync_bn(False, cpu2)  # single process: ignored


@pytest.mark.parametrize("launcher", ["submitit_slurm", "submitit_local"])
def test_submitit_launcher_configs_compose(launcher):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf

    from qrepro.cli import CONFIG_DIR, register_resolvers

    register_resolvers()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = hydra_compose(
            "train",
            overrides=[f"hydra/launcher={launcher}", "+experiment=demo_digits_fp", "hydra.launcher.timeout_min=30"],
            return_hydra_config=True,
        )
    lc = cfg.hydra.launcher
    assert lc._target_.endswith("SlurmLauncher" if launcher == "submitit_slurm" else "LocalLauncher")
    assert lc.timeout_min == 30 and lc.nodes >= 1
    assert lc.tasks_per_node == lc.gpus_per_node  # one DDP rank per GPU
    plain = OmegaConf.to_container(lc, resolve=False)
    for key in ("partition", "gpus_per_node", "tasks_per_node", "nodes", "timeout_min", "cpus_per_task", "mem_gb"):
        if launcher == "submitit_slurm" or key != "partition":
            assert key in plain, key


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("QREPRO_SLOW") != "1", reason="~60 s: set QREPRO_SLOW=1")
def test_submitit_local_job_runs_two_ddp_ranks(tmp_path):
    """The SLURM code path without a cluster: Hydra's submitit launcher starts 2 tasks, qrepro.engine.dist derives
    RANK/WORLD_SIZE from submitit's job environment, and the job trains as 2 DDP ranks (gloo)."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    cmd = [PY, "-m", "qrepro.train", "-m", "hydra/launcher=submitit_local", "hydra.launcher.gpus_per_node=2"]
    cmd += ["+experiment=demo_digits_fp", "trainer.device=cpu", "trainer.epochs=1", "model.width=8", "logger=none"]
    cmd += ["trainer.progress=false", f"out_root={tmp_path}"]
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="disabled", PYTHONPATH=str(ROOT))
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert p.returncode == 0, p.stderr[-3000:]
    recs = list(tmp_path.rglob("record.json"))
    assert len(recs) == 1
    assert json.loads(recs[0].read_text())["world_size"] == 2


def test_launcher_configs_are_validated_against_the_plugin_schema(tmp_path):
    """Our ``submitit_slurm.yaml`` carries the plugin's name, so Hydra merges it onto the plugin's schema: the
    plugin's other keys keep their defaults, a key the plugin does not know fails, and no deprecation notice leaks."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    import warnings

    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import ConfigCompositionException

    from qrepro.cli import CONFIG_DIR, register_resolvers

    register_resolvers()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            register_resolvers()  # re-installs the filter that simplefilter just reset
            cfg = hydra_compose("train", overrides=["hydra/launcher=submitit_slurm"], return_hydra_config=True)
        lc = cfg.hydra.launcher
        assert lc.array_parallelism == 256 and lc.signal_delay_s == 120  # plugin defaults, not in our file
        assert lc.gpus_per_node == 8 and lc.tasks_per_node == 8 and lc.timeout_min == 2880
        assert not [w for w in caught if "ConfigStore schema" in str(w.message)]
    bad = tmp_path / "configs"
    shutil.copytree(CONFIG_DIR, bad)
    f = bad / "hydra" / "launcher" / "submitit_slurm.yaml"
    f.write_text(f.read_text() + "gpu_per_nod: 2\n")  # misspelt key: the plugin's schema rejects it
    with initialize_config_dir(config_dir=str(bad), version_base="1.3"):
        with pytest.raises(ConfigCompositionException, match="with schema"):
            hydra_compose("train", overrides=["hydra/launcher=submitit_slurm"], return_hydra_config=True)


def test_submitit_launcher_without_the_plugin_is_a_one_line_error(monkeypatch):
    from qrepro.cli import check_launcher

    monkeypatch.setitem(sys.modules, "hydra_plugins.hydra_submitit_launcher", None)  # import fails
    with pytest.raises(QreproError, match=r"pip install -e '\.\[slurm\]'"):
        check_launcher(["-m", "hydra/launcher=submitit_slurm", "+experiment=demo_digits_fp"])
    check_launcher(["hydra/launcher=basic"])  # Hydra's own launcher needs no plugin


def test_imagenet_loaders_shard_train_and_test_sets(tmp_path):
    """ImageNet path: DistributedSampler order for training (disjoint shards); unpadded, disjoint test shards
    covering the val set."""
    import numpy as np
    from PIL import Image

    from qrepro.data import build_data

    for split, n in (("train", 4), ("val", 5)):
        for c in ("a", "b"):
            d = tmp_path / split / c
            d.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(np.full((8, 8, 3), i * 20, dtype=np.uint8)).save(d / f"{i}.png")
    kw = dict(root=str(tmp_path), batch_size=2, test_batch_size=3, image_size=8, resize=8, workers=0, world_size=2)
    shards = [build_data("imagenet", rank=r, **kw) for r in range(2)]
    assert all(isinstance(b.train.loader.sampler.order, torch.utils.data.DistributedSampler) for b in shards)
    assert [len(b.train) for b in shards] == [2, 2]  # 8 images / 2 ranks / 2 per batch
    train_idx = [[i for i, _ in b.train.loader.sampler] for b in shards]  # (index, augmentation seed) pairs
    assert sorted(train_idx[0] + train_idx[1]) == list(range(8)) and not set(train_idx[0]) & set(train_idx[1])
    idx = [list(b.test.loader.sampler) for b in shards]
    assert sorted(idx[0] + idx[1]) == list(range(10)) and not set(idx[0]) & set(idx[1])
    assert sum(int(y.shape[0]) for b in shards for _, y in b.test) == 10
