"""``mutransfer sweep``: the main process of a sweep.

It checks the spec, the data and the directory (--out: a writable directory, held by this sweep
alone, whose earlier outputs are this study's: ``proxy_sweeps.sweep_dir``), opens the storage (a
journal file is checked whole first: ``proxy_sweeps.journal``), creates (or reopens) the study --
refusing another definition or other data --, counts this invocation in the study (so the workers'
sampler seeds differ from the last run's), writes the directory's self-description, starts N worker
processes (``proxy_sweeps.worker``) and shows progress until they end, then exports trials.parquet
and the plots. SIGTERM/SIGINT, from the first line of ``run_sweep`` on: a stop during the set-up
waits until it is whole; then the workers are stopped (each marks its trial interrupted and queues
the retry), what exists is exported, and the exit status is 128 + the signal (a stop during the
export lets it finish). A sweep whose budget ends with lost trials (retries exhausted) says so and
exits 1."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna

from mutransfer.config import ConfigError
from mutransfer.rundir import cpu_count, environment, pick_device, write_json
from mutransfer.tracking import prepare as prepare_tracking
from proxy_sweeps import storage as st
from proxy_sweeps.budget import account
from proxy_sweeps.processes import MainStops, Stopped
from proxy_sweeps.spec import SweepSpec, grid_size, load_spec, resolved
from proxy_sweeps.study import create_or_check, record_invocation
from proxy_sweeps.sweep_dir import SweepDirLock, check_outputs, check_writable
from proxy_sweeps.worker import CONFIG_FILE, STORAGE_ENV

optuna.logging.set_verbosity(optuna.logging.WARNING)  # our progress line and worker logs say it all
STOP_WAIT_S = 60  # how long stopped workers get to record their trials before they are killed


def progress_line(study: optuna.Study, n_trials: int, max_retries: int, elapsed: float) -> str:
    trials = study.get_trials(deepcopy=False)
    acc = account(trials, max_retries)
    running = sum(t.state == optuna.trial.TrialState.RUNNING for t in trials)
    best = min((t for t in trials if t.state == optuna.trial.TrialState.COMPLETE), key=lambda t: t.value,
               default=None)
    best_s = f"best {best.value:.4f} (#{best.number})" if best else "best -"
    extra = f" (+{acc.retries} retried)" if acc.retries else ""
    lost = f", {len(acc.lost)} lost" if acc.lost else ""
    return (f"[{int(elapsed) // 60}m{int(elapsed) % 60:02d}s] {acc.done}/{n_trials} done{extra}: "
            f"{acc.complete} complete, {acc.pruned} pruned, {acc.failed} failed{lost}; {running} running | {best_s}")


class Progress:
    """One status line on stderr: rewritten in place on a terminal; otherwise printed on change and,
    without one, again every ``interval`` seconds (a heartbeat, so a log shows the sweep is alive
    while a long trial runs). ``clock`` is what the interval is measured with."""

    def __init__(self, quiet: bool = False, interval: float = 10.0, clock=time.monotonic):
        self.quiet, self.last, self.tty = quiet, None, sys.stderr.isatty()
        self.interval, self.clock, self.printed_at = interval, clock, None

    def show(self, line: str, final: bool = False) -> None:
        if self.quiet or (line == self.last and not final and self.tty):
            return
        body = line.split("] ", 1)[-1]
        if self.tty:
            sys.stderr.write("\r\033[K" + line + ("\n" if final else ""))
        elif (body != (self.last or "").split("] ", 1)[-1] or self.printed_at is None
              or self.clock() - self.printed_at >= self.interval):
            sys.stderr.write(line + "\n")
            self.printed_at = self.clock()
        sys.stderr.flush()
        self.last = line


def plan_devices(spec: SweepSpec, workers: int, gpus_per_trial: int, threads: int | None = None) -> list[dict]:
    """Per worker: the environment (CUDA_VISIBLE_DEVICES, thread counts) and the device string."""
    device = spec.train.device
    if gpus_per_trial > 0 and device == "cpu":
        raise ConfigError(f"--gpus-per-trial {gpus_per_trial}: train.device = 'cpu' does not use a GPU "
                          "(set train.device = 'cuda' or 'auto', on a machine with GPUs)")
    device = pick_device(device).type if device in ("auto", "cpu", "cuda") or gpus_per_trial else device
    threads = threads or max(1, cpu_count() // workers)  # split the cores, never oversubscribe them
    plans = []
    for i in range(workers):
        env = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        if device.startswith("cuda"):
            import torch

            k, n_gpus = max(1, gpus_per_trial), torch.cuda.device_count()
            if workers * k > n_gpus:
                raise ConfigError(f"--workers {workers} x --gpus-per-trial {k} needs {workers * k} GPUs; "
                                  f"{n_gpus} visible")
            env["CUDA_VISIBLE_DEVICES"] = ",".join(str(d) for d in range(i * k, (i + 1) * k))
            device = "cuda"
        plans.append({"env": env, "device": device, "threads": threads})
    return plans


def prepare(spec_path, out_dir, storage=None, trials=None, study_name=None, overrides=(), workers: int = 1,
            allow_data_change: bool = False, gpus_per_trial: int = 0, threads: int | None = None,
            lock: SweepDirLock | None = None) -> dict:
    """Everything checked before compute; config.json (what the workers read) is written only once
    every check passed. ``lock``: the directory's (acquired here, once --out is known to be usable;
    the caller releases it)."""
    from mutransfer.data.builtin import open_dataset
    from mutransfer.training import short_eval_warning

    if workers < 1:
        raise ConfigError(f"--workers = {workers} must be >= 1")
    if threads is not None and threads < 1:
        raise ConfigError(f"--threads = {threads} must be >= 1")
    if gpus_per_trial < 0:
        raise ConfigError(f"--gpus-per-trial = {gpus_per_trial} must be >= 0")
    spec = load_spec(spec_path, overrides)
    if trials is not None and trials < 1:
        raise ConfigError(f"--trials = {trials} must be >= 1")
    n_trials = trials or spec.sweep.trials
    if grid_size(spec) is not None:
        n_trials = min(n_trials, grid_size(spec))
    out = Path(out_dir)
    url = st.normalize(storage, out)
    name = study_name or spec.sweep.name
    dataset = open_dataset(spec.data.spec, spec.shape.model.tokenizer, vocab_size=spec.shape.model.vocab_size)
    warning = short_eval_warning(dataset, spec.train)  # a held-out split smaller than one trial's evaluation
    if warning:
        print(warning, file=sys.stderr)
    plans = plan_devices(spec, workers, gpus_per_trial, threads)
    check_writable(out)
    if lock is not None:
        lock.acquire()
    store = st.open_storage(url, spec.sweep.heartbeat_interval, spec.sweep.grace_period, spec.sweep.max_retries)
    held = {s.study_name: s.n_trials for s in optuna.get_all_study_summaries(store, include_best_trial=False)}
    check_outputs(out, name, spec.definition_hash(), st.redact(url), held.get(name))
    study = create_or_check(spec, url, name, store, dataset.fingerprint, allow_data_change)
    prepare_tracking(spec.tracking, out)  # e.g. MLflow's database, once, before the workers open runs in it
    with st.budget_lock(url, store, name):
        invocation = record_invocation(study, workers)
    cfg = {
        "spec_file": str(Path(spec_path).resolve()),
        "overrides": list(overrides),
        "study": name,
        "storage": st.redact(url),
        "trials": n_trials,
        "invocation": invocation,
        "data_fingerprint": dataset.fingerprint,
        "allow_data_change": allow_data_change,
        "device": plans[0]["device"],
        "resolved": resolved(spec),
        "spec": spec.raw,
    }
    write_json(out / "environment.json", environment(device=cfg["device"]))
    write_json(out / CONFIG_FILE, cfg)
    return {"cfg": cfg, "spec": spec, "url": url, "storage": store, "study": study, "plans": plans}


def run_sweep(spec_path, out_dir, storage: str | None = None, workers: int = 1, trials: int | None = None,
              study_name: str | None = None, gpus_per_trial: int = 0, quiet: bool = False,
              threads: int | None = None, overrides=(), allow_data_change: bool = False) -> int:
    """The sweep; its exit status. Stop signals are caught from its first line: one that comes while
    it sets up waits until the setup is whole, then the sweep exports and exits 128 + the signal."""
    stops, lock = MainStops(), SweepDirLock(out_dir)
    out, procs, ready = Path(out_dir), [], {}
    stops.install()
    try:
        return _run(stops, lock, out, procs, ready, spec_path, storage, workers, trials, study_name,
                    gpus_per_trial, quiet, threads, overrides, allow_data_change)
    finally:
        for _, log in procs:
            log.close()
        lock.release()
        stops.restore()


def _run(stops: MainStops, lock: SweepDirLock, out: Path, procs: list, ready: dict, spec_path, storage, workers,
         trials, study_name, gpus_per_trial, quiet, threads, overrides, allow_data_change) -> int:
    logs = out / "logs"
    progress = Progress(quiet)
    start = time.perf_counter()
    try:
        with stops.held():  # a stop here waits: config.json and the study it names come out whole
            ready.update(prepare(spec_path, out, storage, trials, study_name, overrides, workers,
                                 allow_data_change, gpus_per_trial, threads, lock=lock))
        study, cfg, plans = ready["study"], ready["cfg"], ready["plans"]
        max_retries = ready["spec"].sweep.max_retries
        if not quiet:
            print(f"sweep {cfg['study']!r}: {cfg['trials']} trials, {workers} worker(s), storage "
                  f"{st.redact(ready['url'])}, out {out}", file=sys.stderr)
        acc = account(study.get_trials(deepcopy=False), max_retries)
        if acc.used >= cfg["trials"] and acc.pending == 0:
            plans = []  # the budget is spent and nothing is pending: export only
        with stops.held():  # every worker started is in ``procs``, so a stop reaches each
            logs.mkdir(exist_ok=True)
            for i, plan in enumerate(plans):
                env = {**os.environ, **plan["env"], STORAGE_ENV: ready["url"],
                       "MUTRANSFER_SWEEP_PARENT": str(os.getpid())}
                log = open(logs / f"worker-{i}.log", "ab")
                cmd = [sys.executable, "-m", "proxy_sweeps.worker", str(out), "--index", str(i),
                       "--threads", str(plan["threads"])]
                procs.append((subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT), log))
        while any(p.poll() is None for p, _ in procs):
            progress.show(progress_line(study, cfg["trials"], max_retries, time.perf_counter() - start))
            time.sleep(1.0)
        stops.finish()
    except (Stopped, KeyboardInterrupt):
        stops.finish()  # from here on a stop is only recorded: the clean-up and the export run to their end
        if stops.signum is None:
            stops.signum = signal.SIGINT
        _stop_workers([p for p, _ in procs])
    if "cfg" not in ready:
        print(f"stopped by signal {stops.signum} before the sweep started; nothing to export", file=sys.stderr)
        return 128 + int(stops.signum)
    study, cfg, max_retries = ready["study"], ready["cfg"], ready["spec"].sweep.max_retries
    stopped = stops.signum
    progress.show(progress_line(study, cfg["trials"], max_retries, time.perf_counter() - start), final=True)
    crashed = [i for i, (p, _) in enumerate(procs) if p.returncode not in (0, 130) and stopped is None]
    for i in crashed:
        tail = (logs / f"worker-{i}.log").read_text(errors="replace")[-2000:]
        print(f"worker {i} exited with status {procs[i][0].returncode}; log tail:\n{tail}", file=sys.stderr)
    from proxy_sweeps.export import export

    summary = export(study, out, cfg, max_retries)
    if stops.signum is not None:  # also a stop that came during the export
        print(f"stopped by signal {stops.signum}; exported what is done. Run the same command again to continue "
              "(interrupted trials are retried)", file=sys.stderr)
        return 128 + int(stops.signum)
    acc = account(study.get_trials(deepcopy=False), max_retries)
    if not quiet:
        best = summary.get("best")
        if best:
            print(f"best: trial {best['number']} value {best['value']:.4f} params {best['params']}", file=sys.stderr)
        print(f"results: {out / 'trials.parquet'}, plots in {out / 'plots'}; "
              f"freeze with: mutransfer freeze {out} --out hparams.lock.json", file=sys.stderr)
    if acc.lost:
        print(f"error: the sweep ended short: {len(acc.lost)} of {cfg['trials']} trials lost after "
              f"{max_retries} retries each (trials {acc.lost}); raise sweep.max_retries or look at logs/",
              file=sys.stderr)
        return 1
    if acc.done < cfg["trials"] and not crashed:
        print(f"error: the sweep ended short: {acc.done} of {cfg['trials']} trials done", file=sys.stderr)
        return 1
    return 1 if crashed or not summary.get("best") else 0


def _stop_workers(procs: list[subprocess.Popen]) -> None:
    """SIGTERM every worker (each records its trial), wait, then SIGKILL what is left."""
    for p in procs:
        with contextlib.suppress(ProcessLookupError):
            p.terminate()
    deadline = time.monotonic() + STOP_WAIT_S
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
