"""``python -m deqlab [overrides]``: compose the config, train, test, report.

python -m deqlab task=cifar solver=broyden grad=phantom norm=weight_norm
python -m deqlab experiment=cifar_tutorial logger=wandb
python -m deqlab -m solver=anderson,broyden grad=ift,phantom      # a local sweep
python -m deqlab mode=test ckpt_path=outputs/runs/<run>/checkpoints/best.ckpt
"""

from __future__ import annotations

from pathlib import Path

import hydra
import lightning as L
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig, OmegaConf

from deqlab.config import CONF_DIR, check_schemas, register_configs

register_configs()


def run(cfg: DictConfig) -> float | None:
    """Fit and test (or only test) as ``cfg`` says; returns the best monitored metric."""
    check_schemas(cfg)
    if cfg.mode not in ("train", "test"):
        raise ValueError(f"mode must be 'train' or 'test', got {cfg.mode!r}")
    if cfg.mode == "test" and not cfg.ckpt_path:
        raise ValueError("mode=test evaluates a checkpoint: pass ckpt_path=<file.ckpt>")
    L.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.task.datamodule)
    module = instantiate(cfg.task.module)
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c]
    loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values() if c]
    resolved = OmegaConf.to_container(cfg, resolve=True)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config_resolved.yaml").write_text(OmegaConf.to_yaml(resolved))
    for logger in loggers:
        logger.log_hyperparams(resolved)
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers)

    if cfg.mode == "test":
        results = trainer.test(module, datamodule, ckpt_path=cfg.ckpt_path)
        score = results[0].get(cfg.task.monitor.replace("val/", "test/")) if results else None
    else:
        trainer.fit(module, datamodule, ckpt_path=cfg.ckpt_path)
        ckpt = next((c for c in callbacks if isinstance(c, ModelCheckpoint)), None)
        best = ckpt.best_model_path if ckpt is not None and ckpt.best_model_path else None
        trainer.test(module, datamodule, ckpt_path=best or None)
        score = (
            ckpt.best_model_score
            if ckpt is not None
            else trainer.callback_metrics.get(cfg.task.monitor)
        )
    score = None if score is None else float(score)
    tested = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("test/")}
    if trainer.is_global_zero:
        shown = "n/a" if score is None else f"{score:.4f}"
        tests = ", ".join(f"{k}={v:.4f}" for k, v in sorted(tested.items()))
        print(
            f"deqlab: {cfg.mode} done; best {cfg.task.monitor}={shown}; {tests}; outputs in {cfg.output_dir}"
        )
    if any(type(lg).__name__ == "WandbLogger" for lg in loggers):
        import wandb

        wandb.finish()  # each multirun job gets its own W&B run
    return score


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="train")
def main(cfg: DictConfig) -> float | None:
    return run(cfg)


if __name__ == "__main__":
    main()
