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


def ceiling_fraction(row: dict, ceilings: dict) -> float | None:
    """Our rate over the measured ceiling of its unit (bf16 matmul or copy bandwidth); None for
    rows that only compare times, rows that did not run and runs without ceilings."""
    ours_rate = _rate(row, row["ours_ms"])
    ceiling = ceilings.get("matmul_tflops" if _unit(row) == "TFLOP/s" else "copy_tbps")
    return ours_rate / ceiling if ours_rate and ceiling else None


def _fmt(value: float | None, digits: int = 1) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def _config_label(config: dict) -> str:
    return " ".join(f"{key}={value}" for key, value in config.items())


def _groups(rows: list[dict]) -> list[list[dict]]:
    """Consecutive rows with the same peers and unit: one table each (a suite may mix kinds of row)."""
    groups: list[list[dict]] = []
    for row in rows:
        if groups and (list(groups[-1][0]["peers_ms"]), _unit(groups[-1][0])) == (list(row["peers_ms"]), _unit(row)):
            groups[-1].append(row)
        else:
            groups.append([row])
    return groups


def _table(rows: list[dict], ceilings: dict) -> list[str]:
    peers = list(rows[0]["peers_ms"])
    unit = _unit(rows[0])
    if unit:
        header = ["config", "ours ms", f"ours {unit}"] + [f"{p} {unit}" for p in peers]
    else:
        header = ["config", "ours ms"] + [f"{p} ms" for p in peers]
    header += [f"x {p}" for p in peers] + (["fraction of ceiling"] if unit else [])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        ours_rate = _rate(row, row["ours_ms"])
        cells = [_config_label(row["config"]), _fmt(row["ours_ms"], 3)]
        if unit:
            cells += [_fmt(ours_rate)] + [_fmt(_rate(row, row["peers_ms"][p])) for p in peers]
        else:
            cells += [_fmt(row["peers_ms"][p], 3) for p in peers]
        cells += [_fmt(row["ratios"][p], 2) for p in peers]
        if unit:
            cells.append(_fmt(ceiling_fraction(row, ceilings), 2))
        lines.append("| " + " | ".join(cells) + " |" + (f" {row['notes']}" if row["notes"] else ""))
    return lines + [""]


def suite_table(name: str, rows: list[dict], ceilings: dict) -> list[str]:
    if not rows:
        return []
    lines = [f"## {name}", ""]
    for group in _groups(rows):
        lines += _table(group, ceilings)
    return lines


def _tests_lines(tests: dict) -> list[str]:
    """The GPU tests' summary, then, where the outcomes were recorded, one line per test."""
    lines = ["## GPU tests", ""] + [f"- {key}: {value}" for key, value in tests.items() if key != "outcomes"]
    if tests.get("outcomes"):
        lines += ["", "| test | outcome |", "|---|---|"]
        lines += [f"| {test} | {outcome} |" for test, outcome in tests["outcomes"].items()]
    return lines + [""]


def _not_run_lines(payload: dict) -> list[str]:
    """Every test and config that did not run, and why."""
    tests = [f"- {test}: {outcome}" for test, outcome in payload["gpu_tests"].get("outcomes", {}).items()
             if outcome.startswith("not run")]
    rows = [f"- {name} {_config_label(row['config'])}: {row['notes']}" for name, rows in payload["suites"].items()
            for row in rows if row["notes"].startswith("not run")]
    return ["## Not run", ""] + (tests + rows or ["- nothing: every test and config ran"]) + [""]


def markdown(payload: dict, title: str = "flashfx benchmarks") -> str:
    ceilings = payload["ceilings"]
    lines = [
        f"# {title}, {payload['date']}, {payload['device']} (torch {payload['torch']})",
        "",
        f"Ceilings measured in this run: {ceilings or 'none (no GPU)'}. Ratios are peer time / our time "
        "(above 1: we are faster).",
        f"Seconds per part: {payload.get('elapsed_s') or 'not recorded'}",
        "",
    ]
    lines += _tests_lines(payload["gpu_tests"])
    for name, rows in payload["suites"].items():
        lines += suite_table(name, rows, ceilings)
    return "\n".join(lines + _not_run_lines(payload))


def _draw(axis, rows: list[dict], x_key: str, value) -> None:
    """One line per series (ours, then each peer) of value(row, ms) against row["config"][x_key]."""
    xs = [r["config"][x_key] for r in rows]
    series = {"ours": [value(r, r["ours_ms"]) for r in rows]}
    for peer in rows[0]["peers_ms"]:
        series[peer] = [value(r, r["peers_ms"][peer]) for r in rows]
    for label, values in series.items():
        points = [(x, y) for x, y in zip(xs, values) if y is not None]
        if points:
            axis.plot(*zip(*points), marker="o", label=label, linewidth=2.5 if label == "ours" else 1)
    axis.set_xscale("log", base=2)
    axis.legend(fontsize=7)


def _figure(panels: list[tuple[str, list[dict]]], x_key: str, value, x_label: str, y_label: str,
            title: str, path: Path, y_log: bool = False) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for axis, (panel_title, rows) in zip(axes[0], panels):
        _draw(axis, rows, x_key, value)
        axis.set_title(panel_title)
        axis.set_xlabel(x_label)
        axis.set_ylabel(y_label)
        if y_log:
            axis.set_yscale("log")
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _measured(rows: list[dict], **match) -> list[dict]:
    """The rows whose config has these values and that ran."""
    return [r for r in rows if r["ours_ms"] and all(r["config"].get(k) == v for k, v in match.items())]


def plots(payload: dict, out: Path) -> None:
    """attention.png: TFLOP/s against L, per head dim and causal flag; ssm_scan.png: scan ms
    against L, floors included; sparse_mlp.png: TB/s against batch at 10% density, per width."""
    suites, device = payload["suites"], payload["device"]
    attention = _measured(suites.get("attention", []))
    if attention:
        keys = sorted({(r["config"]["head_dim"], r["config"]["causal"]) for r in attention})
        panels = [(f"head dim {d}, {'causal' if c else 'non-causal'}", _measured(attention, head_dim=d, causal=c))
                  for d, c in keys]
        _figure(panels, "seqlen", _rate, "sequence length", "TFLOP/s", f"attention forward, {device}",
                out / "attention.png")
    scans = _measured(suites.get("ssm_scan", []), op="scan")
    if scans:
        _figure([("selective scan", scans)], "seqlen", lambda row, ms: ms, "sequence length", "ms",
                f"selective scan, {device}", out / "ssm_scan.png", y_log=True)
    mlps = _measured(suites.get("sparse_mlp", []), op="mlp", density=0.1)
    if mlps:
        panels = [(f"d {d}, 10% of ffn", _measured(mlps, d=d)) for d in sorted({r["config"]["d"] for r in mlps})]
        _figure(panels, "batch", _rate, "batch", "TB/s", f"sparse MLP, {device}", out / "sparse_mlp.png")
