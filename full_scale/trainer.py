"""The full-scale training loop: stages, the AdamW -> Muon switch, accumulation, eval, checkpoints.

Plain torchtitan/nanoGPT-style loop around the shared step (``mutransfer.step``). Per step: find
the stage and phase; at the switch stage's first step swap the hidden matrices to Muon; gather
``accumulation`` micro-batches (rows of the global batch picked by rank and micro index, so the
global batch is the same for any data-parallel size); ``train_step`` with every group's LR at
``base_lr x factor(step)``; the divergence rule; log; maybe evaluate and checkpoint. Everything
that decides the numbers is a function of the config, the lock file and the step, so a resumed
run repeats the uninterrupted one exactly.

Before anything is written to the run directory, a start checks what it would resume: the newest
checkpoint that verifies (corrupt ones are reported and skipped), and that its recorded config,
lock and data fingerprints are this run's (``allow_changed_inputs`` overrides, and is recorded).
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import torch

from full_scale import checkpoint
from full_scale import distributed as dist_utils
from full_scale.config import RunConfig
from full_scale.data import Mixture, source_seed
from full_scale.distributed import DistEnv, barrier, grad_sync, mean_across
from full_scale.metrics import MetricsWriter, peak_flops, read_rows
from mutransfer.build import build, configure_model, materialize
from mutransfer.config import ConfigError
from mutransfer.optim import OptimizerSet, build_optimizers, switch_to_muon
from mutransfer.plan import flops_per_token
from mutransfer.rundir import ENVIRONMENT_FILE, environment, read_json, write_json
from mutransfer.specs import spec_of
from mutransfer.step import Diverged, DivergenceGuard, evaluate, train_step


def step_clock(device: torch.device) -> float:
    """The clock a step is timed with (``step_time_s``, ``tokens_per_s``): on CUDA, read once the work
    already queued is done, so a step is charged with its own work only -- not with an optimizer
    switch or a recomputation change queued before it, nor is its own work left running past it.
    Evaluation and checkpoints at a step's end are outside every step's time."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def train(cfg: RunConfig, out: str | Path, quiet: bool = False, from_checkpoint: str | Path | None = None,
          allow_changed_inputs: bool = False) -> dict:
    """Run (or resume) the whole multi-stage run in ``out``; returns a summary.

    ``from_checkpoint``: start a new run from another run's checkpoint (e.g. the AdamW-only
    control branching off at the pre-decay checkpoint); refused once ``out`` has its own.
    """
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    env = dist_utils.setup(cfg.train.device)
    finished = False
    try:
        summary = Trainer(cfg, Path(out), env, quiet, from_checkpoint, allow_changed_inputs).run()
        finished = True
        return summary
    finally:
        dist_utils.teardown(env, finished)


class Trainer:
    def __init__(self, cfg: RunConfig, out: Path, env: DistEnv, quiet: bool,
                 from_checkpoint: str | Path | None = None, allow_changed_inputs: bool = False):
        from mutransfer.precision import available

        self.cfg, self.out, self.env = cfg, out, env
        self.quiet = quiet or not cfg.metrics.progress
        ok, why = available(cfg.train.precision)
        if not ok:
            raise ConfigError(f"train.precision = {cfg.train.precision!r} is not available here: {why}")
        cfg.stages.validate_parallel(env.world_size)
        self.datasets = self._open_datasets()
        self.skipped: list[tuple[str, str]] = []  # (checkpoint, why) of corrupt checkpoints passed over
        checkpoint.clean_partial(out, env)
        self.resumed_from = checkpoint.latest_good(out, env, report=self._report_bad)
        if from_checkpoint is not None and self.resumed_from is not None:
            raise ConfigError(f"--from-checkpoint {from_checkpoint}: {out} already holds checkpoints (newest good: "
                              f"{self.resumed_from.name}); resume it without --from-checkpoint, or use another --out")
        self.branched = from_checkpoint is not None
        if self.branched:
            self.resumed_from = self._check_branch_point(Path(from_checkpoint))
        self.state = {"step": 0, "tokens": 0, "switched_at": None}
        self.changed_inputs: list[str] = []
        kind = cfg.stages.stages[0].optimizer
        saved = None
        if self.resumed_from is not None:
            saved = checkpoint.read_trainer(self.resumed_from)
            self.changed_inputs = self._compare_inputs(saved, allow_changed_inputs)
            self.state = {k: saved[k] for k in self.state}
            kind = saved["optimizer"]
        self.finished = self.state["step"] >= cfg.stages.total_steps
        if self.finished:  # nothing to train, and nothing of the finished run is rewritten
            self.metrics = MetricsWriter(out, False, self.state["step"])
            return
        self.mixtures = {s.name: Mixture(s.mixture, self.datasets, cfg.train.data_seed) for s in cfg.stages.stages}
        rows = cfg.train.eval_micro_batch or cfg.train.eval_batch_size  # evaluation runs in micro-batches
        self.val = [(xs, ys) for x, y in self.datasets[cfg.val_spec].eval_batches(
            "val", batch_size=cfg.train.eval_batch_size, seq_len=cfg.eval_seq_len, max_batches=cfg.train.eval_batches)
            for xs, ys in zip(x.split(rows), y.split(rows), strict=True)]
        self.heldout_warning = self.datasets[cfg.val_spec].short_eval_warning(
            cfg.train.eval_batches, cfg.train.eval_batch_size, cfg.eval_seq_len)

        torch.manual_seed(cfg.train.seed)
        self.spec = spec_of(cfg.shape.model)
        self.inner = self._build_model()
        self.model = self.inner if cfg.parallel.mode == "fsdp" or not env.distributed else \
            dist_utils.wrap(self.inner, env, cfg.parallel.mode)
        self.params = [p for p in self.inner.parameters() if p.requires_grad]
        self.opts = self._optimizers(kind)
        self.guard = DivergenceGuard(cfg.train.diverge_ratio)
        if saved is not None:
            checkpoint.load(self.resumed_from, env, self.inner, self.opts)
            self.guard.load_state_dict(saved.get("divergence", {}))
        self._write_run_files()
        self.metrics = MetricsWriter(out, env.is_main, self.state["step"], cfg.tracking,
                                     run=(out.resolve().name, Path(cfg.path).stem, cfg.to_json()))
        for path, why in self.skipped:
            self.metrics.event(self.state["step"], "checkpoint_skipped", path=path, why=why)
        self.peak = peak_flops(env.device, cfg.metrics.peak_flops)
        self._flops: dict[int, int] = {}

    # --- setup -------------------------------------------------------------------------------
    def _report_bad(self, path: Path, why: str) -> None:
        self.skipped.append((str(path), why))
        print(f"warning: checkpoint {path} is corrupt ({why}); resuming from an older one", file=sys.stderr)

    def _fingerprints(self) -> dict:
        return {spec: ds.fingerprint for spec, ds in self.datasets.items()}

    def _compare_inputs(self, saved: dict, allow: bool) -> list[str]:
        """What differs between the checkpoint's recorded inputs and this run's; refused unless ``allow``."""
        cfg = self.cfg
        changed = []
        # A branch (--from-checkpoint) changes the config on purpose; its lock and data must still match.
        if not self.branched and saved.get("trajectory_fingerprint") != cfg.trajectory_fingerprint():
            changed.append("the config (a trajectory setting) or the hparams lock")
        if saved.get("lock_content_hash", cfg.lock.content_hash) != cfg.lock.content_hash:
            changed.append(f"the hparams lock ({saved.get('lock_content_hash')} -> {cfg.lock.content_hash})")
        recorded = saved.get("data", {}).get("fingerprints", {})
        now = self._fingerprints()
        for spec in sorted(set(recorded) | set(now)):
            if recorded.get(spec) != now.get(spec):
                changed.append(f"data {spec!r} (fingerprint {str(recorded.get(spec))[:12]} -> "
                               f"{str(now.get(spec))[:12]})")
        if changed and not allow:
            raise ConfigError(f"{self.out}: the run in this directory (checkpoint {self.resumed_from.name}) was "
                              f"made with other inputs: {'; '.join(changed)}. Resume with the same config, lock "
                              "and data, use another --out, or pass --allow-changed-inputs (recorded)")
        return changed

    def _write_run_files(self) -> None:
        """config.json and environment.json, once every check has passed (a failed start writes nothing)."""
        barrier(self.env)
        if self.env.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            write_json(self.out / "config.json", self.cfg.to_json())
            write_json(self.out / ENVIRONMENT_FILE, environment(self.env.world_size, str(self.env.device)))
        barrier(self.env)

    def _open_datasets(self) -> dict:
        """Every data spec once; rank 0 first, so the built-in corpus is prepared a single time."""
        from mutransfer.data.builtin import open_dataset

        specs = sorted({s.data for st in self.cfg.stages.stages for s in st.mixture} | {self.cfg.val_spec})
        tokenizer = self.cfg.shape.model.tokenizer
        datasets = {}
        for turn in (True, False):
            if self.env.is_main == turn:
                datasets = {spec: open_dataset(spec, tokenizer, cache_dir=self.cfg.data.cache_dir,
                                               vocab_size=self.cfg.shape.model.vocab_size) for spec in specs}
            barrier(self.env)
        return datasets

    def _check_branch_point(self, path: Path) -> Path:
        """Another run's checkpoint as this run's start: verified, inside the run, same optimizer."""
        if not (path / checkpoint.MANIFEST_FILE).is_file():
            raise ConfigError(f"--from-checkpoint {path}: not a complete checkpoint directory (step_*)")
        problem = checkpoint.verify(path)
        if problem is not None:
            raise ConfigError(f"--from-checkpoint {path}: the checkpoint is corrupt: {problem}")
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

    def _build_model(self):
        """The model on this rank: built on the meta device, FP8 modules swapped in (names kept, so
        the muP roles still apply), sharded (FSDP2), then only this rank's shards allocated and
        initialised (``materialize``): no full model on any rank. Transformer Engine's modules copy
        their weights when swapped in, so under fp8-te the model is built on the device first."""
        from mutransfer.precision import prepare_model

        cfg, env = self.cfg, self.env
        on_meta = cfg.train.precision != "fp8-te" and self.spec.meta_build
        spec, shape = self.spec, cfg.shape.model
        model = build(spec, shape.d_model, shape.n_layers, cfg.shape.param, cfg.hp,
                      device="meta" if on_meta else env.device, seed=cfg.train.seed)
        model = prepare_model(model, cfg.train.precision)
        configure_model(model, cfg.train, spec)
        self.checkpointing = cfg.train.activation_checkpointing
        if env.distributed and cfg.parallel.mode == "fsdp":
            dist_utils.wrap(model, env, "fsdp", precision=cfg.train.precision,
                            blocks=[model.get_submodule(n) for n in spec.block_names(model)])
        if on_meta:
            materialize(model, spec, shape, cfg.shape.param, cfg.hp, env.device, cfg.train.seed)
        return model

    def _optimizers(self, kind: str) -> OptimizerSet:
        switch, param = self.cfg.stages.switch, self.cfg.shape.param.parametrization
        return build_optimizers(self.inner, self.spec, self.cfg.shape.model, self.cfg.shape.param, self.cfg.hp, kind,
                                fuse=switch.fuse_for(param))

    # --- the loop ----------------------------------------------------------------------------
    def run(self) -> dict:
        from tqdm import tqdm

        cfg, env = self.cfg, self.env
        plan = cfg.stages
        summary_path = self.out / "summary.json"
        if self.finished:
            self.metrics.close()
            if env.is_main:
                print(f"{self.out}: the run is already finished (step {self.state['step']}); nothing to do",
                      file=sys.stderr)
            return read_json(summary_path, "run summary") if summary_path.is_file() else {"steps": plan.total_steps}
        schedule = plan.schedule()
        start = self.state["step"]
        self.metrics.event(start, "resume" if self.resumed_from else "start",
                           branched=self.branched,
                           checkpoint=str(self.resumed_from) if self.resumed_from else None,
                           changed_inputs=self.changed_inputs or None,
                           world_size=env.world_size, parallel=cfg.parallel.mode if env.distributed else None,
                           recipe_choices=cfg.recipe_choices())
        if env.is_main:
            for note in self._lock_notes():
                print(f"note: {note}", file=sys.stderr)
        for warning in cfg.lr_correction.get("warnings", []):  # an applied law past its data, or not passed
            self.metrics.event(start, "warning", message=warning["message"])
            if env.is_main:
                print(f"warning: {warning['message']}", file=sys.stderr)
        if self.heldout_warning:
            self.metrics.event(start, "warning", message=self.heldout_warning)
            if env.is_main:
                print(self.heldout_warning, file=sys.stderr)
        bar = tqdm(total=plan.total_steps, initial=start, file=sys.stderr, dynamic_ncols=True,
                   disable=self.quiet or not env.is_main, mininterval=0.5)
        last = {}
        try:
            for step in range(start, plan.total_steps):
                last = self._train_step(step, schedule)
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
            write_json(summary_path, summary)
        return summary

    def _lock_notes(self) -> list[str]:
        """Where the config's residual multipliers replace other values of the lock (recorded, and said)."""
        notes = []
        for r in self.cfg.recipe_choices()["residual"].values():
            if r["from"].startswith("residual.") and r["alpha"] != r["lock_alpha"]:
                notes.append(f"{r['from']} = {r['alpha']} (the config) is used; the lock has {r['lock_alpha']} "
                             f"(--set {r['from']}='lock' takes the lock's)")
        return notes

    def _switch(self, step: int, stage) -> None:
        cfg = self.cfg
        switch, param = cfg.stages.switch, cfg.shape.param.parametrization
        restart, fuse = switch.restart_for(param), switch.fuse_for(param)
        self.opts = switch_to_muon(self.inner, self.spec, cfg.shape.model, cfg.shape.param, cfg.hp, self.opts,
                                   carry_momentum=switch.carry_momentum, restart=restart, fuse=fuse)
        self.state["switched_at"] = step
        self.metrics.event(step, "switch", to="muon", stage=stage.name, carry_momentum=switch.carry_momentum,
                           restart=restart, restart_from=switch.restart_source(param),
                           muon_fuse=fuse, muon_fuse_from=switch.fuse_source(param),
                           muon_params=[n for g in self.opts.optimizers["muon"].param_groups for n in g["names"]])

    def _train_step(self, step: int, schedule) -> dict:
        cfg, env = self.cfg, self.env
        stage_index, stage = cfg.stages.stage_at(step)
        phase_index, phase = stage.phase_at(step)
        policy = stage.policy(phase, cfg.train.activation_checkpointing)
        if self.checkpointing != policy:  # this phase's recomputation (plain attributes)
            self.inner.set_activation_checkpointing(policy)
            self.checkpointing = policy
        switched = stage.optimizer == "muon" and self.opts.kind == "adamw"
        if switched:
            self._switch(step, stage)
        t0 = step_clock(env.device)
        accum = phase.accumulation(env.world_size)
        mixture = self.mixtures[stage.name]
        micro = []
        for k in range(accum):
            first_row = (env.rank * accum + k) * phase.micro_batch
            x, y = mixture.batch(step, phase.global_batch, phase.seq_len,
                                 slice(first_row, first_row + phase.micro_batch))
            micro.append((x.to(env.device, non_blocking=True), y.to(env.device, non_blocking=True)))
        out = train_step(self.model, self.opts, micro, params=self.params, precision=cfg.train.precision,
                         device_type=env.device.type, grad_clip=cfg.hp.grad_clip,
                         lr_factor=lambda peak: schedule.factor(step, peak),
                         sync=lambda last: grad_sync(self.model, last), reduce=lambda v: mean_across(env, v),
                         loss_of=self.spec.loss)
        seconds = step_clock(env.device) - t0

        self.state["tokens"] += phase.tokens_per_step
        tokens_per_s = phase.tokens_per_step / seconds
        row = {
            "step": step, "stage": stage.name, "stage_index": stage_index, "phase": phase_index,
            "optimizer": self.opts.kind, "switch": switched, "loss": out.loss, "checkpointing": policy,
            "lr": self.opts.lrs_by_role(), "lr_factor": schedule.factor(step, cfg.stages.hidden_peak_lr),
            "grad_norm": out.grad_norm,
            "global_batch": phase.global_batch, "micro_batch": phase.micro_batch, "accumulation": accum,
            "dp_size": env.world_size, "seq_len": phase.seq_len, "tokens_per_step": phase.tokens_per_step,
            "tokens": self.state["tokens"], "step_time_s": seconds, "tokens_per_s": tokens_per_s,
            "mfu": self._mfu(phase.seq_len, tokens_per_s),
            "mixture_rows": mixture.counts(step, phase.global_batch),
        }
        try:
            self.guard.check(step, out.loss, stage.name)
        except Diverged:
            self.metrics.row(row)
            raise
        done = step + 1
        if done % cfg.train.eval_every == 0 or done == stage.end_step:
            row["val_loss"] = self._evaluate()
        self.metrics.row(row)
        every = cfg.checkpoint.every
        if (every and done % every == 0) or (cfg.checkpoint.at_stage_end and done == stage.end_step) \
                or done == cfg.stages.total_steps:
            self._save(done, stage_index, stage_end=done == stage.end_step)
        return row

    def _evaluate(self) -> float:
        """Held-out loss over fixed windows; every rank runs the same batches (FSDP needs all ranks)."""
        try:
            return evaluate(self.model, self.val, precision=self.cfg.train.precision, device=self.env.device,
                            loss_of=self.spec.loss).loss
        except Diverged:
            return math.nan

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
                     "fingerprints": self._fingerprints()},
            "trajectory_fingerprint": cfg.trajectory_fingerprint(),
            "lock_content_hash": cfg.lock.content_hash,
            "divergence": self.guard.state_dict(),
        }
        path = checkpoint.save(self.out, self.env, self.inner, self.opts, trainer, cfg.checkpoint.keep,
                               keep_stage_ends=cfg.checkpoint.keep_stage_ends)
        # recorded at the last step it covers, so a resume from it keeps the event
        self.metrics.event(next_step - 1, "checkpoint", path=str(path), next_step=next_step,
                           optimizer=self.opts.kind)
