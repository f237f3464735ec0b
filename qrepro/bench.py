"""Training-step benchmark: FP and every registered quantizer, side by side, in one process.

    python -m qrepro.bench                                   # full grid on the default device
    python -m qrepro.bench --models resnet20 --batch-sizes 128 --steps 5 --warmup 3   # a short CPU run

Each case builds the model exactly as the trainer does and times ``qrepro.engine.loop.train_one_epoch`` -- the
trainer's own loop -- on one synthetic batch held on the device, eager and compiled (``qrepro.engine.fast``). The
cases, the timing (warm-up, samples of ``--window`` steps between device synchronisations, median) and the ratios
to FP measured in the same process: docs/speed.md, section 2.

``--members 1,2,4`` also times K replicas (seeds 0..K-1) trained as one batched step (``trainer.members``: the
trainer's ``BatchedStep``), ``--amp off,bf16`` the step under ``trainer.amp``; ``× K sep`` below 1 (defined in
the Markdown output's header) means the batch trains K runs faster than K separate runs one after another.

Writes ``<out>/<device-slug>.json`` and ``<out>/<device-slug>.md``.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import nn

from qrepro.builders import select_device
from qrepro.config import CONFIG_DIR
from qrepro.engine.fast import COMPILE_MODES, compile_forward_loss, compile_mode, make_forward_loss, setup_device
from qrepro.engine.loop import train_one_epoch
from qrepro.engine.members import BatchedStep, MemberSlot, RngState
from qrepro.engine.precision import amp_mode, autocast_factory, make_scaler
from qrepro.engine.record import git_info, versions, write_json_atomic
from qrepro.errors import QreproError, report
from qrepro.hooks import Context
from qrepro.models import build_model
from qrepro.optim import build_optimizer, build_scheduler
from qrepro.quant import build_method, prepare
from qrepro.quant.methods import method_names
from qrepro.tables.records import portable, portable_str

DEFAULT_MODELS = ("resnet20", "mobilenet_v2_cifar")
DEFAULT_BATCH_SIZES = (128, 512)
DEFAULT_MODES = ("eager", "compiled")
DEFAULT_BITS = 4
# methods benchmarked at other bit-widths than the default (APoT's level sets change with b: Eq. 5/6)
METHOD_BITS = {"apot": (2, 3, 4), "reactnet": (1,)}  # reactnet: binary only (W1A1)
FP_METHOD, FP_PRECISION = "fp", "w32a32"


@dataclass
class Case:
    model: str
    method: str
    w_bits: int
    a_bits: int
    batch_size: int
    mode: str  # "eager" or a torch.compile mode
    image_size: int = 32
    members: int = 1  # K runs as one batched step (trainer.members)
    amp: str = "off"  # trainer.amp

    @property
    def precision(self) -> str:
        return f"w{self.w_bits}a{self.a_bits}"


@dataclass
class Row:
    model: str
    method: str
    precision: str
    batch_size: int
    mode: str
    status: str = "ok"  # ok | skipped: ... | error: ...
    image_size: int = 32  # synthetic input: batch x 3 x image_size x image_size
    step_ms: float | None = None  # median
    step_ms_min: float | None = None
    step_ms_max: float | None = None
    images_per_s: float | None = None
    fp_step_ms: float | None = None  # the FP median step time (same model, batch, mode, invocation)
    ratio_fp: float | None = None  # step time / FP step time, same model, batch and mode
    ratio_fp_eager: float | None = None  # step time / FP eager step time
    ratio_fp_min: float | None = None  # fastest sample / FP's fastest sample (robust to a loaded machine)
    ratio_fp_paired: float | None = None  # --interleave: median over i of sample i / FP's sample i (its pair)
    interleaved: bool = False  # timed in turns with its FP case (--interleave)
    first_step_s: float | None = None  # first warm-up step of the first round (includes compilation)
    peak_mem_mb: float | None = None
    graph_breaks: int | None = None
    cudagraph_counters: dict[str, int] = field(default_factory=dict)  # skips, non-static inputs (copied per replay)
    samples_ms: list[float] = field(default_factory=list)
    members: int = 1  # K runs stepped as one batch; step_ms is the batched step
    amp: str = "off"
    member_images_per_s: float | None = None  # one member's images/s (batch / batched step time)
    separate_step_ms: float | None = None  # step time of one run of the same case (members=1), same invocation
    ratio_separate: float | None = None  # step_ms / (members x separate_step_ms)
    ratio_separate_min: float | None = None  # fastest sample / (members x the single run's fastest sample)


# ---------------------------------------------------------------------------------------------- helpers
def device_slug(device: torch.device) -> str:
    """A file-name-safe name for the device, e.g. ``cuda-nvidia-h100-80gb-hbm3`` or ``cpu-amd-epyc-2t``."""
    if device.type == "cuda":
        name = "cuda-" + torch.cuda.get_device_name(device)
    else:
        name = f"cpu-{cpu_model()}-{torch.get_num_threads()}t"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def cpu_model() -> str:
    try:
        m = re.search(r"^model name\s*:(.*)$", Path("/proc/cpuinfo").read_text(), re.MULTILINE)
    except OSError:
        m = None
    return m[1].strip() if m else platform.processor() or platform.machine()


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        return f"{p.name} ({p.total_memory / 2**30:.0f} GiB, CUDA {torch.version.cuda})"
    return f"CPU {cpu_model()} ({os.cpu_count()} cores visible, torch threads {torch.get_num_threads()})"


def method_options(name: str) -> dict[str, Any]:
    """The options of ``configs/quantizer/<name>.yaml`` (what ``quantizer=<name>`` trains with), else {}."""
    path = Path(CONFIG_DIR, "quantizer", f"{name}.yaml")
    if not path.exists():
        return {}
    cfg = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    return {k: v for k, v in (cfg or {}).items() if k not in ("name", "defaults")}


def parse_bits(spec: str | None) -> tuple[dict[str, tuple[int, ...]], tuple[int, ...]]:
    """``"apot=2,3,4;sat=4;default=4"`` -> ({"apot": (2, 3, 4), "sat": (4,)}, (4,))."""
    per = dict(METHOD_BITS)
    default: tuple[int, ...] = (DEFAULT_BITS,)
    for part in (spec or "").split(";"):
        if not part.strip():
            continue
        if "=" not in part:
            raise QreproError(f"--bits: {part!r} is not METHOD=B[,B...] (e.g. --bits 'apot=2,3,4;default=4')")
        k, v = part.split("=", 1)
        try:
            bits = tuple(int(b) for b in v.split(",") if b.strip())
        except ValueError:
            raise QreproError(f"--bits: {v!r} is not a list of integers (e.g. apot=2,3,4)") from None
        if k.strip() == "default":
            default = bits
        else:
            per[k.strip()] = bits
    return per, default


def _counts(flag: str, spec: str) -> list[int]:
    """A comma list of whole numbers >= 1 (``--batch-sizes``, ``--members``), or a one-line error naming the flag."""
    try:
        out = [int(k) for k in _csv(spec)]
    except ValueError:
        raise QreproError(f"{flag} {spec!r} is not a list of integers (e.g. 1,2,4)") from None
    if any(k < 1 for k in out):
        raise QreproError(f"{flag}: every value must be >= 1")
    return out


def _loadavg() -> str | None:
    """The 1/5/15-minute load averages (a shared machine's other jobs slow every case)."""
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return None


def _csv(s: str | None) -> list[str]:
    return [p.strip() for p in (s or "").split(",") if p.strip()]


class TimedBatches:
    """Yields one fixed batch ``n`` times; stamps the clock (after a device sync) every ``window`` batches and
    once after the last step, so consecutive stamps bracket ``window`` complete training steps."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, n: int, window: int, sync: Callable[[], None]):
        self.x, self.y, self.n, self.window, self.sync = x, y, n, max(1, window), sync
        self.stamps: list[float] = []

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self.stamps = []
        for i in range(self.n):
            if i % self.window == 0:
                self.sync()
                self.stamps.append(time.perf_counter())
            yield self.x, self.y
        self.sync()
        self.stamps.append(time.perf_counter())

    def samples(self) -> list[float]:
        """Seconds per step of each complete window."""
        return [(b - a) / self.window for a, b in zip(self.stamps[: self.n // self.window], self.stamps[1:])]


def resolve_mode(mode: str, device: torch.device) -> str:
    """``compiled`` -> the trainer's automatic compile mode on ``device``; other names pass through."""
    if mode in ("eager", *COMPILE_MODES):
        return mode
    if mode == "compiled":
        return compile_mode("true", device) or "eager"
    raise QreproError(f"--modes: unknown mode {mode!r}; use eager, compiled or one of: {', '.join(COMPILE_MODES)}")


# ---------------------------------------------------------------------------------------------- one case
_loss = nn.functional.cross_entropy


def _fresh(device: torch.device) -> None:
    """Free the previous case's memory and compiled code (every case compiles the same inner function anew)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()


_KEY = ("model", "image_size", "batch_size", "mode", "method", "precision", "members", "amp")  # a case's fields


def _key(r: Row | Case, **other: Any) -> tuple:
    """The case a row (or the case itself) measures (``other``: the same with these fields replaced)."""
    return tuple(other.get(f, getattr(r, f)) for f in _KEY)


def _row(case: Case, **fields: Any) -> Row:
    return Row(**{f: getattr(case, f) for f in _KEY}, **fields)


def _add_samples(row: Row, samples_ms: list[float], peak_mem_mb: float | None) -> None:
    """``samples_ms`` added to the row; its median / min / max step time, images/s (one member's and all K's) and
    peak memory."""
    row.samples_ms += samples_ms
    if peak_mem_mb is not None:
        row.peak_mem_mb = max(row.peak_mem_mb or 0.0, peak_mem_mb)
    row.step_ms = statistics.median(row.samples_ms)
    row.step_ms_min, row.step_ms_max = min(row.samples_ms), max(row.samples_ms)
    row.member_images_per_s = row.batch_size / (row.step_ms / 1e3)
    row.images_per_s = row.members * row.member_images_per_s


@dataclass
class Prepared:
    """A case built and warmed up: ``epoch(batches)`` trains on the batches it is given."""

    row: Row
    epoch: Callable[[TimedBatches], None]
    x: torch.Tensor
    y: torch.Tensor
    sync: Callable[[], None]
    release: Callable[[], None] = lambda: None


def _warm(prep: Prepared, device: torch.device, warmup: int, compiled: bool) -> Prepared:
    """``warmup`` untimed steps (the first one's time is ``first_step_s``; compilation happens here), and,
    compiled, the graph breaks and CUDA-graph counters they left."""
    # CUDA-graph trees warm up, then record: at least 3 untimed steps before timing a compiled case
    warm = TimedBatches(prep.x, prep.y, max(3 if compiled else 1, warmup), 1, prep.sync)
    prep.epoch(warm)
    prep.row.first_step_s = warm.samples()[0]
    if compiled:
        counters = torch._dynamo.utils.counters
        prep.row.graph_breaks = int(sum(counters["graph_break"].values()))
        prep.row.cudagraph_counters = {k: int(v) for k, v in counters["inductor"].items() if "cudagraph" in k}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    return prep


def _sample(prep: Prepared, device: torch.device, steps: int, window: int) -> None:
    """``steps`` samples of ``window`` steps added to the row; its step time, images/s and peak memory."""
    timed = TimedBatches(prep.x, prep.y, steps * window, window, prep.sync)
    prep.epoch(timed)
    peak_mem_mb = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    _add_samples(prep.row, [1e3 * s for s in timed.samples()], peak_mem_mb)


def _build(case: Case, device: torch.device, total: int, num_classes: int) -> tuple[Any, nn.Module, Any, Any]:
    """The method, prepared model on ``device``, SGD and a cosine schedule, as the trainer builds them for the case
    (a QreproError here means the case is not supported: the row is skipped)."""
    method = build_method(case.method, case.w_bits, case.a_bits, **method_options(case.method))
    model = build_model(case.model, num_classes=num_classes)
    prepare(model, method)
    model.to(device).train()
    optimizer = build_optimizer(model, "sgd", None, lr=0.1, momentum=0.9, weight_decay=5e-4)
    scheduler = build_scheduler(optimizer, "cosine", total_steps=10 * total, steps_per_epoch=total)
    return method, model, optimizer, scheduler


def _member(case: Case, device: torch.device, built: tuple, x, y, num_classes: int) -> MemberSlot:
    """One run's slot on the one synthetic batch ``(x, y)``, its hooks started (an error here is the row's error)."""
    method, model, optimizer, scheduler = built
    data = SimpleNamespace(train=[(x, y)], test=[], num_classes=num_classes)
    ctx = Context(model=model, optimizer=optimizer, scheduler=scheduler, data=data, sample_batch=(x, y))
    hooks = list(method.hooks) + list(getattr(optimizer, "hooks", []))
    for h in hooks:
        h.on_train_start(ctx)
    rng = RngState(device)
    rng.capture()
    return MemberSlot(model, optimizer, scheduler, hooks, None, ctx, rng, make_scaler(case.amp, device))


def prepare_case(
    case: Case, device: torch.device, *, warmup: int, steps: int, window: int, backend: str, num_classes: int = 10
) -> Prepared | Row:
    """``case.members`` runs (seeds 0..K-1) of the case, built and warmed up: one through the trainer's
    ``train_one_epoch``, K > 1 through its ``BatchedStep``. A case that cannot be built is its skipped row."""
    k, compiled = case.members, case.mode != "eager"
    torch.manual_seed(0)
    x = torch.randn(case.batch_size, 3, case.image_size, case.image_size, device=device)
    y = torch.randint(0, num_classes, (case.batch_size,), device=device)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    slots = []
    for i in range(k):
        torch.manual_seed(i)
        try:
            built = _build(case, device, warmup + steps * window, num_classes)
        except QreproError as e:
            return _row(case, status=f"skipped: {e}")
        method = built[0]
        slots.append(_member(case, device, built, x, y, num_classes))
    autocast = autocast_factory(case.amp, device)
    if k > 1:
        step = BatchedStep(slots, _loss, method.regularizer, autocast, case.mode if compiled else None)
        xs, ys = (t.unsqueeze(0).expand(k, *t.shape).contiguous() for t in (x, y))

        def batched_epoch(batches: TimedBatches) -> None:
            for bx, by in batches:
                step(bx, by)

        return _warm(Prepared(_row(case), batched_epoch, xs, ys, sync, step.release), device, warmup, compiled)
    (s,) = slots
    forward_loss = make_forward_loss(s.model, _loss, method.regularizer, autocast=autocast)
    if compiled:
        forward_loss = compile_forward_loss(forward_loss, case.mode, backend=backend)

    def epoch(batches: TimedBatches) -> None:
        train_one_epoch(
            s.model,
            batches,
            s.optimizer,
            s.scheduler,
            _loss,
            ctx=s.ctx,
            hooks=s.hooks,
            regularizer=method.regularizer,
            log_every=10**9,
            forward_loss=forward_loss,
            scaler=s.scaler,
        )

    return _warm(Prepared(_row(case), epoch, x, y, sync), device, warmup, compiled)


def run_case(case: Case, device: torch.device, *, steps: int, window: int, **build: Any) -> Row:
    """The case built, warmed up and timed on its own (``steps`` samples of ``window`` steps; ``build``: the rest
    of :func:`prepare_case`'s arguments)."""
    _fresh(device)
    prep = prepare_case(case, device, steps=steps, window=window, **build)
    if isinstance(prep, Row):
        return prep
    _sample(prep, device, steps, window)
    prep.release()
    return prep.row


def _error(c: Case, e: Exception) -> Row:
    return _row(c, status=f"error: {type(e).__name__}: {e}".splitlines()[0][:300])


def _run_or_error(case: Case, device: torch.device, **timing: Any) -> Row:
    """:func:`run_case`, or an ``error:`` row: one failing method must not hide the others' numbers."""
    try:
        return run_case(case, device, **timing)
    except Exception as e:  # noqa: BLE001
        return _error(case, e)


def run_interleaved(
    cases: list[Case],
    device: torch.device,
    *,
    steps: int,
    window: int,
    progress: Callable[[int, Row], None] = lambda i, row: None,
    **build: Any,
) -> list[Row]:
    """Each case timed in turns with the FP case of its group (same model, batch size, mode, K, amp), one pair
    at a time: both built and warmed up, then ``steps`` turns of one sample each (the order alternating), so load
    that drifts on a shared machine falls on both, and sample ``i`` of the case pairs with FP's sample ``i``
    (``ratio_fp_paired``). Only the two are in memory: many models held at once slowed the quantized ones more
    than FP on the CPU. FP's row pools its samples of every pair. ``progress(i, row)`` after each case;
    ``build``: the rest of :func:`prepare_case`'s arguments."""
    timing = dict(steps=steps, window=window, **build)

    def prepared(c: Case) -> Prepared | Row:
        torch._dynamo.utils.counters.clear()
        try:
            return prepare_case(c, device, **timing)
        except Exception as e:  # noqa: BLE001 - one failing method must not hide the others' numbers
            return _error(c, e)

    rows: dict[int, Row] = {}
    fp_of = {_key(c): i for i, c in enumerate(cases) if c.method == FP_METHOD}
    for i, c in enumerate(cases):
        if c.method == FP_METHOD:
            continue
        j = fp_of.get(_key(c, method=FP_METHOD, precision=FP_PRECISION))
        if j is None:
            rows[i] = _row(c, status="skipped: --interleave pairs a case with its FP case, and there is none")
            progress(i, rows[i])
            continue
        _fresh(device)
        q = prepared(c)  # the case first: one that does not build costs no FP build
        fp = prepared(cases[j]) if isinstance(q, Prepared) else None
        if isinstance(q, Row):
            rows[i] = q
        elif isinstance(fp, Row):
            rows.setdefault(j, fp)
            rows[i] = _row(c, status=f"skipped: its FP case did not run ({fp.status})")
            q.release()
        else:
            pair = [fp, q]
            try:
                for turn in range(steps):
                    for p in pair[turn % 2 :] + pair[: turn % 2]:
                        _sample(p, device, 1, window)
            except Exception as e:  # noqa: BLE001 - a pair that fails drops its samples on both sides
                q.row = _error(c, e)
            else:
                q.row.ratio_fp_paired = statistics.median(a / b for a, b in zip(q.row.samples_ms, fp.row.samples_ms))
                fp.row.ratio_fp_paired, fp.row.interleaved, q.row.interleaved = 1.0, True, True
                if j in rows:
                    merge_rounds(rows[j], fp.row)
                else:
                    rows[j] = fp.row
            rows[i] = q.row
            for p in pair:
                p.release()
        progress(i, rows[i])
    for i, c in enumerate(cases):
        if i not in rows:  # an FP case with no case that ran beside it: timed alone
            rows[i] = _run_or_error(c, device, **timing)
        if c.method == FP_METHOD:
            progress(i, rows[i])
    return [rows[i] for i in range(len(cases))]


# ---------------------------------------------------------------------------------------------- grid
def supported(method: str, bits: int, a_bits: int | None = None) -> bool:
    """Whether ``method`` builds at W=``bits``, A=``a_bits`` (default: ``bits``) (cheap: builders create no layers)."""
    try:
        build_method(method, bits, bits if a_bits is None else a_bits, **method_options(method))
    except QreproError:
        return False
    return True


def plan(
    models: list[str],
    methods: list[str],
    batch_sizes: list[int],
    modes: list[str],
    bits: str | None,
    image_size: int = 32,
    members: list[int] | None = None,
    amps: list[str] | None = None,
) -> list[Case]:
    """FP first, then every method at its bit-widths (``--bits``; default 4, APoT 2/3/4), for every model,
    batch size and mode. A method that supports none of its default bit-widths (FP-only regularizers such
    as KURE or SymReg) runs at W32A32, a weight-only one (k-means weight sharing) at W{b}A32; explicitly requested
    bit-widths are kept (and reported as skipped)."""
    per, default = parse_bits(bits)
    precisions = [(FP_METHOD, 32, 32)]  # (method, w_bits, a_bits)
    for q in dict.fromkeys(methods):
        if q == FP_METHOD:
            continue
        want = per.get(q, default)
        ok = [b for b in want if supported(q, b)]
        if not ok and all(supported(q, b, 32) for b in want):  # weight-only, e.g. k-means weight sharing: w{b}a32
            precisions += [(q, b, 32) for b in want]
            continue
        if not ok and q not in per and supported(q, 32):
            ok = [32]
        precisions += [(q, b, b) for b in ok or want]
    members = sorted(set(members or [1]) | {1})  # one run of each case: the reference of "x K sep"
    grid = itertools.product(models, batch_sizes, modes, amps or ["off"], members)
    return [Case(m, q, w, a, b, mode, image_size, k, amp) for m, b, mode, amp, k in grid for q, w, a in precisions]


def _ratio(a: float | None, b: float | None, k: int = 1) -> float | None:
    return a / (k * b) if a and b else None


def add_ratios(rows: list[Row]) -> None:
    measured = {_key(r): r for r in rows if r.step_ms}
    for r in rows:
        if r.step_ms is None:
            continue
        one = measured.get(_key(r, members=1))
        fp = measured.get(_key(r, method=FP_METHOD, precision=FP_PRECISION))
        eager = measured.get(_key(r, method=FP_METHOD, precision=FP_PRECISION, mode="eager"))
        r.separate_step_ms, r.fp_step_ms = one and one.step_ms, fp and fp.step_ms
        r.ratio_separate = _ratio(r.step_ms, r.separate_step_ms, r.members)
        r.ratio_separate_min = _ratio(r.step_ms_min, one and one.step_ms_min, r.members)
        r.ratio_fp = _ratio(r.step_ms, r.fp_step_ms)
        r.ratio_fp_min = _ratio(r.step_ms_min, fp and fp.step_ms_min)
        r.ratio_fp_eager = _ratio(r.step_ms, eager and eager.step_ms)


def merge_rounds(first: Row, later: Row) -> None:
    """Pool the samples of a case measured again in a later round into ``first``."""
    if first.status != "ok" or later.status != "ok":
        if first.status == "ok":
            first.status = later.status
        return
    _add_samples(first, later.samples_ms, later.peak_mem_mb)


def append_to(path: Path, rows: list[Row], runs: list[dict[str, Any]]) -> tuple[list[Row], list[dict[str, Any]]]:
    """Rows of an earlier result file plus ``rows`` (a case measured now replaces its earlier row). Ratios
    are not recomputed: each row keeps the ratio to the FP measured in its own invocation (``fp_step_ms``),
    since every invocation measures FP for each (model, batch size, mode) it runs."""
    if not path.exists():
        return rows, runs
    old = json.loads(path.read_text())
    new = {_key(r) for r in rows}
    kept = [r for r in (Row(**d) for d in old.get("rows", [])) if _key(r) not in new]
    return kept + rows, old.get("runs", []) + runs


# the Markdown table's ratio columns, in order
_RATIO_COLUMNS = "ratio_separate ratio_separate_min ratio_fp ratio_fp_min ratio_fp_paired ratio_fp_eager".split()


def _fmt(v: float | None, spec: str) -> str:
    return "—" if v is None else format(v, spec)


def markdown(meta: dict[str, Any], rows: list[Row], runs: list[dict[str, Any]]) -> str:
    lines = [
        f"# Training-step benchmark — {meta['device']}",
        "",
        f"- device: **{meta['device']}** (`{meta['device_slug']}`)",
        f"- versions: {', '.join(f'{k} {v}' for k, v in meta['versions'].items())}",
        f"- git: {meta['git'].get('commit')} (dirty: {meta['git'].get('dirty')})",
        f"- date: {meta['finished']}; command: `{meta['command']}`",
        f"- timing: {meta['warmup']} warm-up steps, then {meta['steps']} samples of {meta['window']} step(s); "
        f"median per step; "
        + (
            "interleaved: each case timed in turns with its FP case, one pair at a time; "
            if meta.get("interleave")
            else f"{meta['rounds']} round(s) over the whole grid, samples pooled; "
        )
        + f"compile backend {meta['backend']}",
        "- × FP = median step time / FP's, measured in this run (same model, batch size, mode, K, amp); "
        "× FP (min) = fastest sample / FP's fastest sample; × FP (paired) = median over i of sample i / FP's "
        "sample i (`--interleave` only); × FP eager = against FP without compilation.",
        "- K = runs stepped as one batch (`trainer.members`; step ms is the batched step); img/s = all K members; "
        "img/s/member = one member's; × K sep = batched step / (K × one run's step of the same case, this run); "
        "× K sep (min) = the same with the fastest samples (robust to a loaded machine).",
        "- 1st step s = the first warm-up step of the first round (includes compilation; Inductor's on-disk "
        "cache makes it shorter when the same graph was compiled before).",
    ]
    if meta.get("note"):
        lines.append(f"- note: {meta['note']}")
    if meta.get("load_before") or meta.get("load_note"):
        lines.append(
            f"- machine load (1/5/15-min load average): before {meta.get('load_before')}, after "
            f"{meta.get('load_after')}" + (f"; {meta['load_note']}" if meta.get("load_note") else "")
        )
    for r in runs[:-1]:  # earlier invocations merged with --append
        lines.append(f"- also merged: `{r['command']}` ({r.get('finished')}, git {r['git'].get('commit')})")
    lines += [
        "",
        "| model | input | batch | method | bits | mode | K | amp | step ms (median) | min–max | img/s "
        "| img/s/member | × K sep | × K sep (min) | × FP | × FP (min) | × FP (paired) | × FP eager | 1st step s "
        "| graph breaks | CUDA-graph skips | status |",
        "|---|---:|---:|---|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        ratios = " | ".join(_fmt(getattr(r, f), ".2f") for f in _RATIO_COLUMNS)
        skips = r.cudagraph_counters.get("cudagraph_skips", 0) if r.mode != "eager" else "—"
        lines.append(
            f"| {r.model} | {r.image_size} | {r.batch_size} | {r.method} | {r.precision} | {r.mode} | {r.members} | "
            f"{r.amp} | {_fmt(r.step_ms, '.1f')} | {_fmt(r.step_ms_min, '.1f')}–{_fmt(r.step_ms_max, '.1f')} | "
            f"{_fmt(r.images_per_s, '.0f')} | {_fmt(r.member_images_per_s, '.0f')} | {ratios} | "
            f"{_fmt(r.first_step_s, '.1f')} | {_fmt(r.graph_breaks, 'd')} | {skips} | {r.status.replace('|', '/')} |"
        )
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m qrepro.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=",".join(DEFAULT_MODELS), help="comma-separated registered model names")
    p.add_argument("--methods", default="all", help="comma-separated quantizer names, or 'all' (registered)")
    p.add_argument("--exclude", default="", help="comma-separated quantizer names to leave out")
    p.add_argument("--bits", default=None, help="per-method bit-widths (W=A), e.g. 'apot=2,3,4;default=4'")
    p.add_argument("--batch-sizes", default=",".join(map(str, DEFAULT_BATCH_SIZES)))
    p.add_argument("--image-size", type=int, default=32, help="synthetic input size (224 for ImageNet models)")
    p.add_argument("--num-classes", type=int, default=10, help="classifier outputs (1000 for ImageNet)")
    p.add_argument(
        "--modes",
        default=",".join(DEFAULT_MODES),
        help="eager, compiled (= the trainer's fast path: reduce-overhead on CUDA, default on CPU) "
        "or torch.compile mode names",
    )
    p.add_argument(
        "--members",
        default="1",
        help="comma-separated K: K runs (seeds 0..K-1) stepped as one batch (trainer.members); K=1 is always "
        "measured too, as the reference of the ratio to K separate runs",
    )
    p.add_argument("--amp", default="off", help="comma-separated trainer.amp settings: off, bf16, fp16")
    p.add_argument("--load", default="", help="free text: the machine's load during the run (stored with it)")
    p.add_argument("--backend", default="inductor", help="torch.compile backend (inductor; aot_eager for checks)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:1")
    p.add_argument("--warmup", type=int, default=10, help="untimed steps per case (compilation happens here)")
    p.add_argument("--steps", type=int, default=20, help="timed samples per case")
    p.add_argument("--window", type=int, default=5, help="steps per timed sample")
    p.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run the whole grid this many times and pool each case's samples (interleaves the cases, so "
        "drifting load on a shared machine hits FP and the methods alike)",
    )
    p.add_argument(
        "--interleave",
        action="store_true",
        help="time each case in turns with its FP case, one pair at a time (sample i of the case, sample i of FP, "
        "...): the fairest comparison on a noisy machine; adds × FP (paired)",
    )
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--out", default="results/bench", help="output folder")
    p.add_argument("--tag", default="", help="suffix for the output file names")
    p.add_argument(
        "--append",
        action="store_true",
        help="merge into an existing result file (cases measured now replace their earlier rows; ratios stay "
        "against the FP of the same invocation), e.g. to split a GPU grid over several commands",
    )
    p.add_argument("--note", default="", help="free text stored with the results")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.threads:
            torch.set_num_threads(args.threads)
        device = select_device(args.device)
        setup_device(device)
        known = method_names()
        methods = known if args.methods == "all" else _csv(args.methods)
        unknown = [m for m in methods if m not in known]
        if unknown:
            raise QreproError(f"unknown quantizer(s) {', '.join(unknown)}; registered: {', '.join(known)}")
        methods = [m for m in methods if m not in _csv(args.exclude)]
        modes = [resolve_mode(m, device) for m in _csv(args.modes)]
        if "eager" in modes:  # eager first, so the FP-eager reference exists before compiled rows
            modes = ["eager"] + [m for m in modes if m != "eager"]
        if args.image_size < 8 or args.num_classes < 2:
            raise QreproError("--image-size must be >= 8 and --num-classes >= 2")
        batch_sizes = _counts("--batch-sizes", args.batch_sizes)
        amps = [amp_mode(a) for a in _csv(args.amp)] or ["off"]
        members = _counts("--members", args.members)
        cases = plan(_csv(args.models), methods, batch_sizes, modes, args.bits, args.image_size, members, amps)
        if args.interleave and args.rounds != 1:
            raise QreproError("--interleave takes every sample in turns already; leave --rounds at 1")
    except QreproError as e:
        return report(e)
    slug = device_slug(device) + (f"-{args.tag}" if args.tag else "")
    out = Path(args.out)
    meta: dict[str, Any] = {
        "device": device_description(device),
        "device_slug": slug,
        "versions": versions(),
        "git": git_info(),
        "command": "python -m qrepro.bench " + " ".join(sys.argv[1:] if argv is None else argv),
        **{k: getattr(args, k) for k in ("warmup", "steps", "window", "rounds", "interleave", "backend")},
        "threads": torch.get_num_threads(),
        "note": args.note,
        "load_before": _loadavg(),
        "load_note": args.load,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    print(f"benchmark on {meta['device']}: {len(cases)} cases x {args.rounds} round(s)", flush=True)
    timing = {k: getattr(args, k) for k in ("warmup", "steps", "window", "backend", "num_classes")}
    rows: list[Row] = []

    def progress(i: int, r: Row, seconds: float) -> None:
        print(
            f"[{i}/{len(cases) * args.rounds}] {r.model} b{r.batch_size} {r.method} {r.precision} {r.mode} "
            f"K={r.members} amp={r.amp}: {_fmt(r.step_ms, '.1f')} ms/step {_fmt(r.images_per_s, '.0f')} img/s  "
            f"{r.status}  ({seconds:.0f} s)",
            flush=True,
        )

    if args.interleave:
        t0 = time.perf_counter()
        rows = run_interleaved(
            cases, device, progress=lambda i, r: progress(i + 1, r, time.perf_counter() - t0), **timing
        )
    for i, c in enumerate([] if args.interleave else cases * args.rounds, 1):
        t0 = time.perf_counter()
        row = _run_or_error(c, device, **timing)
        if i <= len(cases):
            rows.append(row)
        else:
            merge_rounds(rows[(i - 1) % len(cases)], row)
        progress(i, row, time.perf_counter() - t0)
    add_ratios(rows)
    meta["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    meta["load_after"] = _loadavg()
    runs = [{k: v for k, v in meta.items() if k not in ("device", "device_slug", "versions")}]
    if args.append:
        rows, runs = append_to(out / f"{slug}.json", rows, runs)
    payload = portable({**meta, "runs": runs, "rows": [asdict(r) for r in rows]})  # no machine paths (--out ...)
    write_json_atomic(payload, out / f"{slug}.json")
    (out / f"{slug}.md").write_text(portable_str(markdown(meta, rows, runs)))
    print(f"wrote {out / f'{slug}.json'} and {out / f'{slug}.md'}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
