"""Transfer-check verdicts that know their noise (numpy only).

A transfer check scores runs on a grid of log2 learning rates, per axis value (width, depth,
token horizon, batch size) and seed, each run's held-out loss averaged over E evaluation batches.
The optimum per axis value is the vertex of a parabola in log2 LR (``fit_optimum``). With few
seeds that vertex moves by half an octave on noise alone, so a hard "shift <= 0.5 octave" is a
coin toss; here every number comes with a confidence interval and every verdict is one of
pass / fail / inconclusive, with an estimate of how many more seeds would likely decide it.

Interval method (``bootstrap_optimum``): a two-level "pigeonhole" bootstrap. The evaluation
windows are the same for every run, so seeds and evaluation batches are crossed factors: each
resample draws seeds with replacement and, independently, evaluation batches with replacement
(the same batch draw for every seed), averages, and refits the parabola. A plain percentile
interval of that covers only 65-80 % at 90 % with 3-4 seeds x 4 batches (measured on synthetic
curves like those of tests/test_optimum_stats.py, unless per-run evaluation noise dominates),
for three reasons, each corrected:

1. the bootstrap variance of a mean of n draws is (n-1)/n of the unbiased one: the loss table is
   split exactly into grand mean + seed effects + batch effects + interaction, and resampled seed
   (batch) effects are scaled by sqrt(n/(n-1)) for n seeds (batches), the interaction by both;
2. the crossed bootstrap counts the seed x batch interaction three times (Owen 2007, too wide
   when per-run evaluation noise dominates): seed-only, batch-only and interaction-only parts
   of the same draws give the variance of each level's contribution to the optimum, the joint
   deviations are rescaled to their corrected sum (seed + batch + interaction, once);
3. that variance is estimated from 2-3 degrees of freedom, so normal quantiles are too short:
   the deviations are also scaled by t_nu / z, nu the Welch-Satterthwaite degrees of freedom of
   the three parts (n_seeds-1, n_batches-1, their product).

The interval is then the percentile interval of estimate + k * (bootstrap optimum - estimate),
which keeps the bootstrap's shape (grid-argmin fallbacks, asymmetry). Measured coverage of the
90 % interval over 300 synthetic draws per setting, 2-4 seeds x 1-4 batches, seed-only,
batch-only, interaction-only and mixed noise: 0.89-0.97 (0.89-0.93 for mixed noise, 0.97 when
per-run evaluation noise is all there is). BCa was
not chosen: its bias and acceleration terms need more than 3-4 seeds to estimate, and it keeps
normal quantiles, so it undercovers like the percentile interval here.
Diverged runs (NaN) drop their LR from every resample, as from the point estimate.

Exit statuses for a command that reports a verdict: pass 0, fail 1, inconclusive 3.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from statistics import NormalDist

import numpy as np

EXIT_PASS, EXIT_FAIL, EXIT_INCONCLUSIVE = 0, 1, 3
EXIT_STATUS = {"pass": EXIT_PASS, "fail": EXIT_FAIL, "inconclusive": EXIT_INCONCLUSIVE}
DEFAULT_LEVEL = 0.9
DEFAULT_BOOT = 1000
WINDOW_HALF = 2  # grid points either side of the argmin in the parabola window (5 in all)
MIN_POINTS = 3  # a parabola needs three points
MAX_EXTRA_SEEDS = 1000
DIRECTIONS = ("below", "above", "within")


# --------------------------------------------------------------------------- parabola vertex


def _fit_rows(xs: np.ndarray, ys: np.ndarray) -> dict[str, np.ndarray]:
    """The vertex rule on many curves at once (rows of ys), so a bootstrap costs one call.

    Per row: the finite points, their argmin, the up-to-5 finite points around it, a least-squares
    parabola in coordinates centred on the argmin; its vertex when it opens upward and lies inside
    the window, else the grid argmin.
    """
    ys = np.atleast_2d(np.asarray(ys, dtype=float))
    rows = np.arange(ys.shape[0])
    finite = np.isfinite(ys)
    n_finite = finite.sum(axis=1)
    i = np.argmin(np.where(finite, ys, np.inf), axis=1)
    rank = np.cumsum(finite, axis=1) - 1
    r = rank[rows, i]
    lo, hi = np.maximum(0, r - WINDOW_HALF), np.minimum(n_finite - 1, r + WINDOW_HALF)
    window = finite & (rank >= lo[:, None]) & (rank <= hi[:, None])
    points = window.sum(axis=1)
    u = np.where(window, xs[None, :] - xs[i][:, None], 0.0)
    w = window.astype(float)
    y = np.where(window, ys, 0.0)
    s = [np.sum(w * u**k, axis=1) for k in range(5)]
    t = [np.sum(w * u**k * y, axis=1) for k in range(3)]
    fit = points >= MIN_POINTS
    m = np.stack([np.stack([s[4], s[3], s[2]], -1), np.stack([s[3], s[2], s[1]], -1),
                  np.stack([s[2], s[1], s[0]], -1)], -2)
    m[~fit] = np.eye(3)
    a, b, c = np.linalg.solve(m, np.stack([t[2], t[1], t[0]], -1)[..., None])[..., 0].T
    with np.errstate(divide="ignore", invalid="ignore"):
        vertex = -b / (2 * a)
    u_lo = np.where(window, u, np.inf).min(axis=1)
    u_hi = np.where(window, u, -np.inf).max(axis=1)
    parabola = fit & (a > 0) & (vertex >= u_lo) & (vertex <= u_hi)
    grid_x, grid_y = xs[i], ys[rows, i]
    with np.errstate(divide="ignore", invalid="ignore"):
        lr = np.where(parabola, grid_x + vertex, grid_x)
        loss = np.where(parabola, c - b * b / (4 * a), grid_y)
    none = n_finite == 0
    lr[none], loss[none] = np.nan, np.nan
    last_finite = len(xs) - 1 - np.argmax(finite[:, ::-1], axis=1)
    return {"lr_log2": lr, "loss": loss, "parabola": parabola, "none": none, "points": points,
            "argmin": i, "at_edge": (i == 0) | (i == len(xs) - 1),
            "next_to_divergence": (i == last_finite) & (i != len(xs) - 1), "coeffs": np.stack([a, b, c], -1)}


def _grid(xs) -> np.ndarray:
    xs = np.asarray(xs, dtype=float)
    if xs.ndim != 1 or not np.all(np.isfinite(xs)) or np.any(np.diff(xs) <= 0):
        raise ValueError("xs must be finite, strictly increasing log2 learning rates")
    return xs


def fit_optimum(xs, ys) -> dict:
    """Vertex of a parabola through the (up to) 5 finite points around the argmin, in log2 LR.

    The vertex interpolates between x2 grid steps; when the parabola opens downward or its vertex
    leaves the window the grid argmin is kept. NaN losses (diverged runs) are left out.
    Keys: lr_log2, lr, loss, method ('parabola' | 'grid argmin' | 'none'), at_edge (the argmin is
    a grid end: the optimum may lie outside), points, grid_argmin_lr_log2, next_to_divergence,
    and coeffs [a, b, c] of a*x^2 + b*x + c in log2 LR when the parabola was used.
    """
    xs = _grid(xs)
    ys = np.asarray(ys, dtype=float)
    if ys.shape != xs.shape:
        raise ValueError(f"ys has shape {ys.shape}, xs {xs.shape}")
    f = {k: v[0] for k, v in _fit_rows(xs, ys[None, :]).items()}
    if f["none"]:
        return {"lr_log2": None, "lr": None, "loss": None, "method": "none", "at_edge": None, "points": 0,
                "grid_argmin_lr_log2": None, "next_to_divergence": None}
    x = float(f["lr_log2"])
    out = {"lr_log2": x, "lr": 2.0**x, "loss": float(f["loss"]),
           "method": "parabola" if f["parabola"] else "grid argmin", "at_edge": bool(f["at_edge"]),
           "points": int(f["points"]), "grid_argmin_lr_log2": float(xs[f["argmin"]]),
           "next_to_divergence": bool(f["next_to_divergence"])}
    if f["parabola"]:
        a, b, c = (float(v) for v in f["coeffs"])
        x0 = float(xs[f["argmin"]])  # back from coordinates centred on the argmin
        out["coeffs"] = [a, b - 2 * a * x0, a * x0 * x0 - b * x0 + c]
    return out


# --------------------------------------------------------------------------- quantiles


def t_quantile(p: float, df: float) -> float:
    """Student-t quantile (numpy has none, scipy is not a dependency); normal for df = inf.

    With t = sqrt(df) tan(theta) the t density becomes cos(theta)^(df-1), smooth on [0, pi/2),
    so a fine trapezoid rule and interpolation give the quantile to about 1e-6.
    """
    if not 0 < p < 1:
        raise ValueError("p must be in (0, 1)")
    if not math.isfinite(df):
        return NormalDist().inv_cdf(p)
    if df <= 0:
        raise ValueError("df must be positive")
    if p < 0.5:
        return -t_quantile(1 - p, df)
    theta = np.linspace(0.0, math.pi / 2, 20001)
    dens = np.cos(theta) ** (df - 1)
    cdf = np.concatenate([[0.0], np.cumsum((dens[1:] + dens[:-1]) / 2 * np.diff(theta))])
    norm = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(math.pi)
    return float(math.sqrt(df) * math.tan(np.interp(p - 0.5, norm * cdf, theta)))


def t_scale(level: float, df: float) -> float:
    """Factor that turns a normal-quantile interval into a t one at this level."""
    p = 0.5 + level / 2
    return t_quantile(p, df) / NormalDist().inv_cdf(p)


def satterthwaite(variances: Sequence[float], dfs: Sequence[float]) -> float:
    """Welch-Satterthwaite degrees of freedom of a sum of independent variance estimates."""
    num = sum(variances) ** 2
    den = sum(v * v / d for v, d in zip(variances, dfs, strict=True) if d > 0 and math.isfinite(d))
    return num / den if den > 0 else math.inf


def _interval(samples: np.ndarray, level: float) -> list[float]:
    """Equal-tailed percentile interval of (already corrected) bootstrap samples."""
    lo, hi = np.quantile(samples, [0.5 - level / 2, 0.5 + level / 2])
    return [float(lo), float(hi)]


# --------------------------------------------------------------------------- bootstrap of one optimum


def _as_losses(losses) -> np.ndarray:
    """losses[seed, eval_batch, lr]; a (seed, lr) table is one evaluation batch per run."""
    arr = np.asarray(losses, dtype=float)
    if arr.ndim == 1:
        arr = arr[None, None, :]
    elif arr.ndim == 2:
        arr = arr[:, None, :]
    if arr.ndim != 3:
        raise ValueError(f"losses must be [seed, eval_batch, lr], got shape {arr.shape}")
    return arr


def _decompose(losses: np.ndarray) -> tuple[np.ndarray, ...]:
    """Grand mean, seed effects, batch effects and interaction; their sum is the table exactly.

    An LR where any run is NaN is NaN in the mean and zero in the effects, so it stays out of
    every resample, as it is out of the point estimate.
    """
    mean = losses.mean(axis=(0, 1))
    ok = np.isfinite(mean)
    clean = np.where(ok, losses, 0.0)
    m = clean.mean(axis=(0, 1))
    seed = clean.mean(axis=1) - m
    batch = clean.mean(axis=0) - m
    inter = clean - m - seed[:, None, :] - batch[None, :, :]
    return mean, seed, batch, inter


def _inflation(n: int) -> float:
    return math.sqrt(n / (n - 1)) if n > 1 else 1.0


def _resample_curves(losses: np.ndarray, n_boot: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Curves from one set of seed and batch draws, with per-level sqrt(n/(n-1)) inflation: the
    joint resample, and the seed-only, batch-only and interaction-only parts of it."""
    n_s, n_e, _ = losses.shape
    mean, seed, batch, inter = _decompose(losses)
    cs, ce = _inflation(n_s), _inflation(n_e)
    si = rng.integers(0, n_s, size=(n_boot, n_s))
    bi = rng.integers(0, n_e, size=(n_boot, n_e))
    seed_part = cs * seed[si].mean(axis=1)
    batch_part = ce * batch[bi].mean(axis=1)
    inter_part = cs * ce * inter[si[:, :, None], bi[:, None, :]].mean(axis=(1, 2))
    return {"joint": mean + seed_part + batch_part + inter_part, "seed": mean + seed_part,
            "batch": mean + batch_part, "inter": mean + inter_part}


def _parts_df(parts: Sequence[float], n_s: int, n_e: int) -> float:
    """Satterthwaite degrees of freedom of the seed, batch and interaction parts of n_s seeds x n_e batches."""
    return satterthwaite(parts, [n_s - 1, n_e - 1, (n_s - 1) * (n_e - 1)])


def _components(opt: dict[str, np.ndarray], n_s: int, n_e: int) -> tuple[list[float], float]:
    """The optimum's variance from seeds, batches and their interaction, and its Satterthwaite df.

    Seed-only draws see seed + interaction variance, batch-only draws batch + interaction, so
    the interaction is subtracted once from each (the joint draws count it three times).
    """
    v_seed, v_batch, v_inter = (float(np.var(opt[k])) for k in ("seed", "batch", "inter"))
    parts = [max(v_seed - v_inter, 0.0), max(v_batch - v_inter, 0.0), v_inter]
    return parts, _parts_df(parts, n_s, n_e)


def _seed_share(parts: list[float]) -> float:
    """The part of the variance that more seeds would shrink (seed and interaction)."""
    total = sum(parts)
    return (parts[0] + parts[2]) / total if total > 0 else 1.0


def _inconclusive(reason: str, **extra) -> dict:
    return {"status": "inconclusive", "reason": reason, **extra}


def _rng(rng) -> np.random.Generator:
    return rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)


def bootstrap_optimum(xs, losses, n_boot: int = DEFAULT_BOOT, rng=0, level: float = DEFAULT_LEVEL) -> dict:
    """Optimum log2 LR with a confidence interval from a two-level bootstrap (module docstring).

    losses[seed, eval_batch, lr] (NaN where a run diverged). Returns estimate (parabola vertex of
    the seed- and batch-mean curve), ci [lo, hi] at ``level``, samples (the corrected bootstrap
    optima: the interval is their percentiles, and a shift over axis values is bootstrapped by
    combining them draw by draw), raw_samples (uncorrected), df, t_scale (the factor applied to
    the deviations), variance_parts (the optimum's variance from seeds, evaluation batches and their
    interaction), seed_var_share (the part that more seeds would shrink), fit (fit_optimum of the mean curve),
    n_seeds, n_eval_batches, status ('ok' | 'inconclusive') and reason. Bad input gives
    status 'inconclusive' with a reason, never an exception; so does an optimum at a grid end.
    """
    xs, arr = _grid(xs), _as_losses(losses)
    if arr.shape[2] != len(xs):
        raise ValueError(f"losses has {arr.shape[2]} LR columns, xs {len(xs)}")
    n_s, n_e = arr.shape[:2]
    if n_s == 0 or n_e == 0:
        return _inconclusive(f"no runs: losses has shape {arr.shape}", estimate=None, ci=None, samples=None,
                             n_seeds=n_s, n_eval_batches=n_e)
    fit = fit_optimum(xs, arr.mean(axis=(0, 1)))
    base = {"estimate": fit["lr_log2"], "ci": None, "level": level, "samples": None, "raw_samples": None,
            "fit": fit, "n_seeds": n_s, "n_eval_batches": n_e, "df": None, "t_scale": None,
            "variance_parts": None, "seed_var_share": None}
    if fit["method"] == "none":
        return {**base, **_inconclusive("every run diverged or failed: no finite loss")}
    if fit["points"] < MIN_POINTS:
        return {**base, **_inconclusive(f"only {fit['points']} finite LR point(s) around the minimum; "
                                        f"a parabola needs {MIN_POINTS}")}
    if n_s < 2:
        return {**base, **_inconclusive(f"{n_s} seed: a bootstrap interval needs at least 2 seeds")}
    out = {**base, **_bootstrap(xs, arr, fit["lr_log2"], n_boot, _rng(rng), level)}
    if fit["at_edge"]:
        out.update(_inconclusive("the optimum is at an end of the grid (it may lie outside): widen the grid"))
    return out


def _bootstrap(xs: np.ndarray, arr: np.ndarray, estimate: float, n_boot: int, rng: np.random.Generator,
               level: float) -> dict:
    """Corrected bootstrap optima: the joint draws' deviations from the estimate, rescaled to the
    component variance and by t_nu / z."""
    opt = {k: _fit_rows(xs, v)["lr_log2"] for k, v in _resample_curves(arr, n_boot, rng).items()}
    parts, df = _components(opt, *arr.shape[:2])
    v_joint = float(np.var(opt["joint"]))
    k = (math.sqrt(sum(parts) / v_joint) if v_joint > 0 else 1.0) * t_scale(level, df)
    samples = estimate + k * (opt["joint"] - estimate)
    return {"ci": _interval(samples, level), "samples": samples, "raw_samples": opt["joint"], "df": df,
            "t_scale": k, "variance_parts": parts, "seed_var_share": _seed_share(parts), "status": "ok",
            "reason": None}


# --------------------------------------------------------------------------- shift across axis values


def _samples_of(item) -> tuple[float | None, np.ndarray | None, dict]:
    """(estimate, samples, result) from a bootstrap_optimum result or a bare sample array."""
    if isinstance(item, dict):
        s = item.get("samples")
        return item.get("estimate"), None if s is None else np.asarray(s, dtype=float), item
    s = np.asarray(item, dtype=float)
    return float(np.median(s)), s, {}


def _stack(per_value_samples) -> tuple[np.ndarray | None, np.ndarray | None, list[dict], str | None]:
    """Estimates (V,), samples (B, V) paired draw by draw (``bootstrap_shift``), and the
    reasons of any value that is inconclusive (samples None when a value has none)."""
    items = [_samples_of(it) for it in per_value_samples]
    results = [r for _, _, r in items]
    flagged = [i for i, (e, s, r) in enumerate(items) if s is None or e is None or r.get("status") == "inconclusive"]
    reason = "; ".join(f"value #{i}: {items[i][2].get('reason') or 'no bootstrap samples'}" for i in flagged) or None
    if not items or any(s is None or e is None for e, s, _ in items):
        return None, None, results, reason or "no values"
    n = min(len(s) for _, s, _ in items)
    est = np.array([e for e, _, _ in items], dtype=float)
    return est, np.stack([s[:n] for _, s, _ in items], axis=1), results, reason


def _slope(log_axis: np.ndarray, y: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """Least-squares slope of y (..., V) on log_axis (V,), row by row (weighted by ``weights``, if given)."""
    w = np.ones_like(log_axis) if weights is None else weights
    d = log_axis - np.average(log_axis, weights=w)
    return (y - np.average(y, axis=-1, weights=w)[..., None]) @ (w * d) / (d @ (w * d))


def _planning(results: list[dict], reason: str | None) -> dict:
    """What verdict needs besides the interval: seeds, evaluation batches and variance parts for
    the extra-seed estimate (the least informed value rules the counts, the parts add up), and
    the status (inconclusive when any value was)."""
    seeds = [r["n_seeds"] for r in results if r.get("n_seeds")]
    batches = [r["n_eval_batches"] for r in results if r.get("n_eval_batches")]
    parts = [r["variance_parts"] for r in results if r.get("variance_parts") is not None]
    total = [float(sum(p[i] for p in parts)) for i in range(3)] if parts else None
    return {"n_seeds": min(seeds) if seeds else None, "n_eval_batches": min(batches) if batches else None,
            "variance_parts": total, "seed_var_share": None if total is None else _seed_share(total),
            "status": "inconclusive" if reason else "ok", "reason": reason}


def _summary(estimate: float, samples: np.ndarray, level: float, plan: dict) -> dict:
    """A derived statistic (shift, drift, slope, law coefficient, prediction, residual) with its interval.

    Its variance parts are those of the optima it is made of, in their proportions (seed, batch,
    interaction), rescaled to the statistic's own bootstrap variance: a difference or an
    extrapolation of optima does not have the variance of their sum (shared draws cancel, a law's
    prediction amplifies), and extra_seeds reads the parts against this statistic's interval.
    """
    parts = plan.get("variance_parts")
    if parts and sum(parts) > 0 and plan.get("n_seeds") and plan.get("n_eval_batches"):
        df = _parts_df(parts, plan["n_seeds"], plan["n_eval_batches"])
        scale = float(np.var(samples)) / t_scale(level, df) ** 2 / sum(parts)
        plan = {**plan, "variance_parts": [p * scale for p in parts]}
    return {"estimate": float(estimate), "ci": _interval(samples, level), "samples": samples, "level": level,
            **plan}


def bootstrap_shift(per_value_samples, axis_values, level: float = DEFAULT_LEVEL) -> dict:
    """Intervals on the shift (max - min of the optima), drift (last - first) and slope per doubling.

    per_value_samples: one bootstrap_optimum result (or 1-D sample array) per axis value, in the
    order of axis_values. Draw b of every value makes draw b of the shift. When the values share
    their seeds and evaluation batches (a crossed design: seed s is the same initialisation and
    data at every value), resample them with the same draws (the same ``rng`` and table shape):
    draw b then holds the same seeds everywhere and the interval keeps their common part; values
    resampled independently pair into valid joint draws too, only wider. The shift is a max - min and
    is biased upward by noise (about 2 sd for four values with no true shift); its interval
    inherits that, so prefer the slope or drift to decide a trend. A value that is inconclusive
    (at a grid end, say) makes all three inconclusive, with intervals where samples exist.
    """
    axis, est, samples, results, reason, plan = _per_value(axis_values, per_value_samples)
    head = {"axis_values": axis.tolist(), "level": level, "status": plan["status"], "reason": reason}
    if len(axis) < 2:
        return {**head, **_inconclusive("a shift needs at least 2 axis values"),
                "shift": None, "drift": None, "slope": None}
    if samples is None:
        return {**head, "shift": None, "drift": None, "slope": None}
    log_axis = np.log2(axis)
    return {**head,
            "shift": _summary(est.max() - est.min(), samples.max(axis=1) - samples.min(axis=1), level, plan),
            "drift": _summary(est[-1] - est[0], samples[:, -1] - samples[:, 0], level, plan),
            "slope": _summary(float(_slope(log_axis, est)), _slope(log_axis, samples), level, plan)}


# --------------------------------------------------------------------------- verdict


def _per_value(axis_values, per_value_samples) -> tuple:
    """The axis as floats and the stacked per-value bootstrap results (``_stack``) with their plan."""
    axis = np.asarray(axis_values, dtype=float)
    per_value_samples = list(per_value_samples)
    if len(axis) != len(per_value_samples):
        raise ValueError(f"{len(per_value_samples)} per-value results for {len(axis)} axis values")
    est, samples, results, reason = _stack(per_value_samples)
    return axis, est, samples, results, reason, _planning(results, reason)


def _decided(lo: float, hi: float, goal: float, direction: str) -> str:
    inside = {"below": hi <= goal, "above": lo >= goal, "within": -goal <= lo and hi <= goal}[direction]
    outside = {"below": lo > goal, "above": hi < goal, "within": lo > goal or hi < -goal}[direction]
    return "pass" if inside else "fail" if outside else "inconclusive"


def _gap(lo: float, hi: float, goal: float, direction: str) -> tuple[float, float]:
    """(distance from the interval's midpoint to the nearest goal edge, its half-width)."""
    mid, half = (lo + hi) / 2, (hi - lo) / 2
    edges = [goal] if direction != "within" else [-goal, goal]
    return min(abs(mid - g) for g in edges), half


def _half_width_factor(n: int, n_new: int, parts: list[float] | None, n_e: int, level: float) -> float:
    """How the half-width scales from n to n_new seeds. Without variance parts: 1/sqrt(seeds).
    With them: the seed and interaction parts shrink like 1/seeds, the batch part stays, and the
    t quantile falls as the Satterthwaite degrees of freedom grow."""
    if not parts or sum(parts) <= 0:
        return math.sqrt(n / n_new)
    new = [parts[0] * n / n_new, parts[1], parts[2] * n / n_new]
    p = 0.5 + level / 2
    t_old = t_quantile(p, _parts_df(parts, n, n_e))
    t_new = t_quantile(p, _parts_df(new, n_new, n_e))
    return math.sqrt(sum(new) / sum(parts)) * t_new / t_old


def extra_seeds(lo: float, hi: float, goal: float, direction: str, seeds: int | None,
                variance_parts: list[float] | None = None, n_eval_batches: int = 1,
                level: float = DEFAULT_LEVEL) -> tuple[int | None, str | None]:
    """More seeds that would likely decide a straddling interval: the fewest with which its
    half-width fits between its midpoint, assumed to stay put, and the goal. The half-width goes
    like 1/sqrt(seeds); given the variance parts of bootstrap_optimum, only the seed-driven ones
    shrink and the t factor falls too. (None, note) when seeds are unlikely to decide it."""
    if not seeds:
        return None, "number of seeds unknown"
    dist, half = _gap(lo, hi, goal, direction)
    if dist <= 0:
        return None, "the interval is centred on the goal: more seeds are unlikely to decide it"
    if variance_parts and sum(variance_parts) > 0:
        t = t_quantile(0.5 + level / 2, _parts_df(variance_parts, seeds, n_eval_batches))
        if t * math.sqrt(sum(variance_parts)) < half / 2:  # the parts do not explain the interval
            return None, ("the interval comes from unstable fits (a tail of far-off optima among the resamples), "
                          "not from noise that averages away: add seeds and evaluation batches, or narrow the "
                          "LR grid's step")

    def fits(n_new: int) -> bool:
        return half * _half_width_factor(seeds, n_new, variance_parts, n_eval_batches, level) <= dist * (1 + 1e-9)

    low, top = seeds, seeds + MAX_EXTRA_SEEDS
    if not fits(top):
        batchy = bool(variance_parts) and variance_parts[1] > 0  # the part that seeds leave
        return None, ("the evaluation-batch noise alone keeps it undecided: add evaluation batches" if batchy
                      else f"more than {MAX_EXTRA_SEEDS} extra seeds")
    while top - low > 1:  # fits(low) is false, fits(top) true, and the factor falls with seeds
        mid = (low + top) // 2
        low, top = (low, mid) if fits(mid) else (mid, top)
    return top - seeds, None


def _unpack(interval, estimate, seeds) -> tuple[list[float] | None, float | None, dict]:
    """ci, estimate and the planning fields from a result dict or a bare [lo, hi]."""
    if not isinstance(interval, dict):
        return (None if interval is None else [float(v) for v in interval]), estimate, {"n_seeds": seeds}
    info = dict(interval)
    info["n_seeds"] = seeds or info.get("n_seeds")
    return info.get("ci"), info.get("estimate") if estimate is None else estimate, info


def verdict(interval, goal: float, direction: str = "below", *, estimate: float | None = None,
            seeds: int | None = None, undecided_note: str | None = None) -> dict:
    """pass (interval entirely inside the goal), fail (entirely outside) or inconclusive (straddles).

    interval: [lo, hi], or a result of bootstrap_optimum / coord_slope / one entry of
    bootstrap_shift (its ci, estimate, n_seeds, n_eval_batches, variance_parts, status and reason are used;
    an inconclusive result stays inconclusive). direction: 'below' (value <= goal passes),
    'above' (value >= goal) or 'within' (|value| <= goal). Returns outcome, exit_status (0/1/3),
    interval, estimate, goal, direction, extra_seeds_needed (0 when decided, None when seeds are
    not what is missing) and reason. ``undecided_note``: what a straddling interval's reason says in
    place of the seed estimate, for an interval this check's seeds are not what narrows.
    """
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    ci, est, info = _unpack(interval, estimate, seeds)
    out = {"goal": goal, "direction": direction, "interval": ci, "estimate": est}
    if ci is None or len(ci) != 2 or not all(math.isfinite(v) for v in ci):
        return {**out, **_undecided(info.get("reason") or "no interval")}
    if info.get("status") == "inconclusive":
        return {**out, **_undecided(info.get("reason") or "inconclusive input")}
    lo, hi = ci
    outcome = _decided(lo, hi, goal, direction)
    reason = _reason(outcome, lo, hi, goal, direction)
    extra, note = 0, None
    if outcome == "inconclusive":
        extra, note = extra_seeds(lo, hi, goal, direction, info.get("n_seeds"), info.get("variance_parts"),
                                  info.get("n_eval_batches") or 1, info.get("level") or DEFAULT_LEVEL)
        note = undecided_note or note
    return {**out, "outcome": outcome, "exit_status": EXIT_STATUS[outcome], "extra_seeds_needed": extra,
            "reason": reason if note is None else f"{reason}; {note}"}


def _undecided(reason: str) -> dict:
    return {"outcome": "inconclusive", "exit_status": EXIT_INCONCLUSIVE, "extra_seeds_needed": None,
            "reason": reason}


def _reason(outcome: str, lo: float, hi: float, goal: float, direction: str) -> str:
    target = {"below": f"<= {goal:g}", "above": f">= {goal:g}", "within": f"within +-{goal:g}"}[direction]
    where = {"pass": "inside", "fail": "outside", "inconclusive": "straddles"}[outcome]
    return f"interval [{lo:.3f}, {hi:.3f}] {where} the goal {target}"


def exit_status(outcome: str) -> int:
    """Process exit status for a verdict outcome: pass 0, fail 1, inconclusive 3."""
    return EXIT_STATUS[outcome]


# --------------------------------------------------------------------------- power law and coordinate check


def fit_power_law(axis_values, per_value_samples, holdout: float | None = None, holdout_samples=None,
                  level: float = DEFAULT_LEVEL, beta: float | None = None, weights=None) -> dict:
    """log2 LR*(T) = a - beta * log2 T through the optima at the (shorter) axis values.

    For token horizons and batch sizes, where the optimum moves by design: fit on the short
    values, predict a longer one. Each bootstrap draw of the optima gives a draw of (a, beta), so
    the intervals on beta and on the prediction at ``holdout`` carry the optima's noise. With
    holdout_samples (a bootstrap_optimum result at the held-out value) also the residual
    measured - predicted and its interval: it contains 0 when the law extrapolates. With ``beta``
    given the exponent is a rule's, not fitted (only a is; beta's interval is then the point). With
    ``weights`` (one per axis value) the least squares are weighted (``mutransfer.law_forms``).
    """
    axis, est, samples, results, reason, plan = _per_value(axis_values, per_value_samples)
    out = {"axis_values": axis.tolist(), "level": level, "holdout": holdout, "status": plan["status"],
           "reason": reason, "a": None, "beta": None, "prediction": None, "residual": None}
    if len(np.unique(axis)) < 2:
        return {**out, **_inconclusive("a power law needs optima at 2 distinct axis values or more")}
    if samples is None:
        return out
    x = np.log2(axis)
    w = np.ones_like(x) if weights is None else np.asarray(weights, dtype=float) / np.sum(weights)
    if beta is None:
        slope, slope_s = float(_slope(x, est, w)), _slope(x, samples, w)
    else:
        slope, slope_s = -float(beta), np.full(samples.shape[0], -float(beta))
    x_bar = np.average(x, weights=w)
    a, a_s = np.average(est, weights=w) - slope * x_bar, np.average(samples, axis=1, weights=w) - slope_s * x_bar
    out.update(a=_summary(a, a_s, level, plan), beta=_summary(-slope, -slope_s, level, plan))
    if holdout is not None:
        h = math.log2(holdout)
        out["prediction"] = _summary(a + slope * h, a_s + slope_s * h, level, plan)
        if holdout_samples is not None:
            out["residual"] = _residual(out["prediction"], holdout_samples, level)
    return out


def _residual(prediction: dict, holdout_samples, level: float) -> dict:
    """measured - predicted at the held-out value, paired draw by draw (``bootstrap_shift``)."""
    est, s, res = _samples_of(holdout_samples)
    if s is None or est is None:
        return _inconclusive(res.get("reason") or "no bootstrap samples at the held-out value")
    n = min(len(s), len(prediction["samples"]))
    reason = res.get("reason") if res.get("status") == "inconclusive" else None
    plan = _planning([res, prediction], reason)  # the residual's noise is both sides'
    if prediction["status"] == "inconclusive":
        plan.update(status="inconclusive", reason=prediction["reason"])
    return _summary(est - prediction["estimate"], s[:n] - prediction["samples"][:n], level, plan)


def coord_slope(widths, sizes, n_boot: int = DEFAULT_BOOT, rng=0, level: float = DEFAULT_LEVEL) -> dict:
    """Slope of log2(size) on log2(width) for the coordinate check, with an interval over seeds.

    sizes[seed, width] (positive). The estimate is the slope of the seed-mean size, as in
    analysis.coord. The interval resamples seeds and is estimate +- t_(n-1) * sqrt(n/(n-1)) * the
    bootstrap sd: the slope is near-linear in the data, and with one level and 2-4 seeds the
    bootstrap distribution has few atoms (10 for 3 seeds), whose percentiles undercover (0.87 at
    90 % measured with 3 seeds) while their spread does not (0.90).
    """
    w = np.asarray(widths, dtype=float)
    arr = np.atleast_2d(np.asarray(sizes, dtype=float))
    base = {"estimate": None, "ci": None, "samples": None, "level": level, "n_seeds": arr.shape[0],
            "df": None, "variance_parts": None, "seed_var_share": 1.0, "n_eval_batches": 1}
    if arr.ndim != 2 or arr.shape[0] == 0 or arr.shape[1] != len(w) or len(w) < 2:
        return {**base, **_inconclusive(f"need sizes[seed, width] with 2 widths or more; got {arr.shape} "
                                         f"for {len(w)} widths")}
    if not np.all(np.isfinite(arr)) or np.any(arr <= 0):
        return {**base, **_inconclusive("a size is not positive and finite")}
    x = np.log2(w)
    estimate = float(_slope(x, np.log2(arr.mean(axis=0))))
    n = arr.shape[0]
    if n < 2:
        return {**base, "estimate": estimate, **_inconclusive("1 seed: an interval over seeds needs at least 2")}
    idx = _rng(rng).integers(0, n, size=(n_boot, n))
    raw = _slope(x, np.log2(arr[idx].mean(axis=1)))
    k = _inflation(n) * t_scale(level, n - 1)
    half = _inflation(n) * t_quantile(0.5 + level / 2, n - 1) * float(np.std(raw))
    return {**base, "estimate": estimate, "ci": [estimate - half, estimate + half],
            "samples": estimate + k * (raw - estimate), "df": float(n - 1), "t_scale": k,
            "variance_parts": [_inflation(n) ** 2 * float(np.var(raw)), 0.0, 0.0], "status": "ok", "reason": None}
