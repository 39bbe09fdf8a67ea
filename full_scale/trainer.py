"""The full-scale training loop: stages, the AdamW -> Muon switch, accumulation, eval, checkpoints.

Plain torchtitan/nanoGPT-style loop. Per step: find the stage and phase; at the switch stage's
first step swap the hidden matrices to Muon; set every group's LR to ``base_lr x factor(step)``;
run ``accumulation`` micro-batches (rows of the global batch picked by rank and micro index, so
the global batch is the same for any data-parallel size); clip; step; log; maybe evaluate and
checkpoint. Everything that decides the numbers is a function of the config, the lock file and
the step, so a resumed run repeats the uninterrupted one exactly.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import torch

from full_scale import checkpoint
from full_scale import distributed as dist_utils
from full_scale.config import RunConfig
from full_scale.data import Mixture, source_seed
from full_scale.distributed import DistEnv, barrier, clip_grad_norm, grad_sync, mean_across
from full_scale.metrics import MetricsWriter, environment, peak_flops, read_rows, write_json
from full_scale.muon import use_gathered_muon
from mutransfer.build import build_model
from mutransfer.config import ConfigError
from mutransfer.model import loss_fn
from mutransfer.optim import OptimizerSet, build_optimizers, switch_to_muon
from mutransfer.plan import flops_per_token
from mutransfer.training import Diverged


def train(cfg: RunConfig, out: str | Path, quiet: bool = False, from_checkpoint: str | Path | None = None
          ) -> dict:
    """Run (or resume) the whole multi-stage run in ``out``; returns a summary.

    ``from_checkpoint``: start a new run from another run's checkpoint (e.g. the AdamW-only
    control branching off at the pre-decay checkpoint); ignored once ``out`` has its own.
    """
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    env = dist_utils.setup(cfg.train.device)
    try:
        return Trainer(cfg, Path(out), env, quiet, from_checkpoint).run()
    finally:
        dist_utils.teardown(env)


class Trainer:
    def __init__(self, cfg: RunConfig, out: Path, env: DistEnv, quiet: bool,
                 from_checkpoint: str | Path | None = None):
        from mutransfer.precision import available, prepare_model

        self.cfg, self.out, self.env = cfg, out, env
        self.quiet = quiet or not cfg.metrics.progress
        ok, why = available(cfg.train.precision)
        if not ok:
            raise ConfigError(f"train.precision = {cfg.train.precision!r} is not available here: {why}")
        cfg.stages.validate_parallel(env.world_size)
        self.datasets = self._open_datasets()
        self._prepare_out_dir()
        self.mixtures = {s.name: Mixture(s.mixture, self.datasets, cfg.train.data_seed)
                         for s in cfg.stages.stages}
        self.val = self.datasets[cfg.val_spec].eval_batches(
            "val", batch_size=cfg.train.eval_batch_size, seq_len=cfg.eval_seq_len,
            max_batches=cfg.train.eval_batches)

        torch.manual_seed(cfg.train.seed)
        model = build_model(cfg.shape, cfg.hp, device=env.device, seed=cfg.train.seed)
        self.inner = prepare_model(model, cfg.train.precision)  # names kept: the muP roles still apply
        self.model = dist_utils.wrap(self.inner, env, cfg.parallel.mode)
        self.params = [p for p in self.inner.parameters() if p.requires_grad]

        checkpoint.clean_partial(out, env)
        self.resumed_from = checkpoint.latest(out)
        self.branched = self.resumed_from is None and from_checkpoint is not None
        if self.branched:
            self.resumed_from = self._check_branch_point(Path(from_checkpoint))
        self.state = {"step": 0, "tokens": 0, "switched_at": None}
        kind = cfg.stages.stages[0].optimizer
        if self.resumed_from is not None:
            saved = checkpoint.read_trainer(self.resumed_from)
            self.state = {k: saved[k] for k in self.state}
            kind = saved["optimizer"]
        self.opts = self._optimizers(kind)
        if self.resumed_from is not None:
            checkpoint.load(self.resumed_from, env, self.inner, self.opts)
        self.metrics = MetricsWriter(out, env.is_main, self.state["step"], cfg.metrics.tensorboard)
        self.peak = peak_flops(env.device, cfg.metrics.peak_flops)
        self._flops: dict[int, int] = {}

    # --- setup -------------------------------------------------------------------------------
    def _prepare_out_dir(self) -> None:
        """config.json and env.json; refuse to resume a directory trained with another config.

        Every rank checks (so all fail together); rank 0 writes.
        """
        cfg, out = self.cfg, self.out
        existing = out / "config.json"
        if existing.is_file():
            old = json.loads(existing.read_text())
            if old.get("trajectory_fingerprint") != cfg.trajectory_fingerprint():
                changed = sorted(k for k in set(old.get("config", {})) | set(cfg.raw)
                                 if old.get("config", {}).get(k) != cfg.raw.get(k))
                raise ConfigError(f"{out} holds a run with a different config or lock file (differs in "
                                  f"{changed or ['the hparams lock']}); resume it with the same config, "
                                  "or use another --out")
        barrier(self.env)
        if self.env.is_main:
            out.mkdir(parents=True, exist_ok=True)
            write_json(existing, cfg.to_json())
            write_json(out / "env.json", environment(self.env.world_size, self.env.device))
        barrier(self.env)

    def _open_datasets(self) -> dict:
        """Every data spec once; rank 0 first, so the built-in corpus is prepared a single time."""
        from mutransfer.data.builtin import open_dataset

        specs = sorted({s.data for st in self.cfg.stages.stages for s in st.mixture} | {self.cfg.val_spec})
        tokenizer = self.cfg.shape.model.tokenizer
        datasets = {}
        for turn in (True, False):
            if self.env.is_main == turn:
                datasets = {spec: open_dataset(spec, tokenizer, cache_dir=self.cfg.data.cache_dir)
                            for spec in specs}
            barrier(self.env)
        return datasets

    def _check_branch_point(self, path: Path) -> Path:
        """Another run's checkpoint as this run's start: complete, inside the run, same optimizer."""
        if not (path / ".metadata").is_file() or not (path / checkpoint.TRAINER_FILE).is_file():
            raise ConfigError(f"--from-checkpoint {path}: not a complete checkpoint directory (step_*)")
        saved = checkpoint.read_trainer(path)
        plan = self.cfg.stages
        if not 0 < saved["step"] < plan.total_steps:
            raise ConfigError(f"--from-checkpoint {path}: its step {saved['step']} is outside this run's "
                              f"{plan.total_steps} steps")
        wanted = plan.stage_at(saved["step"] - 1)[1].optimizer
        if saved["optimizer"] != wanted:
            raise ConfigError(f"--from-checkpoint {path}: saved with {saved['optimizer']} for the hidden "
                              f"matrices but this config has {wanted} at step {saved['step'] - 1}")
        return path

    def _optimizers(self, kind: str) -> OptimizerSet:
        return use_gathered_muon(build_optimizers(self.inner, self.cfg.shape, self.cfg.hp, kind))

    # --- the loop ----------------------------------------------------------------------------
    def run(self) -> dict:
        from tqdm import tqdm

        cfg, env = self.cfg, self.env
        plan = cfg.stages
        schedule = plan.schedule()
        start = self.state["step"]
        self.metrics.event(start, "resume" if self.resumed_from else "start",
                           branched=self.branched,
                           checkpoint=str(self.resumed_from) if self.resumed_from else None,
                           world_size=env.world_size, parallel=cfg.parallel.mode if env.distributed else None)
        bar = tqdm(total=plan.total_steps, initial=start, file=sys.stderr, dynamic_ncols=True,
                   disable=self.quiet or not env.is_main, mininterval=0.5)
        last = {}
        try:
            for step in range(start, plan.total_steps):
                last = self._train_step(step, schedule.factor(step))
                bar.set_postfix(stage=last["stage"], opt=last["optimizer"], loss=f"{last['loss']:.4f}",
                                refresh=False)
                bar.update(1)
        finally:
            bar.close()
            self.metrics.close()
        summary = {"steps": plan.total_steps, "tokens": self.state["tokens"], "out": str(self.out),
                   "resumed_from": str(self.resumed_from) if self.resumed_from else None,
                   "switched_at": self.state["switched_at"], "final_loss": last.get("loss")}
        if env.is_main:
            vals = [r["val_loss"] for r in read_rows(self.out / "metrics.jsonl") if "val_loss" in r]
            summary["final_val_loss"] = vals[-1] if vals else None
            write_json(self.out / "summary.json", summary)
        return summary

    def _train_step(self, step: int, lr_factor: float) -> dict:
        cfg, env = self.cfg, self.env
        stage_index, stage = cfg.stages.stage_at(step)
        phase_index, phase = stage.phase_at(step)
        switched = False
        if stage.optimizer == "muon" and self.opts.kind == "adamw":
            self.opts = use_gathered_muon(switch_to_muon(self.inner, cfg.shape, cfg.hp, self.opts,
                                                         carry_momentum=cfg.stages.switch.carry_momentum))
            self.state["switched_at"] = step
            switched = True
            self.metrics.event(step, "switch", to="muon", stage=stage.name,
                               carry_momentum=cfg.stages.switch.carry_momentum,
                               muon_params=[n for g in self.opts.optimizers["muon"].param_groups
                                            for n in g["names"]])
        self.opts.set_lr_factor(lr_factor)

        t0 = time.perf_counter()
        accum = phase.accumulation(env.world_size)
        mixture = self.mixtures[stage.name]
        loss_sum = torch.zeros((), device=env.device)
        for k in range(accum):
            first_row = (env.rank * accum + k) * phase.micro_batch
            rows = slice(first_row, first_row + phase.micro_batch)
            x, y = mixture.batch(step, phase.global_batch, phase.seq_len, rows)
            x, y = x.to(env.device, non_blocking=True), y.to(env.device, non_blocking=True)
            with grad_sync(self.model, k == accum - 1):
                with self._autocast():
                    loss = loss_fn(self.model(x), y) / accum
                loss.backward()
            loss_sum += loss.detach()
        grad_norm = clip_grad_norm(self.params, cfg.hp.grad_clip)
        self.opts.step()
        self.opts.zero_grad()
        loss_value = mean_across(env, loss_sum).item()
        seconds = time.perf_counter() - t0

        self.state["tokens"] += phase.tokens_per_step
        tokens_per_s = phase.tokens_per_step / seconds
        row = {
            "step": step, "stage": stage.name, "stage_index": stage_index, "phase": phase_index,
            "optimizer": self.opts.kind, "switch": switched, "loss": loss_value,
            "lr": self.opts.lrs_by_role(), "lr_factor": lr_factor, "grad_norm": float(grad_norm),
            "global_batch": phase.global_batch, "micro_batch": phase.micro_batch, "accumulation": accum,
            "dp_size": env.world_size, "seq_len": phase.seq_len, "tokens_per_step": phase.tokens_per_step,
            "tokens": self.state["tokens"], "step_time_s": seconds, "tokens_per_s": tokens_per_s,
            "mfu": self._mfu(phase.seq_len, tokens_per_s),
            "mixture_rows": mixture.counts(step, phase.global_batch),
        }
        if not math.isfinite(loss_value):
            self.metrics.row(row)
            raise Diverged(f"training loss is {loss_value} at step {step} (stage {stage.name})")
        done = step + 1
        if done % cfg.train.eval_every == 0 or done == stage.end_step:
            row["val_loss"] = self._evaluate()
        self.metrics.row(row)
        every = cfg.checkpoint.every
        if (every and done % every == 0) or (cfg.checkpoint.at_stage_end and done == stage.end_step) \
                or done == cfg.stages.total_steps:
            self._save(done, stage_index, stage_end=done == stage.end_step)
        return row

    def _autocast(self):
        from mutransfer.precision import autocast

        return autocast(self.cfg.train.precision, self.env.device.type)

    @torch.no_grad()
    def _evaluate(self) -> float:
        """Held-out loss over fixed windows; every rank runs the same batches (FSDP needs all ranks)."""
        self.model.eval()
        total, count = 0.0, 0
        for x, y in self.val:
            x, y = x.to(self.env.device), y.to(self.env.device)
            with self._autocast():
                total += loss_fn(self.model(x), y).item() * x.shape[0]
            count += x.shape[0]
        self.model.train()
        return total / count

    def _mfu(self, seq_len: int, tokens_per_s: float) -> float | None:
        if self.peak is None:
            return None
        if seq_len not in self._flops:
            self._flops[seq_len] = flops_per_token(self.cfg.shape, seq_len)
        return self._flops[seq_len] * tokens_per_s / (self.peak * self.env.world_size)

    def _save(self, next_step: int, stage_index: int, stage_end: bool) -> None:
        cfg = self.cfg
        stage = cfg.stages.stages[stage_index]
        trainer = {
            **self.state, "step": next_step, "stage": stage.name, "stage_index": stage_index,
            "optimizer": self.opts.kind, "world_size": self.env.world_size, "stage_end": stage_end,
            "data": {"data_seed": cfg.train.data_seed, "next_step": next_step,
                     "source_seeds": {s.name: source_seed(cfg.train.data_seed, s) for s in stage.mixture},
                     "fingerprints": {spec: ds.fingerprint for spec, ds in self.datasets.items()}},
            "trajectory_fingerprint": cfg.trajectory_fingerprint(),
        }
        path = checkpoint.save(self.out, self.env, self.inner, self.opts, trainer, cfg.checkpoint.keep,
                               keep_stage_ends=cfg.checkpoint.keep_stage_ends)
        # recorded at the last step it covers, so a resume from it keeps the event
        self.metrics.event(next_step - 1, "checkpoint", path=str(path), next_step=next_step,
                           optimizer=self.opts.kind)
