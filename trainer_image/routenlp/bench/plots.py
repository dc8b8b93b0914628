"""PNG plots of a routing benchmark result (matplotlib, Agg backend)."""

from __future__ import annotations

from pathlib import Path

from routenlp.router.conformal import ALL_REQUESTS


def plot_all(res: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    name = res["dataset"]
    paths = []
    # 1. Cost-quality curves (seed 0, test split), normalised by the reference.
    fig, ax = plt.subplots(figsize=(7, 5))
    for m, r in res["methods"].items():
        pts = sorted(p for p in r["curve"] if None not in p)
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        style = dict(marker="o", ms=3) if len(pts) > 1 else dict(marker="*", ms=12, ls="none")
        if m == "oracle":
            style = dict(marker="X", ms=12, ls="none", color="black")
        ax.plot(xs, ys, label=m, **style)
    ax.axhline(0.97, color="grey", ls=":", lw=1)
    paths.append(_finish(fig, ax, out / f"{name}-cost-quality.png", "cost / cost of always-reference",
                         "quality / quality of always-reference", f"{name}: cost-quality on test (seed 0)"))
    # 2. Violation rate vs alpha per calibration size, with y = alpha.
    study = res.get("violation_study") or []
    if study:
        fig, ax = plt.subplots(figsize=(6, 4.5))
        sizes = sorted({v["cal_size"] for v in study})
        alphas = sorted({v["alpha"] for v in study})
        for i, size in enumerate(sizes):
            # Cells where nothing was accepted have no rate (None): no point.
            rows = sorted((v for v in study if v["cal_size"] == size and v["violation_rate"] is not None),
                          key=lambda v: v["alpha"])
            if not rows:
                ax.plot([], [], marker="o", label=f"calibration n={size} (nothing accepted)")
                continue
            xs = [v["alpha"] * (1 + 0.04 * (i - 1)) for v in rows]
            ys = [v["violation_rate"] for v in rows]
            err = [[v["violation_rate"] - v["violation_rate_ci"][0] for v in rows],
                   [v["violation_rate_ci"][1] - v["violation_rate"] for v in rows]]
            ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=f"calibration n={size}")
        lim = max(alphas) * 1.15
        ax.plot([0, lim], [0, lim], "k--", lw=1, label="y = alpha")
        ax.text(0.02, 0.97, "no point = nothing accepted below the reference (vacuous)", transform=ax.transAxes,
                fontsize=8, va="top")
        per_request = (res.get("routenlp") or {}).get("risk_measure") == ALL_REQUESTS
        paths.append(_finish(fig, ax, out / f"{name}-violation.png", "risk level alpha",
                             "test violation rate (" + ("share of requests reaching the tier" if per_request
                                                        else "among answers accepted below the reference") + ")",
                             f"{name}: RouteNLP violation rate vs alpha"))
    return paths


def _finish(fig, ax, path, xlabel: str, ylabel: str, title: str):
    """Label, save and close one figure; returns its path."""
    import matplotlib.pyplot as plt

    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
