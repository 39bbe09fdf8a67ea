"""The sweep engine: a study in shared storage, worker processes that pull trials, and the trial.

The main process checks the spec and the data, creates (or reopens) the study, writes the
directory's self-description, starts N worker processes and shows progress until they end, then
exports trials.parquet and the plots. Workers pull trials one at a time under the budget lock, so
the study holds exactly ``trials`` trials (plus retries of trials whose worker died), whatever
the number of workers or machines.

A trial: sample base hyperparameters, train the proxy ``seeds`` times (same seeds for every trial:
common random numbers make trials comparable), report held-out losses to the pruner, and score
the mean over seeds of the mean of the last ``last_evals`` held-out losses.
Outcomes: COMPLETE; PRUNED by the pruner or for divergence (NaN/inf/exploding loss), reason
stored; FAIL on an exception, message stored; FAIL by heartbeat when the worker died, retried once.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
import traceback
import warnings
import zlib
from pathlib import Path

import optuna
from optuna.trial import TrialState

from mutransfer.config import ConfigError, HParams, from_mapping
from mutransfer.training import Diverged, train_proxy
from proxy_sweeps import storage as st
from proxy_sweeps.spec import HPARAM_FIELDS, SweepSpec, grid_size, load_spec, resolved, spec_from_mapping

CONFIG_FILE = "config.json"
STORAGE_ENV = "MUTRANSFER_SWEEP_STORAGE"  # the full storage URL (with password) for workers
RETRY_ATTR = "failed_trial"  # set by RetryHeartbeatStaleTrialCallback on a retry

# We drive ask/tell ourselves (the budget lock needs it) and run the heartbeat thread ourselves.
warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")
optuna.logging.set_verbosity(optuna.logging.WARNING)  # our progress line and worker logs say it all


# ---------------------------------------------------------------- study, sampler, pruner


def make_sampler(spec: SweepSpec, worker_seed: int) -> optuna.samplers.BaseSampler:
    s = spec.sampler
    if s.kind == "tpe":
        return optuna.samplers.TPESampler(seed=worker_seed, n_startup_trials=s.n_startup_trials,
                                          multivariate=s.multivariate, constant_liar=True)
    if s.kind == "random":
        return optuna.samplers.RandomSampler(seed=worker_seed)
    if s.kind == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=worker_seed, n_startup_trials=s.n_startup_trials)
    if s.kind == "gp":
        return optuna.samplers.GPSampler(seed=worker_seed, n_startup_trials=s.n_startup_trials)
    if s.kind == "grid":
        return _GridSampler({p.name: list(p.choices) for p in spec.search}, seed=worker_seed)
    raise ConfigError(f"sampler.kind = {s.kind!r} is not allowed")


class _GridSampler(optuna.samplers.GridSampler):
    """GridSampler that does not call study.stop() (our loop, not optimize(), ends the sweep)."""

    def after_trial(self, study, trial, state, values) -> None:
        pass


def make_pruner(spec: SweepSpec) -> optuna.pruners.BasePruner:
    p = spec.pruner
    if p.kind == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=p.min_resource or spec.train.eval_every,
                                              max_resource=spec.max_step, reduction_factor=p.reduction_factor)
    if p.kind == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=p.n_startup_trials, n_warmup_steps=p.n_warmup_steps)
    return optuna.pruners.NopPruner()


def worker_seed(spec: SweepSpec, url: str, index: int) -> int:
    """Distinct seeds per worker (else two workers draw the same startup points); on a shared
    database the host name is mixed in, since every machine numbers its workers from 0."""
    seed = spec.sampler.seed + index
    if st.journal_path(url) is None and not url.startswith("sqlite"):
        import socket

        seed += 1000 * (zlib.crc32(socket.gethostname().encode()) % 100_000)
    return seed


def open_study(spec: SweepSpec, url: str, name: str, storage, create: bool = False,
               worker_index: int = 0) -> optuna.Study:
    """Create or reopen the study; refuse one whose definition differs from this spec."""
    sampler, pruner = make_sampler(spec, worker_seed(spec, url, worker_index)), make_pruner(spec)
    if create:
        study = optuna.create_study(study_name=name, storage=storage, direction="minimize",
                                    sampler=sampler, pruner=pruner, load_if_exists=True)
        defined = study.user_attrs.get("definition_hash")
        if defined is None:
            study.set_user_attr("definition_hash", spec.definition_hash())
            study.set_user_attr("spec", json.loads(json.dumps(spec.raw, default=str)))
        elif defined != spec.definition_hash():
            raise ConfigError(f"--study {name!r}: the study in {st.redact(url)} was created from a different "
                              "sweep definition; pass another --study name or --out directory")
        return study
    return optuna.load_study(study_name=name, storage=storage, sampler=sampler, pruner=pruner)


# ---------------------------------------------------------------- the trial


def suggest(trial: optuna.Trial, spec: SweepSpec) -> dict:
    params = {}
    for p in spec.search:
        if p.choices is not None:
            params[p.name] = trial.suggest_categorical(p.name, list(p.choices))
        elif p.is_int:
            params[p.name] = trial.suggest_int(p.name, int(p.low), int(p.high), step=int(p.step or 1))
        else:
            params[p.name] = trial.suggest_float(p.name, p.low, p.high, log=p.log, step=p.step)
    return params


def trial_settings(spec: SweepSpec, params: dict, device: str):
    """Base hyperparameters and training budget of a trial with ``params``."""
    hp_values = {k: float(v) for k, v in params.items() if k in HPARAM_FIELDS}
    hp = from_mapping(HParams, {**dataclasses.asdict(spec.hparams), **hp_values}, "trial").validate("trial")
    train_values = {k: int(v) for k, v in params.items() if k not in HPARAM_FIELDS}
    tc = dataclasses.replace(spec.train, device=device, **train_values)
    return hp, tc


def run_trial(trial: optuna.Trial, spec: SweepSpec, dataset, device: str) -> tuple[TrialState, float | None]:
    """Train the proxy ``seeds`` times; returns the trial's state and value. Never raises an Exception."""
    start = time.perf_counter()
    tokens = 0
    seed_values: list[float] = []

    def on_step(step: int, loss: float) -> None:
        nonlocal tokens
        tokens += tc.tokens_per_step

    state, value, reason = TrialState.COMPLETE, None, None
    try:
        params = suggest(trial, spec)
        hp, train = trial_settings(spec, params, device)
        for i in range(spec.objective.seeds):
            tc = dataclasses.replace(train, seed=train.seed + i, data_seed=train.data_seed + i)
            offset = i * train.steps

            def on_eval(step: int, val: float, offset=offset) -> None:
                trial.report(val, offset + step)
                # Never prune at the last report: the run is done, its result is worth keeping.
                if offset + step < spec.max_step and trial.should_prune():
                    raise optuna.TrialPruned(f"pruned by {spec.pruner.kind} at step {offset + step} "
                                             f"(held-out loss {val:.4f})")

            result = train_proxy(spec.shape, hp, tc, dataset, on_eval=on_eval, on_step=on_step)
            seed_values.append(result.final_val(spec.objective.last_evals))
        value = statistics.fmean(seed_values)
        if not math.isfinite(value):
            state, reason = TrialState.PRUNED, f"diverged: objective is {value}"
    except Diverged as e:
        state, reason = TrialState.PRUNED, f"diverged: {e.reason}"
    except optuna.TrialPruned as e:
        state, reason = TrialState.PRUNED, str(e) or "pruned"
    except Exception as e:  # noqa: BLE001 -- any error is the trial's outcome, stored, not the worker's end
        state, reason = TrialState.FAIL, f"{type(e).__name__}: {e}"
        trial.set_user_attr("traceback", traceback.format_exc()[-4000:])
    trial.set_user_attr("reason", reason)
    trial.set_user_attr("seed_values", seed_values)
    trial.set_user_attr("tokens", tokens)
    trial.set_user_attr("seconds", round(time.perf_counter() - start, 3))
    if state != TrialState.COMPLETE:
        value = None
    return state, value


class Heartbeat:
    """Records the trial's heartbeat every interval from a thread while the trial trains."""

    def __init__(self, storage, trial_id: int, interval: float):
        self.storage, self.trial_id, self.interval = storage, trial_id, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.storage.record_heartbeat(self.trial_id)
            except Exception as e:  # noqa: BLE001 -- a missed beat is retried next interval
                print(f"heartbeat failed: {e}", file=sys.stderr)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


# ---------------------------------------------------------------- the worker loop


def budget_used(trials) -> int:
    """Trials that count against the budget: all but the retries of a lost trial."""
    return sum(1 for t in trials if RETRY_ATTR not in t.system_attrs)


def fail_stale(study: optuna.Study, storage, grace_period: int) -> None:
    """Fail running trials whose heartbeat stopped (reason stored) and queue their one retry."""
    callback = storage.get_heartbeat_stale_trial_callback()
    for trial_id in storage._get_stale_trial_ids(study._study_id):
        try:
            storage.set_trial_user_attr(trial_id, "reason", f"worker lost: no heartbeat for over {grace_period}s "
                                                            "(killed or hung)")
            if not storage.set_trial_state_values(trial_id, TrialState.FAIL):
                continue
        except optuna.exceptions.UpdateFinishedTrialError:
            continue
        frozen = copy.deepcopy(storage.get_trial(trial_id))
        print(f"trial {frozen.number}: worker lost; failed, retry queued", file=sys.stderr)
        if callback is not None:
            callback(study, frozen)


def next_trial(study: optuna.Study, storage, url: str, name: str, n_trials: int, grace_period: int):
    """Under the budget lock: a trial to run, "wait" while others run, or None when done."""
    with st.budget_lock(url, storage, name):
        fail_stale(study, storage, grace_period)
        trials = study.get_trials(deepcopy=False)
        waiting = any(t.state == TrialState.WAITING for t in trials)
        if waiting or budget_used(trials) < n_trials:
            trial = study.ask()
            storage.record_heartbeat(trial._trial_id)
            return trial
        if any(t.state == TrialState.RUNNING for t in trials):
            return "wait"  # stay to fail and retry a trial whose worker dies
        return None


def _terminate(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def work(out_dir: str | Path, index: int, threads: int | None = None, storage_url: str | None = None) -> int:
    """One worker process: pull trials until the budget is spent."""
    import torch

    from mutransfer.data.builtin import open_dataset

    signal.signal(signal.SIGTERM, _terminate)
    cfg = json.loads((Path(out_dir) / CONFIG_FILE).read_text())
    spec = spec_from_mapping(cfg["spec"])
    url = storage_url or os.environ.get(STORAGE_ENV) or cfg["storage"]
    if threads:
        torch.set_num_threads(threads)
    device = cfg.get("device") or "cpu"
    hb, grace = spec.sweep.heartbeat_interval, spec.sweep.grace_period
    storage = st.open_storage(url, hb, grace)
    study = open_study(spec, url, cfg["study"], storage, worker_index=index)
    dataset = open_dataset(spec.data.spec, spec.shape.model.tokenizer)
    retry = storage.get_heartbeat_stale_trial_callback()  # one retry, as for a lost worker
    tag = f"{os.uname().nodename}:{os.getpid()}"
    while True:
        trial = next_trial(study, storage, url, cfg["study"], cfg["trials"], grace)
        if trial is None:
            return 0
        if trial == "wait":
            time.sleep(hb)
            continue
        system_attrs = storage.get_trial_system_attrs(trial._trial_id)
        trial.set_user_attr("worker", tag)
        trial.set_user_attr("retry_of", system_attrs.get(RETRY_ATTR))
        try:
            with Heartbeat(storage, trial._trial_id, hb):
                state, value = run_trial(trial, spec, dataset, device)
            frozen = study.tell(trial, value, state=state) if value is not None else study.tell(trial, state=state)
        except KeyboardInterrupt:  # stopped by the user: record it and queue the retry for the next run
            with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):
                trial.set_user_attr("reason", "interrupted (SIGINT/SIGTERM); retried on the next run")
                retry(study, study.tell(trial, state=TrialState.FAIL))
            return 130
        except optuna.exceptions.UpdateFinishedTrialError:
            # Our heartbeat lapsed (a stall longer than the grace period): another worker failed
            # this trial and queued its retry, so this result is dropped, not recorded twice.
            print(f"trial {trial.number}: already failed by heartbeat elsewhere; result dropped", file=sys.stderr)
            continue
        print(f"trial {frozen.number}: {frozen.state.name} value={value} reason={frozen.user_attrs.get('reason')}",
              file=sys.stderr, flush=True)


# ---------------------------------------------------------------- the main process


def state_counts(trials) -> dict:
    counts = {s: 0 for s in ("complete", "pruned", "fail", "running", "waiting")}
    for t in trials:
        counts[t.state.name.lower()] = counts.get(t.state.name.lower(), 0) + 1
    return counts


def progress_line(study: optuna.Study, n_trials: int, elapsed: float) -> str:
    trials = study.get_trials(deepcopy=False)
    c = state_counts(trials)
    retries = len(trials) - budget_used(trials)
    done = c["complete"] + c["pruned"] + c["fail"] - retries  # a failure that was retried is not an outcome
    best = min((t for t in trials if t.state == TrialState.COMPLETE), key=lambda t: t.value, default=None)
    best_s = f"best {best.value:.4f} (#{best.number})" if best else "best -"
    extra = f" (+{retries} retried)" if retries else ""
    return (f"[{int(elapsed) // 60}m{int(elapsed) % 60:02d}s] {done}/{n_trials} done{extra}: "
            f"{c['complete']} complete, {c['pruned']} pruned, {c['fail']} failed; {c['running']} running | {best_s}")


class Progress:
    """One status line on stderr: rewritten in place on a terminal, printed on change otherwise."""

    def __init__(self, quiet: bool = False):
        self.quiet, self.last, self.tty = quiet, None, sys.stderr.isatty()

    def show(self, line: str, final: bool = False) -> None:
        if self.quiet or (line == self.last and not final):
            return
        body = line.split("] ", 1)[-1]
        if self.tty:
            sys.stderr.write("\r\033[K" + line + ("\n" if final else ""))
        elif body != (self.last or "").split("] ", 1)[-1]:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()
        self.last = line


def cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def plan_devices(spec: SweepSpec, workers: int, gpus_per_trial: int, threads: int | None = None) -> list[dict]:
    """Per worker: the environment (CUDA_VISIBLE_DEVICES, thread counts) and the device string."""
    device = spec.train.device
    n_gpus = 0
    if device in ("auto", "cuda") or gpus_per_trial > 0 or device.startswith("cuda"):
        import torch

        n_gpus = torch.cuda.device_count()
    if device == "auto":
        device = "cuda" if n_gpus else "cpu"
    if gpus_per_trial > 0 and not device.startswith("cuda"):
        raise ConfigError(f"--gpus-per-trial {gpus_per_trial}: train.device = {spec.train.device!r} does not use a "
                          "GPU (set train.device = 'cuda' or 'auto', on a machine with GPUs)")
    if device.startswith("cuda") and n_gpus == 0:
        raise ConfigError(f"train.device = {spec.train.device!r} but no CUDA device is visible")
    threads = threads or max(1, cpu_count() // workers)  # split the cores, never oversubscribe them
    plans = []
    for i in range(workers):
        env = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        if device.startswith("cuda"):
            k = max(1, gpus_per_trial)
            if workers * k > n_gpus:
                raise ConfigError(f"--workers {workers} x --gpus-per-trial {k} needs {workers * k} GPUs; "
                                  f"{n_gpus} visible")
            env["CUDA_VISIBLE_DEVICES"] = ",".join(str(d) for d in range(i * k, (i + 1) * k))
            dev = "cuda"
        else:
            dev = device
        plans.append({"env": env, "device": dev, "threads": threads})
    return plans


def prepare(spec_path, out_dir, storage=None, trials=None, study_name=None) -> dict:
    """Everything checked and written before compute: returns the config workers read."""
    from mutransfer.data.builtin import open_dataset
    from proxy_sweeps.provenance import environment

    spec = load_spec(spec_path)
    if trials is not None and trials < 1:
        raise ConfigError(f"--trials = {trials} must be >= 1")
    n_trials = trials or spec.sweep.trials
    if grid_size(spec) is not None:
        n_trials = min(n_trials, grid_size(spec))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    url = st.normalize(storage, out)
    name = study_name or spec.sweep.name
    dataset = open_dataset(spec.data.spec, spec.shape.model.tokenizer)
    store = st.open_storage(url, spec.sweep.heartbeat_interval, spec.sweep.grace_period)
    open_study(spec, url, name, store, create=True)
    cfg = {
        "spec_file": str(Path(spec_path).resolve()),
        "study": name,
        "storage": st.redact(url),
        "trials": n_trials,
        "data_fingerprint": dataset.fingerprint,
        "resolved": resolved(spec),
        "spec": spec.raw,
    }
    (out / CONFIG_FILE).write_text(json.dumps(cfg, indent=2, default=str) + "\n")
    (out / "environment.json").write_text(json.dumps(environment(), indent=2) + "\n")
    return {"cfg": cfg, "spec": spec, "url": url, "storage": store}


def run_sweep(spec_path, out_dir, storage: str | None = None, workers: int = 1, trials: int | None = None,
              study_name: str | None = None, gpus_per_trial: int = 0, quiet: bool = False,
              threads: int | None = None) -> int:
    if workers < 1:
        raise ConfigError(f"--workers = {workers} must be >= 1")
    if threads is not None and threads < 1:
        raise ConfigError(f"--threads = {threads} must be >= 1")
    ready = prepare(spec_path, out_dir, storage, trials, study_name)
    cfg, spec, url, store = ready["cfg"], ready["spec"], ready["url"], ready["storage"]
    out = Path(out_dir)
    plans = plan_devices(spec, workers, gpus_per_trial, threads)
    cfg["device"] = plans[0]["device"]
    (out / CONFIG_FILE).write_text(json.dumps(cfg, indent=2, default=str) + "\n")
    logs = out / "logs"
    logs.mkdir(exist_ok=True)
    study = optuna.load_study(study_name=cfg["study"], storage=store)
    progress = Progress(quiet)
    if not quiet:
        print(f"sweep {cfg['study']!r}: {cfg['trials']} trials, {workers} worker(s), storage {st.redact(url)}, "
              f"out {out}", file=sys.stderr)
    procs = []
    start = time.perf_counter()
    trials_now = study.get_trials(deepcopy=False)
    if budget_used(trials_now) >= cfg["trials"] and all(t.state.is_finished() for t in trials_now):
        plans = []  # the budget is spent and nothing is pending: export only
    try:
        for i, plan in enumerate(plans):
            env = {**os.environ, **plan["env"], STORAGE_ENV: url}
            log = open(logs / f"worker-{i}.log", "ab")
            cmd = [sys.executable, "-m", "proxy_sweeps.worker", str(out), "--index", str(i),
                   "--threads", str(plan["threads"])]
            procs.append((subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT), log))
        while any(p.poll() is None for p, _ in procs):
            progress.show(progress_line(study, cfg["trials"], time.perf_counter() - start))
            time.sleep(1.0)
    except KeyboardInterrupt:
        for p, _ in procs:
            with contextlib.suppress(ProcessLookupError):
                p.terminate()
        for p, _ in procs:
            p.wait()
        progress.show(progress_line(study, cfg["trials"], time.perf_counter() - start), final=True)
        print("interrupted; run the same command again to continue the study", file=sys.stderr)
        return 130
    finally:
        for _, log in procs:
            log.close()
    progress.show(progress_line(study, cfg["trials"], time.perf_counter() - start), final=True)
    crashed = [i for i, (p, _) in enumerate(procs) if p.returncode != 0]
    for i in crashed:
        tail = (logs / f"worker-{i}.log").read_text(errors="replace")[-2000:]
        print(f"worker {i} exited with status {procs[i][0].returncode}; log tail:\n{tail}", file=sys.stderr)
    from proxy_sweeps.export import export

    summary = export(study, out, cfg)
    if not quiet:
        best = summary.get("best")
        if best:
            print(f"best: trial {best['number']} value {best['value']:.4f} params {best['params']}", file=sys.stderr)
        print(f"results: {out / 'trials.parquet'}, plots in {out / 'plots'}; "
              f"freeze with: mutransfer freeze {out} --out hparams.lock.json", file=sys.stderr)
    return 1 if crashed or not summary.get("best") else 0
