"""Models fitted to measurements: a link's latency and bandwidth, a straight line, a rank's
share of the cores, and the simulator's prediction for one ring attention layer from
measured kernel rates. Pure functions; ``ringattn bench calibrate`` and ``bench memory``
measure, these turn the measurements into a model.
"""

from __future__ import annotations

from ringattn.plan.hardware import calibrate_from
from ringattn.plan.simulate import simulate

__all__ = ["core_share", "fit_budget", "fit_line", "fit_link", "predict", "rel_err"]


def fit_link(sizes: list[float], times: list[float]) -> tuple[float, float]:
    """(latency_s, bytes/s) of ``t = latency + bytes / bandwidth``: latency is the smallest
    message's time (a fitted intercept can go negative), the bandwidth the least-squares
    slope of the larger ones with it held fixed."""
    pts = sorted(zip(sizes, times))
    lat = pts[0][1]
    rest = pts[1:] or pts
    num = sum(x * (y - lat) for x, y in rest)
    den = sum(x * x for x, _ in rest)
    slope = num / den if den > 0 else 0.0
    return lat, 1.0 / max(slope, 1e-18)


def fit_line(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares ``y = a x + b``; one point gives the line through the origin."""
    n = len(xs)
    if n == 1:
        return ys[0] / xs[0], 0.0
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    a = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    return a, my - a * mx


def fit_budget(xs: list[float], ys: list[float], budget: float, step: int):
    """(a, b, x_max): the :func:`fit_line` ``y = a x + b`` and the largest multiple of ``step``
    whose fitted y stays within ``budget`` (0 if none, or if y does not grow with x)."""
    a, b = fit_line(xs, ys)
    # (+1e-6: a solution on an exact multiple must not round down to the one below)
    x = int((budget - b) / a + 1e-6) // step * step if a > 0 else 0
    return a, b, max(x, 0)


def core_share(world: int, n_cores: int, probe: float | None = None) -> float:
    """A rank's fraction of a core, ``world`` ranks on ``n_cores`` cores: ``min(1, cores / W)``
    idle; with a probe p < 1 (a busy loop's CPU / wall time), ``cores / p - 1`` other
    processes share the cores too."""
    # p >= 0.98 cannot tell 0 from cores - 1 other processes: read it as an idle machine
    background = 0.0 if probe is None or probe >= 0.98 else n_cores / max(probe, 1e-3) - 1.0
    return min(1.0, n_cores / (world + background))


def predict(
    row: dict, rates: dict, latency_s: float, link_bw: float, share: float, dtype_bytes: int
) -> dict:
    """Simulated fwd, bwd and busiest-rank compute (seconds) of one ring attention layer.

    ``row``: the problem (world, seq, layout, causal, batch, heads, kv_heads, head_dim);
    ``rates``: measured ``fwd_flops`` and ``bwd_flops`` of the kernel (FLOP/s, backward
    counted as the simulator counts it); ``share`` scales kernel rates and link bandwidth (a
    rank's fraction of a core); ``dtype_bytes`` per element of the K, V blocks sent.
    """
    kw = {k: row[k] for k in ("layout", "causal", "batch", "heads", "kv_heads", "head_dim")}
    kw.update(dtype_bytes=dtype_bytes, acc_bytes=4, record=False)
    w, s = row["world"], row["seq"]
    # a calibrated Hardware that achieves ``rate`` on attention (memory plays no part in timing)
    link = dict(link_bw=link_bw * share, latency_s=latency_s, mem_bytes=1e12)
    hw = lambda rate: calibrate_from(dict(link, flops=rate, attn_flops=rate), base="cpu")
    hw_f, hw_b = hw(rates["fwd_flops"] * share), hw(rates["bwd_flops"] * share)
    fwd = simulate(w, s, hw_f, backward=False, **kw)
    full_b = simulate(w, s, hw_b, backward=True, **kw)
    fwd_b = simulate(w, s, hw_b, backward=False, **kw)  # to take the forward out of full_b
    busy = [f + fb - ff for f, fb, ff in zip(fwd.busy_s, full_b.busy_s, fwd_b.busy_s)]
    exposed = fwd.fwd_exposed_s + full_b.bwd_exposed_s
    return dict(fwd_s=fwd.fwd_s, bwd_s=full_b.bwd_s, fwdbwd_s=fwd.fwd_s + full_b.bwd_s,
                busy_max_s=max(busy), exposed_s=exposed)  # fmt: skip


def rel_err(pred: float, meas: float) -> float:
    """(predicted - measured) / measured: negative = the model is optimistic."""
    return (pred - meas) / meas
