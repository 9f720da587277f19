"""Turn a benchmark payload into Markdown tables and PNG plots."""
from __future__ import annotations

from pathlib import Path


def _rate(row: dict, ms: float | None) -> float | None:
    """TFLOP/s or TB/s of the row's work done in `ms`; None for rows that only compare times."""
    work = row["work"].get("flops", row["work"].get("bytes"))
    if not ms or work is None:
        return None
    return work / (ms * 1e-3) / 1e12


def _unit(row: dict) -> str:
    if "flops" in row["work"]:
        return "TFLOP/s"
    return "TB/s" if "bytes" in row["work"] else ""


def _fmt(value: float | None, digits: int = 1) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def _config_label(config: dict) -> str:
    return " ".join(f"{key}={value}" for key, value in config.items())


def suite_table(name: str, rows: list[dict], ceilings: dict) -> list[str]:
    if not rows:
        return []
    peers = list(rows[0]["peers_ms"])
    unit = _unit(rows[0])
    ceiling = ceilings.get("matmul_tflops" if unit == "TFLOP/s" else "copy_tbps")
    if unit:
        header = ["config", "ours ms", f"ours {unit}"] + [f"{p} {unit}" for p in peers]
    else:
        header = ["config", "ours ms"] + [f"{p} ms" for p in peers]
    header += [f"x {p}" for p in peers] + (["fraction of ceiling"] if unit else [])
    lines = [f"## {name}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        ours_rate = _rate(row, row["ours_ms"])
        cells = [_config_label(row["config"]), _fmt(row["ours_ms"], 3)]
        if unit:
            cells += [_fmt(ours_rate)] + [_fmt(_rate(row, row["peers_ms"][p])) for p in peers]
        else:
            cells += [_fmt(row["peers_ms"][p], 3) for p in peers]
        cells += [_fmt(row["ratios"][p], 2) for p in peers]
        if unit:
            cells.append(_fmt(ours_rate / ceiling, 2) if ours_rate and ceiling else "")
        lines.append("| " + " | ".join(cells) + " |" + (f" {row['notes']}" if row["notes"] else ""))
    return lines + [""]


def markdown(payload: dict) -> str:
    ceilings = payload["ceilings"]
    lines = [
        f"# flashfx benchmarks, {payload['date']}, {payload['device']} (torch {payload['torch']})",
        "",
        f"Ceilings measured in this run: {ceilings or 'none (no GPU)'}. Ratios are peer time / our time "
        "(above 1: we are faster).",
        f"GPU tests: {payload['gpu_tests']}",
        "",
    ]
    for name, rows in payload["suites"].items():
        lines += suite_table(name, rows, ceilings)
    return "\n".join(lines)


def plots(payload: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = payload["suites"].get("attention", [])
    if not rows:
        return
    panels = sorted({(r["config"]["head_dim"], r["config"]["causal"]) for r in rows})
    figure, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for axis, (head_dim, causal) in zip(axes[0], panels):
        panel = [r for r in rows if r["config"]["head_dim"] == head_dim and r["config"]["causal"] == causal]
        lengths = [r["config"]["seqlen"] for r in panel]
        series = {"ours": [_rate(r, r["ours_ms"]) for r in panel]}
        for peer in panel[0]["peers_ms"]:
            series[peer] = [_rate(r, r["peers_ms"][peer]) for r in panel]
        for label, values in series.items():
            points = [(x, y) for x, y in zip(lengths, values) if y is not None]
            if points:
                axis.plot(*zip(*points), marker="o", label=label, linewidth=2.5 if label == "ours" else 1)
        axis.set_xscale("log", base=2)
        axis.set_title(f"head dim {head_dim}, {'causal' if causal else 'non-causal'}")
        axis.set_xlabel("sequence length")
        axis.set_ylabel("TFLOP/s")
        axis.legend(fontsize=7)
    figure.suptitle(f"attention forward, {payload['device']}")
    figure.tight_layout()
    figure.savefig(out / "attention.png", dpi=120)
    plt.close(figure)
