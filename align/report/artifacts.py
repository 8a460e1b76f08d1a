"""Report sections read from training run directories and the store: curves, weights, monitor flags, lineage.

A version's run directory is where its version.json lives: the parent of its adapter (or merged) directory.
Every section is optional: a version without the file gets a note instead, never an error.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Optional, Sequence

from align.overfit import gap_rows
from align.runs import read_metrics
from align.store import get_model_version

# Curves shown first when present (the rest follow alphabetically, up to MAX_CURVES).
CURVE_PRIORITY = ("loss", "eval_loss", "eval_gap", "eval/loss", "rewards/margins", "rewards/accuracies", "kl/ref", "kl",
                  "gold/all", "eval/gold/all", "reward", "rewards/mean", "accuracy", "eval/accuracy",
                  "weights/ess_frac", "grad_norm", "learning_rate")
MAX_CURVES = 8
SKIP_CURVES = ("step", "epoch", "global_step", "total_flos", "train_runtime", "train_samples_per_second",
               "train_steps_per_second", "num_tokens", "eval_num_tokens", "eval_runtime", "eval_samples_per_second",
               "eval_steps_per_second", "eval_train_loss", "overfit/widening")  # bookkeeping, not training signals
WEIGHT_SCALARS = ("scheme", "weights/n", "weights/ess_frac", "weights/top1pct_share", "weights/clipped_frac",
                  "weights/max", "kl/per_token", "warning")


def run_dir_of(version) -> Optional[Path]:
    """The training run directory of a stored version, if it is on this machine."""
    if not version.adapter_path:
        return None
    run = Path(version.adapter_path).parent
    return run if (run / "version.json").is_file() else None


def training_curves(run: Path) -> Optional[dict]:
    """{key: [[step, value], ...]} of the numeric metrics in run/metrics.jsonl, most telling keys first."""
    rows = read_metrics(run / "metrics.jsonl")
    if not rows:
        return None
    curves: dict[str, list] = {}
    for i, row in enumerate(rows):
        step = row.get("step", i)
        for key, value in row.items():
            if key in SKIP_CURVES or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if math.isfinite(value):
                curves.setdefault(key, []).append([step, float(value)])
    curves = {k: v for k, v in curves.items() if len(v) > 0}
    order = [k for k in CURVE_PRIORITY if k in curves] + sorted(k for k in curves if k not in CURVE_PRIORITY)
    return {k: curves[k] for k in order[:MAX_CURVES]}


def overfit_section(run: Path) -> Optional[dict]:
    """The overfitting alarm of a run (align.overfit): its gap at each evaluation, the alarm and why it stopped."""
    rows = gap_rows(read_metrics(run / "metrics.jsonl"))
    metrics = json.loads((run / "version.json").read_text()).get("metrics") or {}
    out = {k: metrics[k] for k in ("overfit_alarm", "stop_reason") if isinstance(metrics.get(k), str)}
    if not rows and not out:
        return None
    return {"evaluations": rows, **out}


def interference_section(run: Path) -> Optional[dict]:
    """What a DPO or RLHF run cost the SFT stage (align.interference): DIR/interference.json as written."""
    path = run / "interference.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        return {"warning": f"interference.json is not valid JSON: {err.msg}", "before": {}, "after": {}}


def weights_section(run: Path) -> Optional[dict]:
    """The headline importance-weight diagnostics of the data the run trained on (weights.json)."""
    path = run / "weights.json"
    if not path.is_file():
        return None
    diag = json.loads(path.read_text()).get("diagnostics", {})
    out = {k: diag[k] for k in WEIGHT_SCALARS if k in diag}
    out["per_version"] = {k.split("/", 2)[2]: {"ess_frac": v, "weight_share": diag.get(f"weights/share/{k.split('/', 2)[2]}"),
                                              "data_share": diag.get(f"data/share/{k.split('/', 2)[2]}"),
                                              "kl_per_token": diag.get(f"kl/per_token/{k.split('/', 2)[2]}")}
                          for k, v in diag.items() if k.startswith("weights/ess_frac/")}
    if "weights/log_hist" in diag:
        out["log_hist"] = diag["weights/log_hist"]
    if "map/counts" in diag:
        out["support_map"] = diag["map/counts"]
    if "auto" in diag:
        out["auto"] = diag["auto"]
    if "worth" in diag:
        out["worth"] = diag["worth"]
    return out


def monitor_section(run: Path) -> Optional[dict]:
    """Reward-hacking flags from run/monitor.json (align.monitor: flagged, flags [{step, reason}], evaluations
    [{step, proxy, gold, ...}], top_samples [{step, prompt, completion, reward}]); other shapes are shown as given."""
    path = run / "monitor.json"
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        return {"flags": [f"monitor.json is not valid JSON: {err.msg}"], "summary": {}}
    if isinstance(data, list):
        return {"flags": [_flag_text(f) for f in data], "summary": {}}
    flags = data.get("flags") or data.get("alerts") or data.get("warnings") or []
    summary = {k: v for k, v in data.items() if isinstance(v, (int, float, str, bool))}
    out = {"flags": [_flag_text(f) for f in flags], "summary": summary}
    evals = [e for e in data.get("evaluations") or [] if isinstance(e, dict) and "step" in e]
    if evals:
        out["evaluations"] = evals
    samples = [s for s in data.get("top_samples") or [] if isinstance(s, dict)]
    if samples:
        out["top_samples"] = [{"step": s.get("step"), "reward": s.get("reward"), "prompt": _text(s.get("prompt")),
                               "completion": str(s.get("completion", ""))} for s in samples[:3]]
    return out


def _text(prompt: Any) -> str:
    """A prompt given as text or as chat messages, as text (its last user turn)."""
    if isinstance(prompt, list) and prompt and isinstance(prompt[-1], dict):
        return str(prompt[-1].get("content", ""))
    return str(prompt or "")


def _flag_text(flag: Any) -> str:
    if isinstance(flag, dict):
        head_key = next((k for k in ("reason", "message", "name", "kind") if flag.get(k)), None)
        head = str(flag[head_key]) if head_key else ""
        rest = ", ".join(f"{k}={v}" for k, v in flag.items() if k != head_key and not isinstance(v, (list, dict)))
        return f"{head} ({rest})" if head and rest else head or rest
    return str(flag)


def parent_name(store, version) -> Optional[str]:
    if version.parent_id is None:
        return None

    return get_model_version(store, version.parent_id).name


def lineage(store, version) -> list[dict]:
    """The version and its ancestors, newest first, from the store's parent links."""
    chain, seen = [], set()
    current = version
    while current is not None and current.id not in seen:
        seen.add(current.id)
        chain.append(_lineage_row(current.name, current.method, current.base_model, current.data_hash,
                                  current.adapter_hash, str(current.created_at)[:19], current.training_config))
        current = get_model_version(store, current.parent_id) if current.parent_id is not None else None
    return chain


def lineage_from_files(run: Path) -> list[dict]:
    """The lineage of a run directory without a store: follow version.json's parent_spec while it is a run."""
    chain, seen = [], set()
    path: Optional[Path] = run
    while path is not None and (path / "version.json").is_file() and path.resolve() not in seen:
        seen.add(path.resolve())
        info = json.loads((path / "version.json").read_text())
        chain.append(_lineage_row(info.get("name"), info.get("method"), info.get("base_model"), info.get("data_hash"),
                                  info.get("adapter_hash"), str(info.get("created_at", ""))[:19], info.get("config")))
        parent = info.get("parent_spec")
        path = Path(parent) if parent else None
        if parent and not (Path(parent) / "version.json").is_file():
            chain.append(_lineage_row(info.get("parent"), "base", info.get("base_model"), None, None, "", None))
    return chain


def _lineage_row(name, method, base, data_hash, adapter_hash, created, config) -> dict:
    config = config or {}
    keys = ("learning_rate", "max_steps", "beta", "loss_type", "weighting_scheme", "train_file")
    return {"name": name, "method": method, "base_model": base, "data_hash": data_hash, "adapter_hash": adapter_hash,
            "created_at": created, "config": {k: config[k] for k in keys if k in config}}


def add_run_sections(report: dict, store, versions: Sequence) -> None:
    """training / weights / monitor / lineage for stored versions (align eval)."""
    runs = {v.name: run_dir_of(v) for v in versions}
    _fill(report, {name: run for name, run in runs.items() if run is not None})
    report["lineage"] = {v.name: lineage(store, v) for v in versions}


def add_run_dir_sections(report: dict, run_dirs: Sequence[Path]) -> None:
    """The same sections for bare run directories (align report), lineage from their version.json files."""
    named = {}
    for run in run_dirs:
        info = json.loads((run / "version.json").read_text())
        named[info.get("name") or run.name] = run
    _fill(report, named)
    report["lineage"] = {name: lineage_from_files(run) for name, run in named.items()}


def _fill(report: dict, runs: dict[str, Path]) -> None:
    final = {}
    for name, run in runs.items():
        metrics = json.loads((run / "version.json").read_text()).get("metrics") or {}
        numeric = {k: v for k, v in metrics.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in SKIP_CURVES}
        if numeric:
            final[name] = numeric
    if final:
        report["final_metrics"] = final
    overfit = {name: section for name, run in runs.items() if (section := overfit_section(run)) is not None}
    if overfit:
        report["overfit"] = overfit
    for key, build, file, missing in (
        ("training", training_curves, "metrics.jsonl",
         "no version has a training run with metrics.jsonl on this machine"),
        ("weights", weights_section, "weights.json",
         "no version was trained with importance weights (no weights.json in its run)"),
        ("monitor", monitor_section, "monitor.json",
         "no reward-hacking monitor output (monitor.json) in the versions' runs"),
        ("interference", interference_section, "interference.json",
         "no DPO or RLHF run measured its cost to the SFT stage (interference.json)"),
    ):
        found = {name: section for name, run in runs.items() if (section := build(run)) is not None}
        if found:
            report[key] = found
            if len(found) < len(runs):
                report.setdefault("notes", {})[key] = f"no {file} for: {', '.join(n for n in runs if n not in found)}"
        else:
            report.setdefault("notes", {})[key] = missing
