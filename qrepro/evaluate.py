"""Evaluate a checkpoint: ``python -m qrepro.evaluate +experiment=<name> init_from=<checkpoint> [dataset.root=...]``.

Builds the experiment's (quantized) model, loads the checkpoint (ours, a plain state_dict, or a foreign format
with a registered converter such as the APoT authors' release), evaluates on the test split and prints one
final line ``top1=<percent> top5=<percent>``.
"""

from __future__ import annotations

from omegaconf import DictConfig

from qrepro.builders import build_data_from_cfg, build_model_and_method, init_model, select_device
from qrepro.cli import hydra_entry
from qrepro.engine.loop import evaluate
from qrepro.errors import QreproError


def evaluate_checkpoint(cfg: DictConfig) -> dict[str, float]:
    if not cfg.init_from:
        raise QreproError("evaluate needs a checkpoint: add init_from=<path to .pt/.pth/.pth.tar>")
    device = select_device(cfg.trainer.device)
    data = build_data_from_cfg(cfg, device)
    model, _ = build_model_and_method(cfg, data.num_classes)
    init_model(model, cfg.init_from, strict=bool(cfg.init_strict))
    model.to(device)
    return evaluate(model, data.test)


def _task(cfg: DictConfig) -> None:
    m = evaluate_checkpoint(cfg)
    print(f"top1={m['test_top1']:.2f} top5={m['test_top5']:.2f}", flush=True)


def main() -> None:
    hydra_entry(_task, "evaluate")


if __name__ == "__main__":
    main()
