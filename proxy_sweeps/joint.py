"""The joint check: do the proxy's base LR, muP and the fitted laws predict a target that differs on every axis?

Each transfer check moves one axis; a user moves them all at once. A transfer-check file with a
``[target]`` table (``mutransfer transfer-check FILE --out DIR``) names a target wider, deeper,
trained longer and at a larger batch than the proxy, and

1. takes the proxy's optimum base LR: the lock's (``joint.lock``), or measured in the same run on the
   proxy's own LR grid (``[proxy]``, ``joint.proxy_lr_log2_*``);
2. predicts the target's optimum: muP carries the base LR across width and depth unchanged, the
   fitted horizon and batch laws (the lock's, or ``joint.laws``: transfer-check directories as for
   ``freeze --law``) correct it by ``mutransfer.laws.correction``;
3. measures the target's optimum on its LR grid (parabola vertex, bootstrap interval:
   ``mutransfer.optimum_stats``) and judges the error measured - predicted (octaves): pass when its
   interval lies within +-``goal_octaves``, fail when outside, inconclusive when it straddles (the
   transfer verdict's rule, ``optimum_stats.verdict``). Exit status 0 / 1 / 3.

Beside the verdict, the error of muP alone (no law) and of each law alone (with two laws: each left
out in turn), so the user sees what each law buys. With a measured proxy the proxy and target share
seeds (same initialisation seed and data order) and held-out batches, so their bootstrap draws are
paired and the error's interval keeps what they have in common. The laws are taken at their point
estimates (their own intervals are in their checks' verdicts).

The grid runs as a transfer check's (``proxy_sweeps.transfer``: runs.jsonl, resume, more seeds with
``--seeds``, signals); each run record's ``value`` is its side, 0 the proxy and 1 the target.
Writes verdict.json and joint.png (``analysis.joint``).
"""

from __future__ import annotations

import math
import sys
import time
import types
import zlib
from pathlib import Path

import numpy as np

from mutransfer import optimum_stats as stats
from mutransfer.config import (
    ConfigError,
    HParams,
    ProxyTrain,
    RunShape,
    apply_overrides,
    hparams_from,
    load_toml,
    parse,
    updated,
)
from mutransfer.laws import Law, Laws, TransferCorrection, beta_draws, correction
from mutransfer.lockfile import Lock, check_lock_matches, read_lock
from mutransfer.model_size import check_fits_machine
from mutransfer.plan import shape_from_config
from mutransfer.rundir import (
    ENVIRONMENT_FILE,
    check_output_dir,
    cpu_count,
    environment,
    read_jsonl,
    write_json,
)
from mutransfer.specs import at_depth, at_width
from mutransfer.tokenizer import check_model_vocab
from mutransfer.tracking import TrackingSettings, check_installed
from mutransfer.tracking import prepare as prepare_tracking
from proxy_sweeps.joint_config import JointSettings, RunPoint
from proxy_sweeps.processes import Stopped, stops_raised
from proxy_sweeps.transfer import RUNS_FILE, Variant, _run_chains, done_keys, open_check_data
from proxy_sweeps.transfer_verdict import losses_table

TABLES = ("joint", "proxy", "target", "model", "param", "data", "train", "hparams", "tracking")
PROXY, TARGET = 0, 1
SIDES = {PROXY: "proxy", TARGET: "target"}
FIGURE = "joint.png"


class JointSpec:
    """The check's two sides, duck-typed for the transfer check's grid workers (``transfer._chain``)."""

    def __init__(self, settings: JointSettings, shape: RunShape, data: str, train: ProxyTrain, hparams: HParams,
                 raw: dict, points: dict[int, RunPoint], lock: Lock | None, tracking: TrackingSettings):
        self.settings, self.shape, self.data, self.train, self.hparams, self.raw = \
            settings, shape, data, train, hparams, raw
        self.points, self.lock, self.tracking = points, lock, tracking

    @property
    def measured_proxy(self) -> bool:
        return self.lock is None

    @property
    def sides(self) -> list[int]:
        """The sides that train: both, or the target alone when a lock gives the proxy's LR."""
        return [PROXY, TARGET] if self.measured_proxy else [TARGET]

    def grid_of(self, side: int) -> list[float]:
        return self.settings.proxy_grid if side == PROXY else self.settings.target_grid

    @property
    def grid(self) -> list[float]:
        """Every LR either side trains, ascending (a worker runs only its side's: the others are not to do)."""
        return sorted({x for side in self.sides for x in self.grid_of(side)})

    def hparams_at(self, x: float) -> HParams:
        return updated(self.hparams, "hparams", lr=2.0**x)

    @property
    def variants(self) -> list[Variant]:
        return [Variant(parametrization=self.shape.param.parametrization)]

    def shape_at(self, variant: Variant, side: int) -> RunShape:
        point, model = self.points[side], self.shape.model
        if point.depth is not None:
            model = at_depth(model, point.depth)
        if point.width is not None:
            model = at_width(model, point.width)
        return RunShape(model=model, param=self.shape.param)

    def train_at(self, side: int) -> ProxyTrain:
        """The side's budget: its steps and batch, warmup and decay as fractions of its steps."""
        s, tc, point = self.settings, self.train, self.points[side]
        steps = point.steps or tc.steps
        changes = {"steps": steps, "batch_size": point.batch_size or tc.batch_size,
                   "eval_every": min(tc.eval_every, steps)}
        if s.warmup_fraction is not None:
            changes["warmup"] = int(round(s.warmup_fraction * steps))
        if s.decay_fraction is not None:
            changes["decay"] = int(round(s.decay_fraction * steps))
        return updated(tc, f"[{SIDES[side]}] (its run's budget)", **changes)

    @property
    def proxy_train(self) -> ProxyTrain | None:
        """The budget the proxy's LR was tuned with: the lock's record, or the measured proxy's."""
        return self.train_at(PROXY) if self.measured_proxy else self.lock.proxy_train

    def describe(self, side: int) -> dict:
        """Width, depth, steps, batch and tokens of a side (the lock's proxy when a lock is given)."""
        if side == PROXY and not self.measured_proxy:
            tc, model = self.lock.proxy_train, self.lock.proxy_model
            out = {"width": model.d_model, "depth": model.n_layers}
        else:
            tc, model = self.train_at(side), self.shape_at(self.variants[0], side).model
            out = {"width": model.d_model, "depth": model.n_layers}
        if tc is not None:
            out.update(steps=tc.steps, batch_size=tc.batch_size, seq_len=tc.seq_len,
                       tokens=tc.steps * tc.tokens_per_step)
        return out


def spec_from_mapping(data: dict, where: str = "joint-check file") -> JointSpec:
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a table")
    unknown = sorted(set(data) - set(TABLES))
    if unknown:
        raise ConfigError(f"{where}: unknown table(s) {unknown}; allowed in a joint check: {list(TABLES)}")
    if "target" not in data:
        raise ConfigError("target: a joint check needs a [target] table (the width, depth, steps and batch_size "
                          "to predict)")
    settings = parse(JointSettings, data.get("joint"), "joint")
    tracking = parse(TrackingSettings, data.get("tracking"), "tracking")
    check_installed(tracking)
    lock = read_lock(settings.lock) if settings.lock else None
    hp_table = data.get("hparams", {})
    if not isinstance(hp_table, dict):
        raise ConfigError("hparams: expected a table")
    if "lr" in hp_table:
        raise ConfigError("hparams.lr: the LR is the grid's (joint.lr_log2_*) and the proxy's optimum; remove it")
    if lock is not None and "proxy" in data:
        raise ConfigError("proxy: joint.lock names the proxy (its model and budget are the lock's); remove [proxy], "
                          "or remove joint.lock to measure the proxy's optimum in this run")
    if lock is not None and hp_table:
        raise ConfigError("hparams: joint.lock holds the base hyperparameters; remove [hparams] or joint.lock")
    given = [f"joint.{k}" for k in ("proxy_lr_log2_low", "proxy_lr_log2_high", "proxy_lr_log2_step")
             if getattr(settings, k) is not None]
    if lock is not None and given:
        raise ConfigError(f"{', '.join(given)}: joint.lock gives the proxy's LR, so the proxy is not run; remove "
                          "them, or remove joint.lock to measure the proxy's optimum on that grid")
    shape = shape_from_config({k: data[k] for k in ("model", "param") if k in data}, "joint",
                              param_default=lock.param if lock else None)
    check_model_vocab(shape.model)
    data_table = data.get("data", {})
    if not isinstance(data_table, dict) or sorted(set(data_table) - {"spec"}):
        raise ConfigError("data: expected a table with only 'spec'")
    train = parse(ProxyTrain, data.get("train"), "train")
    points = {PROXY: parse(RunPoint, data.get("proxy"), "proxy"), TARGET: parse(RunPoint, data.get("target"), "target")}
    spec = JointSpec(settings=settings, shape=shape, data=data_table.get("spec", "builtin"), train=train,
                     hparams=lock.hparams if lock else hparams_from(hp_table), raw=data, points=points, lock=lock,
                     tracking=tracking)
    variant = spec.variants[0]
    if lock is not None:
        check_lock_matches(lock, spec.shape_at(variant, TARGET))
    for side in spec.sides:  # both sides must be a model and a budget, before compute
        check_fits_machine(spec.shape_at(variant, side), f"[{SIDES[side]}]")
        spec.train_at(side)
    return spec


def load_joint_spec(path, overrides=()) -> JointSpec:
    return spec_from_mapping(apply_overrides(load_toml(path), overrides, TABLES), Path(path).name)


# ---------------------------------------------------------------- the laws and the predictions


def read_laws(spec: JointSpec) -> dict[str, Law]:
    """The lock's laws and those of ``joint.laws`` (transfer-check directories); a kind given twice is an error."""
    laws = dict(spec.lock.laws.items()) if spec.lock else {}
    if spec.settings.laws:
        from proxy_sweeps.freeze import read_laws as laws_of_dirs

        for kind, entry in laws_of_dirs(spec.settings.laws).items():
            if kind in laws:
                raise ConfigError(f"joint.laws: {entry['source']} gives a {kind} law, and the lock has one "
                                  f"(from {laws[kind].source}); keep one")
            laws[kind] = parse(Law, entry, f"joint.laws: {entry['source']}")
    return {kind: laws[kind] for kind in ("horizon", "batch") if kind in laws}


def law_terms(spec: JointSpec, laws: dict[str, Law]) -> dict[str, dict]:
    """Each law's correction of the base LR from the proxy's budget to the target's, in octaves."""
    proxy_train = spec.proxy_train
    if laws and proxy_train is None:
        raise ConfigError(f"joint.lock: the lock's provenance records no proxy_train (the proxy's budget), so its "
                          f"{' and '.join(laws)} law(s) have nothing to scale from")
    target = spec.train_at(TARGET)
    tokens, batch = float(target.steps * target.tokens_per_step), float(target.batch_size)
    terms = {}
    for kind, law in laws.items():
        fix = correction(Laws(**{kind: law}), proxy_train, tokens, batch, TransferCorrection(**{kind: "fitted"}))
        term = fix["terms"][kind]
        draws, draws_source = beta_draws(law)
        terms[kind] = {"octaves": math.log2(fix["factor"]), "factor": fix["factor"], "beta": law.beta,
                       "beta_ci": law.beta_ci, "unit": law.unit, "proxy": term["proxy"], "target": term["target"],
                       "source": law.source, "law_outcome": law.outcome, "draws_source": draws_source,
                       # the correction's draws, -beta log2(target / proxy) per draw of beta ("samples":
                       # kept out of verdict.json like every bootstrap's)
                       "samples": None if draws is None else -draws * math.log2(term["target"] / term["proxy"])}
    return terms


def _with_law_noise(error: dict, terms: dict, kinds: list[str], level: float, key: str) -> dict:
    """``error`` (the optima's noise only) with the laws' noise added: each draw of the error minus a
    draw of each law's correction (independent checks, drawn at random with a fixed seed) about its
    point value. The laws' seeds are not this check's, so more seeds here would not narrow that part:
    no extra-seed estimate is given then. Unchanged when a law or the error has no draws."""
    base = error.get("samples")
    laws = [terms[k].get("samples") for k in kinds]
    if not kinds or base is None or any(d is None for d in laws) or error.get("estimate") is None:
        return error
    base = np.asarray(base, dtype=float)
    rng = np.random.default_rng(zlib.crc32(f"{key}:{'+'.join(kinds)}".encode()))
    noise = sum(d[rng.integers(0, len(d), size=len(base))] - terms[k]["octaves"]
                for k, d in zip(kinds, laws, strict=True))
    samples = base - noise
    ci = [float(v) for v in np.quantile(samples, [0.5 - level / 2, 0.5 + level / 2])]
    return {**error, "ci": ci, "samples": samples, "optima_only_ci": error.get("ci"), "n_seeds": None,
            "variance_parts": None}


def prediction_rows(kinds: list[str]) -> list[tuple[str, list[str]]]:
    """muP alone, each law alone (with two laws: the other left out), all laws; the last one is judged."""
    rows = [("muP alone", [])]
    if len(kinds) > 1:
        rows += [(f"+ {k} law", [k]) for k in kinds]
    if kinds:
        rows.append(("all laws (" + " + ".join(kinds) + ")", list(kinds)))
    return rows


# ---------------------------------------------------------------- the verdict


def _optimum(xs: list[float], table: np.ndarray, s: JointSettings, key: str) -> dict:
    """The optimum and its bootstrap; one ``key`` for both sides, so that their seeds and batches are
    drawn alike (``proxy_sweeps.transfer_verdict`` does the same across axis values)."""
    if s.bootstrap == 0 or table.shape[0] < 2:
        fit = stats.fit_optimum(np.asarray(xs), table.mean(axis=(0, 1)) if table.shape[0] else np.full(len(xs), np.nan))
        reason = "bootstrap = 0: no interval" if s.bootstrap == 0 else \
            f"{table.shape[0]} seed(s): a bootstrap interval needs at least 2 seeds (--seeds 2 or more)"
        return {"estimate": fit["lr_log2"], "ci": None, "fit": fit, "status": "inconclusive", "reason": reason,
                "n_seeds": int(table.shape[0]), "n_eval_batches": int(table.shape[1]), "samples": None}
    return stats.bootstrap_optimum(xs, table, n_boot=s.bootstrap, rng=zlib.crc32(key.encode()), level=s.confidence)


def _side_report(runs: list[dict], xs: list[float], boot: dict, table: np.ndarray) -> dict:
    fit = boot.get("fit") or {}
    with np.errstate(invalid="ignore"):
        curve = table.mean(axis=(0, 1)) if table.shape[0] else np.full(len(xs), np.nan)
    return {"lr_log2": boot.get("estimate"), "ci": boot.get("ci"), "status": boot.get("status"),
            "reason": boot.get("reason"), "method": fit.get("method"), "at_edge": fit.get("at_edge"),
            "loss": fit.get("loss"), "runs": len(runs), "diverged": sum(r["status"] == "diverged" for r in runs),
            "seeds": int(table.shape[0]), "eval_batches": int(table.shape[1]), "grid": xs, "curve": curve.tolist()}


def _shifted(error: dict, c: float) -> dict:
    """``error`` minus the constant ``c`` (a law's correction): estimate, interval and draws move alike."""
    out = dict(error)
    if out.get("estimate") is not None:
        out["estimate"] = out["estimate"] - c
    if out.get("ci") is not None:
        out["ci"] = [out["ci"][0] - c, out["ci"][1] - c]
    if out.get("samples") is not None:
        out["samples"] = np.asarray(out["samples"]) - c
    return out


def _base_error(target: dict, proxy: dict | None, proxy_lr_log2: float | None, reason: str | None) -> dict:
    """measured - muP's prediction (the proxy's optimum), with its interval (paired draws when measured)."""
    if proxy is None:  # the lock's LR: a number, not an estimate
        err = _shifted(target, proxy_lr_log2)
    else:
        pair = stats.bootstrap_shift([proxy, target], [1, 2], level=target.get("level") or stats.DEFAULT_LEVEL)
        err = pair.get("drift")
        if err is None:  # no draws (one seed, no bootstrap): the point estimates alone
            ok = target.get("estimate") is not None and proxy.get("estimate") is not None
            err = {"estimate": target["estimate"] - proxy["estimate"] if ok else None, "ci": None}
    if reason:
        err = {**err, "status": "inconclusive", "reason": reason}
    return err


def judge(out_dir, spec: JointSpec) -> dict:
    """verdict.json from runs.jsonl for a joint check; returns it."""
    out, s = Path(out_dir), spec.settings
    laws = read_laws(spec)
    terms = law_terms(spec, laws)
    runs = read_jsonl(out / RUNS_FILE)
    key = spec.variants[0].name
    sides, boots, reasons = {}, {}, []
    for side in spec.sides:
        xs = spec.grid_of(side)
        rs = [r for r in runs if int(r["value"]) == side and float(r["lr_log2"]) in set(xs)]
        table = losses_table(rs, xs) if rs else np.full((0, 1, len(xs)), np.nan)
        boots[side] = _optimum(xs, table, s, key)
        sides[SIDES[side]] = {**spec.describe(side), **_side_report(rs, xs, boots[side], table)}
        if boots[side].get("status") == "inconclusive":
            reasons.append(f"{SIDES[side]} optimum: {boots[side].get('reason')}")
    if spec.measured_proxy:
        proxy_lr, proxy_ci, source = boots[PROXY].get("estimate"), boots[PROXY].get("ci"), "measured"
    else:
        proxy_lr, proxy_ci, source = math.log2(spec.lock.hparams.lr), None, f"lock {s.lock}"
        sides["proxy"] = {**spec.describe(PROXY), "lr_log2": proxy_lr, "ci": None, "status": "ok"}
    sides["proxy"]["source"] = source
    base = _base_error(boots[TARGET], boots.get(PROXY), proxy_lr, "; ".join(reasons) or None)
    rows = []
    for name, kinds in prediction_rows(list(terms)):
        c = sum(terms[k]["octaves"] for k in kinds)
        error = _with_law_noise(_shifted(base, c), terms, kinds, s.confidence, key)
        laws_note = ("the interval holds the laws' noise: seeds of the checks they were fitted on narrow that "
                     "part, not seeds here") if error.get("optima_only_ci") is not None else None
        decided = stats.verdict(error if error.get("ci") else {"ci": None, "reason": error.get("reason")},
                                s.goal_octaves, "within", undecided_note=laws_note)
        rows.append({"name": name, "laws": kinds, "correction_octaves": c,
                     "predicted_lr_log2": None if proxy_lr is None else proxy_lr + c,
                     "predicted_ci": None if proxy_ci is None else [proxy_ci[0] + c, proxy_ci[1] + c],
                     "error": {k: error.get(k) for k in ("estimate", "ci", "optima_only_ci")},
                     "outcome": decided["outcome"],
                     "reason": decided["reason"], "decision": decided})
    primary = rows[-1]
    why = [f"{primary['name']}: measured - predicted optimum at the target: {primary['reason']}"]
    if not terms:
        why.append("no law (neither the lock nor joint.laws gives one): the prediction is muP's alone")
    decision = primary["decision"]
    verdict = {"check": "joint", "goal_octaves": s.goal_octaves, "confidence": s.confidence,
               "bootstrap": s.bootstrap, "variant": key, "proxy": sides["proxy"], "target": sides["target"],
               "laws": terms, "predictions": [{k: v for k, v in r.items() if k != "decision"} for r in rows],
               "primary": primary["name"], "outcome": decision["outcome"], "exit_status": decision["exit_status"],
               "extra_seeds_needed": decision.get("extra_seeds_needed"), "reasons": why, "decision": decision}
    verdict["pass"] = verdict["outcome"] == "pass"
    from proxy_sweeps.transfer_verdict import _clean

    verdict = _clean(verdict)
    write_json(out / "verdict.json", verdict)
    return verdict


def _interval(x: float | None, ci) -> str:
    if x is None:
        return "-"
    return f"{x:+.2f}" + (f" [{ci[0]:+.2f}, {ci[1]:+.2f}]" if ci else "")


def _side_line(name: str, d: dict) -> str:
    budget = (f", {d['steps']} steps x batch {d['batch_size']} ({d['tokens']:,} tokens)" if d.get("steps") else
              ", budget not recorded")
    return f"{name}: width {d['width']}, depth {d['depth']}{budget}"


def format_verdict(verdict: dict) -> str:
    level = int(round(100 * verdict["confidence"]))
    p, t = verdict["proxy"], verdict["target"]
    lines = [f"joint check ({level} % bootstrap intervals, log2 base LR):", "  " + _side_line("proxy", p),
             "  " + _side_line("target", t),
             f"  proxy optimum ({p['source']}): {_interval(p.get('lr_log2'), p.get('ci'))}"
             + (" (edge)" if p.get("at_edge") else ""),
             f"  target optimum (measured): {_interval(t.get('lr_log2'), t.get('ci'))}"
             + (" (edge)" if t.get("at_edge") else "")]
    for kind, term in verdict["laws"].items():
        lines.append(f"  {kind} law: beta {term['beta']:.3f}, {term['unit']} x{term['target'] / term['proxy']:g}: "
                     f"{term['octaves']:+.2f} octave (its check: {term['law_outcome']}; {term['source']})")
    lines.append(f"  {'prediction':<28} {'predicted':<22} {'error (measured - predicted)':<30} {'outcome':<13} "
                 "error's interval from the optima alone")
    for r in verdict["predictions"]:
        alone = r["error"].get("optima_only_ci")
        lines.append(f"  {r['name']:<28} {_interval(r['predicted_lr_log2'], r['predicted_ci']):<22} "
                     f"{_interval(r['error']['estimate'], r['error']['ci']):<30} {r['outcome']:<13} "
                     + ("(the same)" if alone is None else f"[{alone[0]:+.2f}, {alone[1]:+.2f}]"))
    lines.append("  the error's interval holds the optima's noise and the laws' (their bootstrap draws of beta)")
    extra = verdict.get("extra_seeds_needed")
    more = f" (about {extra} more seeds would likely decide it: --seeds)" if extra else ""
    lines.append(f"verdict: {verdict['outcome'].upper()}{more}: " + "; ".join(verdict["reasons"]))
    return "\n".join(lines)


# ---------------------------------------------------------------- the command


def _definition(spec: JointSpec) -> dict:
    """What must not change between runs into one directory: everything but the seed count (and the
    lock's contents, which set every hyperparameter but the LR)."""
    raw = {k: v for k, v in spec.raw.items() if k not in ("joint", "tracking")}
    raw["joint"] = {k: v for k, v in spec.raw.get("joint", {}).items() if k != "seeds"}
    if spec.lock is not None:
        raw["lock_content_hash"] = spec.lock.content_hash
    return raw


def run_joint_check(path, out_dir, workers: int = 1, quiet: bool = False, overrides=(), seeds: int | None = None,
                    allow_data_change: bool = False) -> int:
    """``mutransfer transfer-check FILE`` for a file with a [target] table; the exit status."""

    if workers < 1:
        raise ConfigError(f"--workers = {workers} must be >= 1")
    if seeds is not None:
        overrides = [*overrides, f"joint.seeds={seeds}"]
    spec = load_joint_spec(path, overrides)
    law_terms(spec, read_laws(spec))  # the laws are read and checked before any compute
    out = check_output_dir(out_dir)
    dataset = open_check_data(spec, out, _definition(spec), "joint check", "joint.seeds", allow_data_change)
    config_path = out / "config.json"
    out.mkdir(parents=True, exist_ok=True)
    write_json(config_path, {"check": "joint", "spec_file": str(Path(path).resolve()), "overrides": list(overrides),
                             "data_fingerprint": dataset.fingerprint, "grid_key": "lr_log2",
                             "grids": {SIDES[side]: spec.grid_of(side) for side in spec.sides},
                             "definition": _definition(spec), "spec": spec.raw})
    write_json(out / ENVIRONMENT_FILE, environment())

    s, variant = spec.settings, spec.variants[0]
    done = done_keys(out, "lr_log2")
    chains = []
    for side in sorted(spec.sides, reverse=True):  # the target (the slowest) first
        for seed in range(s.seeds):
            todo = {(variant.name, side, float(x), seed) for x in spec.grid_of(side)} - done
            if todo:
                chains.append((side, seed, todo))
    total = sum(len(spec.grid_of(side)) for side in spec.sides) * s.seeds
    threads = max(1, cpu_count() // workers)
    prepare_tracking(spec.tracking, out)  # e.g. MLflow's database, once, before the workers open runs in it
    tasks = [(str(out), spec.raw, variant.model_dump(), side, seed, todo, threads, Path(path).stem,
              spec_from_mapping)
             for side, seed, todo in chains]
    start, finished = time.perf_counter(), total - sum(len(c[2]) for c in chains)
    if not quiet:
        grids = " + ".join(f"{SIDES[side]} {len(spec.grid_of(side))} LRs" for side in spec.sides)
        print(f"joint check: ({grids}) x {s.seeds} seeds = {total} runs ({finished} already done), {workers} "
              f"worker(s); progress names the side: 0 the proxy, 1 the target", file=sys.stderr)
    if tasks:
        progress = types.SimpleNamespace(axis="side", grid_key="lr_log2")
        try:
            with stops_raised():
                _run_chains(tasks, workers, out, progress, total, finished, start, quiet)
        except Stopped as e:  # leaving the pool's block has terminated its workers
            print(f"stopped by signal {e.signum}: {len(done_keys(out, 'lr_log2'))} of {total} runs are in "
                  f"{out / RUNS_FILE}; run the same command again to continue (the runs done are kept)",
                  file=sys.stderr)
            return 128 + e.signum
    verdict = judge(out, spec)
    from analysis.joint import draw

    draw(out)
    if not quiet:
        print(format_verdict(verdict), file=sys.stderr)
    errors = [r for r in read_jsonl(out / RUNS_FILE) if r["status"] == "error"]
    if errors:
        print(f"{len(errors)} run(s) failed with an error, e.g. {errors[0]['reason']}", file=sys.stderr)
        return 1
    return verdict["exit_status"]
