"""What ``fastres train`` prints and draws: the progress line, the summary table, the timing note, the plot."""

from pathlib import Path

from .measure import DOUBT_MARK, timing_doubts, timing_note

TIMING_ADVICE = "Train more --steps on an otherwise idle machine (fewer threads: OMP_NUM_THREADS=1)."


def postfix(trainees) -> str:
    parts = []
    for t in trainees:
        h = t.history
        mem = h["memory_mb"][-1]
        parts.append(f"{t.label}: loss {h['loss'][-1]:.3f} acc {h['accuracy'][-1]:.2f} "
                     f"{h['step_ms'][-1]:.0f} ms" + (f" {mem:.0f} MB" if mem is not None else ""))
    return " | ".join(parts)


def ratio(a, b) -> float | None:
    return a / b if a is not None and b else None


def judge_timings(summaries: list[dict]) -> str | None:
    """Add timing_doubts and timing_trusted to each summary (``measure.timing_doubts``); the table's note, if any."""
    reference = summaries[1]["label"] if len(summaries) > 1 else None
    doubts = timing_doubts({s["label"]: {**s["step_spread"], "median_s": s["median_step_ms"] / 1e3} for s in summaries},
                           reference=reference)
    for s in summaries:
        s["timing_doubts"] = doubts[s["label"]]
        s["timing_trusted"] = not s["timing_doubts"]
    return timing_note(doubts, TIMING_ADVICE)


def _doubt(summary: dict) -> str:
    return " " + DOUBT_MARK if summary.get("timing_trusted") is False else ""


def table(summaries: list[dict]) -> str:
    ref = summaries[1] if len(summaries) > 1 else None

    def cell(value, spec, key, mark="", ratio_mark=""):
        text = ("-" if value is None else format(value, spec)) + mark
        if ref is not None:
            r = ratio(value, ref[key])
            text += f" | {r:.2f}x{ratio_mark}" if r is not None else " | -"
        return text

    vs = f" vs {ref['label']}" if ref else ""
    head = ["model", "test accuracy"] + ([vs.strip()] if ref else []) + ["median step ms"] + ([vs.strip()] if ref else []) \
        + ["peak step memory MB"] + ([vs.strip()] if ref else [])
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for s in summaries:
        step = cell(s["median_step_ms"], ".1f", key="median_step_ms", mark=_doubt(s),
                    ratio_mark=_doubt(s) if s is not ref else "")  # the reference's 1.00x is no measurement
        lines.append(
            f"| {s['label']} | {cell(s['test_accuracy'], '.4f', key='test_accuracy')} "
            f"| {step} "
            f"| {cell(s['peak_memory_mb'], '.1f', key='peak_memory_mb')} |"
        )
    return "\n".join(lines)


def plot(path: Path, trainees, title: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("--plot draws with matplotlib: pip install matplotlib") from None
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for t in trainees:
        h = t.history
        steps = range(1, len(h["loss"]) + 1)
        axes[0].plot(steps, h["loss"], label=t.label)
        axes[1].plot(steps, h["step_ms"], label=t.label)
        axes[2].plot(steps, [m if m is not None else float("nan") for m in h["memory_mb"]], label=t.label)
    from matplotlib.ticker import MaxNLocator

    for ax, ylabel in zip(axes, ("training loss", "step time (ms)", "step memory (MB)")):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
