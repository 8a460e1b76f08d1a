"""Render a report dict as one self-contained HTML page (inline CSS, plots as data: URIs, no scripts, no
network), plus report.json and a short summary.md. A missing section shows a one-line note saying why."""

from __future__ import annotations

import datetime as dt
import json
import math
from html import escape
from pathlib import Path
from typing import Any, Callable, Optional

from align.report import plots

CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#1f2328;margin:0;background:#f6f7f9}
main{max-width:1160px;margin:0 auto;padding:16px 24px 48px}
h1{font-size:24px;margin:8px 0 4px}h2{font-size:19px;margin:0 0 10px;border-bottom:1px solid #d0d7de;padding-bottom:4px}
h3{font-size:15px;margin:14px 0 6px}
section{background:#fff;border:1px solid #d0d7de;border-radius:8px;padding:14px 18px;margin:14px 0}
nav{font-size:13px;margin:6px 0 0;display:flex;flex-wrap:wrap;row-gap:2px}
nav a{margin-right:12px;color:#0969da;text-decoration:none;white-space:nowrap}
table{border-collapse:collapse;margin:6px 0;font-size:13px}th,td{border:1px solid #d0d7de;padding:3px 8px;text-align:left;
vertical-align:top}th{background:#f0f2f5}td.num{text-align:right;font-variant-numeric:tabular-nums}
img{max-width:100%;height:auto;display:block;margin:6px 0}
.note{color:#6e7781;font-style:italic;margin:4px 0}.warn{color:#9a3412;font-weight:600}
.meta{color:#57606a;font-size:13px}.tw{overflow-x:auto;max-width:100%}
.sbs{display:grid;grid-template-columns:1fr 1fr;gap:10px;margin:6px 0 14px}
.sbs div{border:1px solid #d0d7de;border-radius:6px;padding:6px 8px;background:#fbfbfc;min-width:0}
pre{white-space:pre-wrap;word-break:break-word;margin:4px 0;font:12.5px/1.4 ui-monospace,Menlo,Consolas,monospace;
max-height:14em;overflow:auto}
.prompt{background:#eef4fb;border-radius:6px;padding:6px 8px;margin-top:10px}
.cluster{border-left:4px solid #3b6fb6;padding-left:10px;margin:10px 0}
.tok{white-space:pre-wrap;word-break:break-word;font:12.5px/1.7 ui-monospace,Menlo,Consolas,monospace;max-height:16em;
overflow:auto;border:1px solid #d0d7de;border-radius:6px;padding:6px 8px;background:#fff}
.tok span{border-radius:2px}.legend span{padding:0 6px;border-radius:2px;margin-right:4px}
"""

SECTIONS = (  # id, title
    ("win_rates", "Win rates"), ("ranking", "Ranking (Bradley–Terry)"), ("gold", "Gold reward per task family"),
    ("reward", "Reward-model scores"), ("kl", "KL to the reference"), ("lengths", "Lengths"),
    ("drift", "Drift between versions"),
    ("human_votes", "Human side-by-side votes"), ("failures", "Failures"), ("side_by_side", "Samples side by side"),
    ("credit", "Token-level credit"),
    ("training", "Training curves"), ("weights", "Importance-weighting diagnostics"),
    ("monitor", "Reward-hacking flags"), ("interference", "Stage interference"), ("lineage", "Lineage"),
)


def fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.{digits}f}"
    return escape(str(value))


def table(header: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f'<td class="num">{fmt(c)}</td>' if isinstance(c, (int, float)) and not
                                    isinstance(c, bool) else f"<td>{fmt(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f'<div class="tw"><table><tr>{head}</tr>{body}</table></div>'  # a too-wide table scrolls inside itself


def img(uri: Optional[str], alt: str) -> str:
    return f'<img src="{uri}" alt="{escape(alt)}">' if uri else ""


def note(text: str) -> str:
    return f'<p class="note">{escape(text)}</p>'


# ---- sections ------------------------------------------------------------------------------------------------------


def s_win_rates(r: dict) -> Optional[str]:
    parts = []
    for judge, section in r.get("win_rates", {}).items():
        if not section["pairs"]:
            continue
        order = {n: i for i, n in enumerate(section["versions"])}
        rows = [[p["a"], p["b"], p["win_rate"], f"[{p['low']:.3f}, {p['high']:.3f}]", p["n"], p["wins"], p["ties"],
                 p["losses"]] for p in section["pairs"] if order[p["a"]] < order[p["b"]]]
        parts.append(f"<h3>judge: {escape(judge)}</h3>" + img(plots.win_rates(section), f"win rates ({judge})")
                     + table(["version a", "version b", "win rate of a", "95% CI", "prompts", "a wins", "ties",
                              "b wins"], rows))
    return "".join(parts) or None


def s_ranking(r: dict) -> Optional[str]:
    parts = []
    for judge, bt in r.get("bradley_terry", {}).items():
        rows = sorted(([n, bt["rank"][i], f"{bt['rank_low'][i]:.0f}–{bt['rank_high'][i]:.0f}", bt["scores"][i],
                        f"[{bt['low'][i]:.2f}, {bt['high'][i]:.2f}]"] for i, n in enumerate(bt["versions"])),
                      key=lambda row: row[1])
        parts.append(f"<h3>judge: {escape(judge)}</h3>" + img(plots.ranking(bt), "Bradley–Terry ranking")
                     + table(["version", "rank", "rank 95%", "log-strength", "95% CI"], rows))
    return "".join(parts) or None


def _score_section(r: dict, judge: str, label: str) -> Optional[str]:
    section = r.get("scores", {}).get(judge)
    if not section:
        return None
    families = sorted({f for v in section.values() for f in v["per_family"]})
    rows = [[n, v["mean"], f"[{v['low']:.3f}, {v['high']:.3f}]"] + [v["per_family"].get(f) for f in families]
            for n, v in section.items()]
    return (img(plots.per_family(section, label), label)
            + table(["version", "all", "95% CI"] + families, rows))


def s_gold(r: dict) -> Optional[str]:
    return _score_section(r, "gold", "mean gold reward")


def s_reward(r: dict) -> Optional[str]:
    body = _score_section(r, "reward", "mean normalised reward")
    if body is None:
        return None
    acc = r.get("reward_model_accuracy")
    if not acc:
        return body + note("Held-out accuracy omitted: " + r.get("notes", {}).get("reward_model_accuracy", ""))
    body += "<h3>Accuracy on held-out human pairs</h3>" + table(
        ["source", "pairs", "prompts", "accuracy", "95% CI (over prompts)", "ties skipped"],
        [[acc["source"], acc["n"], acc.get("prompts", "-"), acc["accuracy"], f"[{acc['low']:.3f}, {acc['high']:.3f}]",
          acc["skipped_ties"]]])
    families = acc.get("by_family") or {}
    if families:  # where the reward model can judge and where it guesses: what RLHF against it can improve
        body += table(["task family", "pairs", "accuracy"], [[f, v["n"], v["accuracy"]] for f, v in families.items()])
    return body


def s_kl(r: dict) -> Optional[str]:
    kl = r.get("kl")
    if not kl:
        return None
    rows = [[n, v["kl"], f"[{v['low']:.3f}, {v['high']:.3f}]", v.get("kl_per_token"), v["n"]]
            for n, v in kl["per_version"].items()]
    out = (f'<p class="meta">Reference: {escape(kl["reference"])}. Per version, the mean over its samples of '
           "log π_v(y) − log π_ref(y): stored log-probs for π_v, a teacher-forced re-score under the reference. "
           "The reference's own row re-scores its samples (≈ 0 checks the numerics).</p>")
    out += (img(plots.kl(kl), "KL") if kl["per_version"] else "") + table(
        ["version", "KL (nats)", "95% CI", "per token", "samples"], rows)
    out += "".join(note(f"{n}: {why}") for n, why in kl.get("skipped", {}).items())
    return out + (note(kl["note"]) if kl.get("note") else "")


def s_lengths(r: dict) -> Optional[str]:
    ls = r.get("lengths")
    if not ls:
        return None
    rows = [[n, v.get("mean"), v.get("median"), v.get("p90"), v.get("max"), v.get("stopped")] for n, v in ls.items()]
    return img(plots.lengths(ls), "lengths") + table(
        ["version", "mean", "median", "p90", "max", "share ended by EOS"], rows)


def s_drift(r: dict) -> Optional[str]:
    d = r.get("drift")
    if not d:
        return None
    out = ('<p class="meta">Each version against its parent, on the same prompts: answer length, formats, how far '
           "its answers moved in sentence-embedding space (1 − cosine of the per-prompt mean embeddings; the parent's "
           "own spread between two of its answers says what is far), and the share of the parent's labelled pairs "
           "outside the new version's support (both responses below the threshold in log π_new − log π_parent per "
           "token): old pairs the new model would never produce, which reweighting cannot make relevant again.</p>")
    labels = {"code_block": "share with a code block", "list": "share with a list", "json": "share that is JSON",
              "refusal": "share of refusals"}
    for name, v in d["per_version"].items():
        rows = [["mean length (tokens)", v["length"]["parent"], v["length"]["version"],
                 v["length"]["version"] - v["length"]["parent"]]]
        rows += [[labels[k], x["parent"], x["version"], x["version"] - x["parent"]] for k, x in v["format"].items()]
        emb = v.get("embedding")
        if emb:
            spread = "" if emb.get("parent_spread") is None else f" (parent's own spread {emb['parent_spread']:.3f})"
            rows.append([f"embedding shift over {emb['prompts']} prompts{spread}", None, emb["shift"], None])
        sup = v.get("support")
        if isinstance(sup, dict):
            rows.append([f"parent's pairs outside the support ({sup['off_support']} of {sup['pairs']})", None,
                         sup["share"], None])
        out += (f"<h3>{escape(plots.short(name, 60))} against {escape(v['parent'])}</h3>"
                + table(["measure", "parent", "version", "change"], rows))
        if isinstance(sup, str):
            out += note(f"support: {sup}")
    out += "".join(note(f"{k}: {why}") for k, why in (d.get("notes") or {}).items())
    return out


def s_human(r: dict) -> Optional[str]:
    hv = r.get("human_votes")
    if not hv:
        return None
    rows = [[p["a"], p["b"], p["win_rate"], f"[{p['low']:.3f}, {p['high']:.3f}]", p["n"], p["both_bad"]]
            for p in hv["pairs"]]
    return table(["version a", "version b", "win rate of a", "95% CI", "pairs", "both bad"], rows) + note(hv["note"])


def _example(e: dict) -> str:
    return (f'<p class="meta">{escape(plots.short(e["version"], 40))} · {escape(e["family"])} · reward '
            f'{e["reward"]:.2f} — prompt: {escape(e["prompt"][:160])}</p><pre>{escape(e["response"] or "(empty)")}</pre>')


def s_failures(r: dict) -> Optional[str]:
    f = r.get("failures")
    if not f:
        return None
    out = f'<p class="meta">{f["n"]} of {f["of"]} responses have gold reward &lt; 0.5.</p><h3>By task family</h3>'
    out += table(["family", "failures", "of", "rate", "by version"],
                 [[fam, v["failures"], v["total"], v["rate"], ", ".join(f"{plots.short(k)}: {c}" for k, c in
                                                                      v["by_version"].items())]
                  for fam, v in f["by_family"].items()])
    for fam, v in f["by_family"].items():
        if v["examples"]:
            out += f"<details><summary>{escape(fam)}: examples</summary>{''.join(map(_example, v['examples']))}</details>"
    out += "<h3>By embedding cluster</h3>"
    if "clusters" not in f:
        return out + note(f.get("clusters_note", "no clusters"))
    out += (f'<p class="meta">k-means on {escape(f.get("embedder", "sentence"))} embeddings of the failing '
            "responses; examples are the responses closest to each centre.</p>")
    for i, c in enumerate(f["clusters"], 1):
        fams = ", ".join(f"{k} {v}" for k, v in c["families"].items())
        out += (f'<div class="cluster"><b>group {i}</b> · {c["size"]} responses · typical words: {escape(c["label"])}'
                f' · families: {escape(fams)}{"".join(map(_example, c["examples"]))}</div>')
    return out


def s_side_by_side(r: dict) -> Optional[str]:
    rows = r.get("side_by_side")
    if not rows:
        return None
    out = ""
    for row in rows:
        def head(side: str) -> str:
            scores = ", ".join(f"{j} {v:.2f}" for j, v in row[f"{side}_scores"].items())
            return f'<p class="meta"><b>{escape(plots.short(row[side], 40))}</b> · {escape(scores)}</p>'

        out += (f'<div class="prompt"><b>{escape(row["family"] or "")}</b> — {escape(row["prompt"])}</div>'
                f'<div class="sbs"><div>{head("a")}<pre>{escape(row["a_text"] or "(empty)")}</pre></div>'
                f'<div>{head("b")}<pre>{escape(row["b_text"] or "(empty)")}</pre></div></div>')
    return out


def _shade(value: float, scale: float) -> str:
    """Green for positive credit, red for negative, opacity by |value| / scale (capped)."""
    alpha = 0.0 if scale <= 0 else min(1.0, abs(value) / scale) * 0.8
    rgb = "46,160,67" if value > 0 else "207,34,46"
    return f"rgba({rgb},{alpha:.3f})"


def _tokens(tokens: list[str], values: list[float], scale: float) -> str:
    """Each token as a coloured span, its value in the tooltip; all text escaped (no markup from the data)."""
    spans = "".join(f'<span style="background:{_shade(v, scale)}" title="{v:+.4f}">{escape(t) or "&#8203;"}</span>'
                    for t, v in zip(tokens, values))
    strongest = sorted(range(len(values)), key=lambda i: -abs(values[i]))[:5]
    top = ", ".join(f"{escape(repr(tokens[i]))} {values[i]:+.3f}" for i in strongest)
    return f'<div class="tok">{spans}</div><p class="meta">strongest: {top}</p>'


def _scale(values: list[float]) -> float:
    """The colour scale of a pair: the 95th percentile of |value| over both responses (one outlier cannot wash
    every other token out)."""
    mags = sorted(abs(v) for v in values)
    return mags[min(len(mags) - 1, int(0.95 * len(mags)))] if mags else 0.0


def _credit_pair(pair: dict, key: str, kind: str) -> str:
    values = [v for side in ("chosen", "rejected") for v in pair[side].get(key) or []]
    scale = _scale(values)
    cells = []
    for side in ("chosen", "rejected"):
        d = pair[side]
        if kind == "log_ratio":
            head = (f"<b>{side}</b> · Σ log-ratio {d['sum']:+.3f} · implicit reward β·Σ = {d['implicit_reward']:+.4f}")
        elif d.get(key) is not None:
            head = f"<b>{side}</b> · reward {d['reward']:+.3f} · Σ drops {sum(d[key]):+.3f}"
        else:
            head = f"<b>{side}</b> · {escape(d.get('reward_drop_note', 'not scored'))}"
        body = _tokens(d["tokens"], d[key], scale) if d.get(key) is not None else f'<pre>{escape("".join(d["tokens"]))}</pre>'
        cells.append(f'<div><p class="meta">{head}</p>{body}</div>')
    label = "" if pair.get("label", "chosen") == "chosen" else f" · labelled {escape(pair['label'])}"
    margin = (f" · implicit reward margin β·(Σc − Σr) = {pair['margin']:+.4f} (β = {pair['beta']:g})"
              if kind == "log_ratio" else "")
    return (f'<div class="prompt">{escape(pair["prompt"][:400])}<span class="meta">{label}{margin}</span></div>'
            f'<div class="sbs">{"".join(cells)}</div>')


def s_credit(r: dict) -> Optional[str]:
    c = r.get("credit")
    if not c:
        return None
    out = ('<p class="meta">Each token of the chosen and rejected responses of sampled labelled pairs, coloured by '
           'its credit: <span class="legend"><span style="background:rgba(46,160,67,.6)">positive</span>'
           '<span style="background:rgba(207,34,46,.6)">negative</span></span> (hover a token for its value; the '
           "scale is per pair). For a trained version: log π(token) − log π_ref(token) against the model it started "
           "from; summed over a response and times β it is DPO's implicit reward. For the reward model: the reward "
           "lost when that one token is dropped.</p>")
    for name, d in (c.get("per_version") or {}).items():
        out += (f"<h3>{escape(plots.short(name, 60))} against {escape(str(d.get('reference')))}</h3>"
                + "".join(_credit_pair(p, "log_ratio", "log_ratio") for p in d["pairs"]))
    if c.get("reward_model"):
        d = c["reward_model"]
        out += (f"<h3>reward model {escape(plots.short(str(d.get('run', '')), 60))}: reward change when a token is "
                "dropped</h3>" + "".join(_credit_pair(p, "reward_drop", "reward") for p in d["pairs"]))
    out += "".join(note(f"{n}: {why}") for n, why in (c.get("skipped") or {}).items())
    return out


def s_training(r: dict) -> Optional[str]:
    tr = r.get("training")
    if not tr:
        return None
    out = img(plots.curves(tr), "training curves") + _overfit(r.get("overfit") or {})
    final = r.get("final_metrics")
    if final:
        keys = sorted({k for v in final.values() for k in v})[:16]
        out += "<h3>Final metrics (version.json)</h3>" + table(
            ["metric"] + [plots.short(n) for n in final], [[k] + [v.get(k) for v in final.values()] for k in keys])
    return out


def _overfit(section: dict) -> str:
    """Per run: the eval − train loss gap at each evaluation, the overfitting alarm, and why the run stopped."""
    if not section:
        return ""
    out = ('<h3>Overfitting alarm: held-out against training loss</h3><p class="meta">At each evaluation, eval loss '
           "minus the mean training loss since the previous one. A steady offset is expected (training losses carry "
           "weights and extra terms); a gap that keeps widening is overfitting.</p>")
    for name, d in section.items():
        out += f"<h3>{escape(plots.short(name, 60))}</h3>"
        if d.get("evaluations"):
            out += table(["step", "train loss", "eval loss", "gap"],
                         [[e["step"], e["train_loss"], e["eval_loss"], e["eval_gap"]] for e in d["evaluations"]])
        out += f'<p class="warn">{escape(d["overfit_alarm"])}</p>' if d.get("overfit_alarm") else note("no alarm")
        if d.get("stop_reason"):
            out += f'<p class="warn">{escape(d["stop_reason"])}</p>'
    return out


def s_weights(r: dict) -> Optional[str]:
    w = r.get("weights")
    if not w:
        return None
    out = img(plots.log_weights(w), "log weights")
    for name, d in w.items():
        out += f"<h3>{escape(plots.short(name, 60))}</h3>" + table(
            ["scheme", "pairs", "ESS/N", "top 1% share", "clipped", "max w", "KL/token"],
            [[d.get("scheme"), d.get("weights/n"), d.get("weights/ess_frac"), d.get("weights/top1pct_share"),
              d.get("weights/clipped_frac"), d.get("weights/max"), d.get("kl/per_token")]])
        if d.get("per_version"):
            out += table(["source version", "ESS/N", "weight share", "data share", "KL/token"],
                         [[v, x["ess_frac"], x["weight_share"], x["data_share"], x["kl_per_token"]]
                          for v, x in d["per_version"].items()])
        if d.get("support_map"):
            out += '<p class="meta">support map: ' + escape(", ".join(f"{k} {v}" for k, v in d["support_map"].items())) + "</p>"
        if d.get("warning"):
            out += f'<p class="warn">{escape(d["warning"])}</p>'
        out += _auto_and_worth(d)
    return out


def _auto_and_worth(d: dict) -> str:
    """weighting auto's choice and candidates, and what the old labels are still worth (align/reuse.py)."""
    out = ""
    auto = d.get("auto")
    if auto:
        out += f"<p><b>auto chose {escape(str(auto['choice']))}</b>: {escape(str(auto['reason']))}</p>"
        if auto.get("scores"):
            out += table(["candidate", "held-out log-lik", "gain vs none", "± SE", "old ESS/N"],
                         [[c, s["heldout_loglik"], s["gain"], s["se"], s["ess_frac_old"]]
                          for c, s in auto["scores"].items()])
    worth = d.get("worth")
    if worth and worth.get("versions"):
        out += "<h4>What the old labels are still worth</h4>" + table(
            ["version", "pairs", "ESS/N (LN)", "ESS/N (tempered)", "KL/token", "off support", "equally likely",
             "trust", "worth (fresh pairs)"],
            [[v, e["pairs"], e["ess_frac_ln"], e["ess_frac_tempered"], e.get("kl_per_token"), e["off_support"],
              e["equally_likely"], e.get("trust"), round(e["effective_pairs"])] for v, e in worth["versions"].items()])
        out += f"<p>{escape(worth['sentence'])}</p>"
    return out


def s_monitor(r: dict) -> Optional[str]:
    m = r.get("monitor")
    if not m:
        return None
    out = ""
    for name, d in m.items():
        out += f"<h3>{escape(plots.short(name, 60))}</h3>"
        out += ("<ul>" + "".join(f'<li class="warn">{escape(f)}</li>' for f in d["flags"]) + "</ul>") if d["flags"] \
            else note("no flags raised")
        if d["summary"]:
            out += table(["key", "value"], [[k, v] for k, v in d["summary"].items()])
        if d.get("evaluations"):
            out += img(plots.monitor(d["evaluations"]), "proxy and gold rewards at each evaluation")
        if d.get("top_samples"):
            out += "<h3>Highest-proxy samples (audit these)</h3>" + "".join(
                f'<p class="meta">step {fmt(s["step"])} · proxy reward {fmt(s["reward"])} — prompt: '
                f'{escape(s["prompt"][:160])}</p><pre>{escape(s["completion"] or "(empty)")}</pre>'
                for s in d["top_samples"])
    return out


def s_interference(r: dict) -> Optional[str]:
    section = r.get("interference")
    if not section:
        return None
    out = ('<p class="meta">What preference training cost the SFT stage it started from: the loss of held-out SFT '
           "answers (nats per assistant token) and the gold reward of greedy answers to held-out task prompts, for "
           "the starting model (before) and the trained one (after).</p>")
    labels = {"sft_loss": "held-out SFT loss", "gold": "gold reward"}
    for name, d in section.items():
        before, after = d.get("before") or {}, d.get("after") or {}
        rows = [[labels.get(k, k), before[k], after.get(k), (after[k] - before[k]) if k in after else None]
                for k in before]
        out += f"<h3>{escape(plots.short(name, 60))} ({escape(str(d.get('method', '')).upper())})</h3>"
        out += table(["measure", "before", "after", "change"], rows)
        out += note(f"SFT conversations: {d.get('sft_conversations', 0)} from {d.get('sft_source') or 'nowhere'}; "
                    f"task prompts: {d.get('gold_tasks', 0)}")
        out += f'<p class="warn">{escape(d["warning"])}</p>' if d.get("warning") else note(
            "within the thresholds: no interference warning")
    return out


def s_lineage(r: dict) -> Optional[str]:
    lin = r.get("lineage")
    if not lin:
        return None
    out = ""
    for name, chain in lin.items():
        out += f"<h3>{escape(plots.short(name, 60))}</h3>" + table(
            ["version (newest first)", "method", "base model", "data hash", "created", "config"],
            [[c["name"], c["method"], c["base_model"], c["data_hash"], c["created_at"],
              ", ".join(f"{k}={v}" for k, v in c["config"].items())] for c in chain])
    return out


RENDERERS: dict[str, Callable[[dict], Optional[str]]] = {
    "win_rates": s_win_rates, "ranking": s_ranking, "gold": s_gold, "reward": s_reward, "kl": s_kl,
    "lengths": s_lengths, "human_votes": s_human, "failures": s_failures, "side_by_side": s_side_by_side,
    "credit": s_credit, "drift": s_drift,
    "training": s_training, "weights": s_weights, "monitor": s_monitor, "interference": s_interference,
    "lineage": s_lineage,
}
NOTE_KEYS = {"ranking": "win_rates", "reward": "reward_model_accuracy"}


def render(report: dict) -> str:
    notes = report.get("notes", {})
    body, nav = [], []
    for key, title in SECTIONS:
        html = RENDERERS[key](report)
        if html is None:
            why = notes.get(key) or notes.get(NOTE_KEYS.get(key, ""), "") or "not available for this report"
            if report.get("kind") == "runs" and key in RUN_ONLY_SKIPS:
                continue
            html = note(f"Omitted: {why}")
        else:
            nav.append(f'<a href="#{key}">{escape(title)}</a>')
            if notes.get(key):  # a section present for some versions only says which lack it
                html += note(notes[key])
        body.append(f'<section id="{key}"><h2>{escape(title)}</h2>{html}</section>')
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{escape(report.get('title', 'align report'))}</title><style>{CSS}</style></head><body><main>"
            f"{header(report)}<nav>{''.join(nav)}</nav>{''.join(body)}</main></body></html>")


RUN_ONLY_SKIPS = ("win_rates", "ranking", "gold", "reward", "kl", "lengths", "human_votes", "failures",
                  "side_by_side")


def header(r: dict) -> str:
    out = f"<h1>{escape(r.get('title', 'align report'))}</h1>"
    out += f'<p class="meta">created {escape(r.get("created_at", ""))}'
    if r.get("kind") == "eval":
        p, s = r["prompts"], r["settings"]
        fams = ", ".join(f"{k} {v}" for k, v in p["families"].items())
        decoding = "greedy" if s["temperature"] == 0 else f"temperature {s['temperature']}"
        out += (f" · {p['n']} prompts from {escape(p['source'])} ({escape(fams)}) · {s['n']} sample(s) per prompt, "
                f"{decoding}, max {s['max_new_tokens']} new tokens, seed {s['seed']} · judges: "
                f"{escape(', '.join(r['judges']))} · reference: {escape(r['reference'])}")
    out += "</p>"
    if r.get("command"):
        out += f'<p class="meta"><code>{escape(r["command"])}</code></p>'
    rows = [[v["name"], v.get("method"), v.get("parent"), v.get("base_model"), v.get("samples")]
            for v in r.get("versions", [])]
    return out + table(["version", "method", "parent", "base model", "samples"], rows)


# ---- files ---------------------------------------------------------------------------------------------------------


def clean(value: Any) -> Any:
    """JSON-safe: NaN and infinities become null (strict JSON parsers reject them)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean(v) for v in value]
    return value


def markdown_summary(r: dict) -> str:
    lines = [f"# {r.get('title', 'align report')}", "", f"Created {r.get('created_at', '')}.", ""]
    for judge, section in r.get("win_rates", {}).items():
        order = {n: i for i, n in enumerate(section["versions"])}
        lines += [f"## Win rates ({judge})", "", "| a | b | win rate of a | 95% CI | prompts |", "|---|---|---|---|---|"]
        lines += [f"| {p['a']} | {p['b']} | {p['win_rate']:.3f} | [{p['low']:.3f}, {p['high']:.3f}] | {p['n']} |"
                  for p in section["pairs"] if order[p["a"]] < order[p["b"]]]
        lines.append("")
    for judge, section in r.get("scores", {}).items():
        families = sorted({f for v in section.values() for f in v["per_family"]})
        lines += [f"## Mean {judge} score", "", "| version | all | " + " | ".join(families) + " |",
                  "|---" * (len(families) + 2) + "|"]
        lines += [f"| {n} | {v['mean']:.3f} | " + " | ".join(fmt(v["per_family"].get(f)) for f in families) + " |"
                  for n, v in section.items()]
        lines.append("")
    if r.get("kl"):
        lines += [f"## KL to {r['kl']['reference']}", "", "| version | KL (nats) | per token |", "|---|---|---|"]
        lines += [f"| {n} | {v['kl']:.4f} | {fmt(v.get('kl_per_token'), 4)} |" for n, v in r["kl"]["per_version"].items()]
        lines.append("")
    for name, section in r.get("monitor", {}).items():
        flags = [f"- {f}" for f in section["flags"]] or ["- none: the reward-hacking monitor stayed quiet"]
        lines += [f"## Monitor flags: {name}", ""] + flags + [""]
    for name, section in r.get("interference", {}).items():
        lines += [f"## Stage interference: {name}", "",
                  f"- {section['warning']}" if section.get("warning") else "- within the thresholds", ""]
    if r.get("notes"):
        lines += ["## Omitted", ""] + [f"- {k}: {v}" for k, v in r["notes"].items()] + [""]
    return "\n".join(lines)


def write_report(report: dict, out_dir: str | Path) -> Path:
    """Write report.json, report.html and summary.md into out_dir; return the HTML path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report.setdefault("created_at", dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"))
    report = clean(report)
    (out / "report.json").write_text(json.dumps(report, indent=1, ensure_ascii=False))
    (out / "summary.md").write_text(markdown_summary(report))
    (out / "report.html").write_text(render(report), encoding="utf-8")
    return out / "report.html"
