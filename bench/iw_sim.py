"""Does reusing old labels with importance weights pay, and does `auto` choose well? An exact, pre-registered test.

A small enumerable task (research/reuse_findings.md §2): 8 prompts × 1,024 responses (4 tokens, length 5), a
first-order Markov policy the gold reward is not (misspecified by design), Bradley-Terry labels. Everything is exact:
gold reward E_π[r*] and KL(π‖v2) are sums over all responses, so there is no evaluation noise. Training is full-batch
Adam DPO from v2 with reference v2 (β 0.5, lr 0.05), stopped when KL(π‖v2) passes 1 nat; the endpoint is the gold
gain at KL = 1, interpolated between steps, so every arm is judged at matched KL, never at a fixed step count.

Weights come from align's own code: `align.weighting.compute_importance_weights` for each scheme (clip 5, static
target v2), `align.reuse.choose_weighting` for `auto` (its pilot fits are this file's exact DPO on the old pairs,
scored by the new pairs' preference log-likelihood at KL 1) and `align.reuse.version_trust_from_agreement` for
per-version trust (from 2-fold cross-fitted DPO fits on the new pairs).

Pre-registered (fixed before the full run; seeds 0..n-1 of each regime):
- Arms: union (old + new, unweighted), auto, sequence, tempered (α for ESS/N ≥ 0.5), length_normalized, mixture,
  wpo, trust (per-version trust alone), oracle (fresh v2 pairs in place of the old ones).
- Primary endpoint: gold gain at KL = 1 of auto minus union, in the old ≫ new regime; one-sided paired t-test,
  Wilcoxon signed-rank as a check; Holm-corrected across the regimes' superiority tests.
- Non-inferiority: in every regime, one-sided paired t-test of auto - union > -0.01, Holm-corrected across regimes.
- Target: auto non-inferior to union in every regime and better in old ≫ new (corrected p < 0.05).

Run:  python bench/iw_sim.py                 # 60 seeds a regime, the table and verdicts (one core, < 15 min)
      python bench/iw_sim.py --seeds 4 --regimes old_new,bench   # a quick look
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import sys
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from scipy import stats  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from align.reuse import AUTO_CANDIDATES, PilotFit, choose_weighting, tempered_alpha, version_trust_from_agreement  # noqa: E402,E501
from align.weighting import compute_importance_weights  # noqa: E402

V, L, K = 4, 5, 8
BETA, LR, MAX_STEPS = 0.5, 0.05, 600
KL_TARGET = 1.0
TAU = 0.5  # annotator Bradley-Terry temperature
CLIP = 5.0
NI_MARGIN = -0.01
ARMS = ("union", "auto", "sequence", "tempered", "length_normalized", "mixture", "wpo", "trust", "oracle")

SEQS = np.array(list(itertools.product(range(V), repeat=L)))
S = len(SEQS)
_PREV = np.concatenate([np.full((S, 1), V), SEQS[:, :-1]], axis=1)
C = np.zeros((S, V + 1, V))
for _t in range(L):
    np.add.at(C, (np.arange(S), _PREV[:, _t], SEQS[:, _t]), 1.0)
C2 = C.reshape(S, -1)  # (S, 20) transition counts: log π(s|k) = C2[s] · log_softmax(θ_k)
COUNTS = np.stack([(SEQS == v).sum(1) for v in range(V)], 1).astype(float)
FIRST_EQ_LAST = (SEQS[:, 0] == SEQS[:, -1]).astype(float)


@dataclass(frozen=True)
class Regime:
    name: str
    n_old: tuple[int, ...]  # pairs per old version
    n_new: int
    kind: str  # misspec | benign
    shift: float
    flip: float | tuple = 0.0  # share of old labels flipped (a tuple: per old version)
    drift: float = 0.0  # old labeler's extra reward term (scale)
    note: str = ""
    kl: float = KL_TARGET  # the matched KL of the endpoint


REGIMES = {r.name: r for r in (
    Regime("misspec", (4000,), 250, "misspec", 1.5, note="misspecified, 4000:250"),
    Regime("large_shift", (4000,), 250, "misspec", 2.5, note="large shift, 4000:250"),
    Regime("old_new", (16000,), 60, "misspec", 1.5, note="old ≫ new, 16000:60 (primary)"),
    Regime("benign_small", (4000,), 250, "benign", 0.5, note="benign, small shift, 4000:250"),
    Regime("benign", (4000,), 250, "benign", 1.0, note="benign, 4000:250"),
    Regime("two_old", (2000, 2000), 250, "misspec", 1.5, note="two old versions (v0 far, v1 near), 2000+2000:250"),
    Regime("flipped", (4000,), 250, "misspec", 0.6, flip=0.3, note="old labels 30% flipped, 4000:250 (KL 0.5)",
           kl=0.5),
    Regime("drifted", (4000,), 250, "misspec", 1.5, drift=1.0, note="old labeler drifted, 4000:250"),
    Regime("bench", (34,), 7, "misspec", 1.5, note="benchmark-sized, 34:7"),
)}


def log_softmax(x):
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def seq_logp(theta):
    """log π(s|k) for every prompt and response, (K, S)."""
    return (C2 @ log_softmax(theta).reshape(K, -1).T).T


def log_collision(theta):
    """WPO's Σ_t log Σ_v π(v|·)² per response, (K, S)."""
    ls = log_softmax(theta)
    coll = np.log(np.exp(2 * ls).sum(-1))  # (K, V+1)
    return (C.sum(-1) @ coll.T).T


def sigmoid(x):
    return 0.5 * (1.0 + np.tanh(0.5 * x))


@dataclass
class Task:
    thetas: list  # old versions' logits, then v2's last
    gold: np.ndarray  # the new labeler's reward (K, S): the endpoint
    gold_old: np.ndarray  # the old labeler's


def make_task(rng, r: Regime) -> Task:
    a = rng.normal(0, 0.5, (K, V))
    b = rng.uniform(1.0, 2.0, K)
    u = rng.integers(0, V, K)
    gold = a @ COUNTS.T + b[:, None] * FIRST_EQ_LAST[None] - 0.5 * (COUNTS[:, u].T - 2.0) ** 2
    gold_old = gold + r.drift * (rng.normal(0, 1.0, (K, V)) @ COUNTS.T) if r.drift else gold
    if r.kind == "benign":
        theta1 = rng.normal(0, 1.0, (K, V + 1, V))
        theta2 = theta1 + r.shift * rng.normal(0, 1.0, (K, V + 1, V))
        old = [theta1]
    else:
        base = rng.normal(0, 0.5, (K, V + 1, V))
        e_u = np.zeros((K, V + 1, V))
        e_u[np.arange(K), :, u] = 1.0
        theta1 = base + r.shift * e_u
        theta2 = base - r.shift * e_u + 0.3 * rng.normal(0, 1.0, (K, V + 1, V))
        old = [theta1] if len(r.n_old) == 1 else [theta1, theta2 + 0.35 * (theta1 - theta2)]
    return Task(old + [theta2], gold, gold_old)


@dataclass
class Pairs:
    k: np.ndarray
    w: np.ndarray  # chosen response
    l: np.ndarray  # rejected response
    version: np.ndarray  # index into Task.thetas of the sampler

    def __len__(self):
        return len(self.k)

    def take(self, idx):
        return Pairs(self.k[idx], self.w[idx], self.l[idx], self.version[idx])

    @staticmethod
    def cat(parts):
        return Pairs(*(np.concatenate([getattr(p, f) for p in parts]) for f in ("k", "w", "l", "version")))


def _draw(cdf, k, u):
    """Inverse-CDF draws: response index for prompt k[i] at uniform u[i]."""
    out = np.empty(len(k), int)
    for i in range(K):
        rows = k == i
        out[rows] = np.searchsorted(cdf[i], u[rows])
    return np.minimum(out, S - 1)


def sample_pairs(rng, lp, gold, n, version, flip=0.0) -> Pairs:
    """n labelled pairs of two different responses sampled from exp(lp) (K, S), labels BT(gold / TAU)."""
    cdf = np.cumsum(np.exp(lp), 1)
    cdf /= cdf[:, -1:]
    ks, s1, s2 = (np.empty(0, int) for _ in range(3))
    while len(ks) < n:  # redraw the (rare) identical pairs
        k = rng.integers(0, K, 2 * n)
        a, b = _draw(cdf, k, rng.random(2 * n)), _draw(cdf, k, rng.random(2 * n))
        keep = a != b
        ks, s1, s2 = np.concatenate([ks, k[keep]]), np.concatenate([s1, a[keep]]), np.concatenate([s2, b[keep]])
    ks, s1, s2 = ks[:n], s1[:n], s2[:n]
    first = rng.random(n) < sigmoid((gold[ks, s1] - gold[ks, s2]) / TAU)
    if flip:
        first ^= rng.random(n) < flip
    return Pairs(ks, np.where(first, s1, s2), np.where(first, s2, s1), np.full(n, version))


def train(theta_ref, pairs: Pairs, weights, evaluate, heldout: Pairs | None = None, kl_target=KL_TARGET):
    """Full-batch Adam DPO from theta_ref (also the reference) until KL(π‖ref) ≥ KL_TARGET or MAX_STEPS.

    Returns [(kl, value)] per step from step 0, value = evaluate(θ, lp) (gold gain) or, with `heldout`, the held-out
    pairs' per-pair preference log-likelihood log σ(β·(h_c - h_r))."""
    theta = theta_ref.copy()
    lp_ref = seq_logp(theta_ref)
    p_ref = np.exp(lp_ref)
    D = C2[pairs.w] - C2[pairs.l]  # (N, 20)
    onehot = np.zeros((K, len(pairs)))
    onehot[pairs.k, np.arange(len(pairs))] = 1.0
    wts = np.asarray(weights, dtype=float) / len(pairs)
    m, v = np.zeros_like(theta), np.zeros_like(theta)
    traj = []
    for it in range(MAX_STEPS + 1):
        lp = seq_logp(theta)
        kl = float((np.exp(lp) * (lp - lp_ref)).sum(1).mean())
        if heldout is None:
            traj.append((kl, evaluate(lp)))
        else:
            h = BETA * ((lp - lp_ref)[heldout.k, heldout.w] - (lp - lp_ref)[heldout.k, heldout.l])
            traj.append((kl, -np.logaddexp(0.0, -h)))
        if kl >= kl_target or it == MAX_STEPS:
            break
        ls = log_softmax(theta)
        z = BETA * ((lp - lp_ref)[pairs.k, pairs.w] - (lp - lp_ref)[pairs.k, pairs.l])
        coef = -BETA * sigmoid(-z) * wts  # d(weighted mean loss)/d margin
        G = (onehot * coef) @ D  # (K, 20): Σ_i coef_i D_i per prompt
        Grow = G.reshape(K, V + 1, V).sum(-1)
        g = G.reshape(K, V + 1, V) - Grow[..., None] * np.exp(ls)
        m = 0.9 * m + 0.1 * g
        v = 0.999 * v + 0.001 * g * g
        theta = theta - LR * (m / (1 - 0.9 ** (it + 1))) / (np.sqrt(v / (1 - 0.999 ** (it + 1))) + 1e-8)
    del p_ref
    return traj


def at_kl(traj, target=KL_TARGET):
    """The value at KL = target, linearly interpolated between steps; NaN if never reached."""
    for (k0, v0), (k1, v1) in zip(traj, traj[1:]):
        if k1 >= target:
            f = (target - k0) / max(k1 - k0, 1e-12)
            return v0 + f * (v1 - v0)
    return math.nan


@dataclass
class SeedResult:
    gain: dict  # arm -> gold gain at KL 1
    choice: str
    ess_ln_old: float
    kl_old: float  # KL(v2 ‖ first old version), nats per response
    trust: dict = field(default_factory=dict)


class World:
    """One seed of one regime: the task, the old, new and oracle pairs, and the functions align's weighting code is
    driven with (`pilot` and `agreement` for align.reuse.choose_weighting)."""

    def __init__(self, r: Regime, seed: int):
        self.r = r
        self.rng = rng = np.random.default_rng([zlib.crc32(r.name.encode()), seed])
        self.task = task = make_task(rng, r)
        self.lps = lps = [seq_logp(t) for t in task.thetas]
        self.new_v = new_v = len(task.thetas) - 1
        flips = r.flip if isinstance(r.flip, tuple) else (r.flip,) * len(r.n_old)
        self.old = Pairs.cat([sample_pairs(rng, lps[i], task.gold_old, n, i, flips[i]) for i, n in enumerate(r.n_old)])
        self.new = sample_pairs(rng, lps[-1], task.gold, r.n_new, new_v)
        self.oracle = sample_pairs(rng, lps[-1], task.gold, sum(r.n_old) + r.n_new, new_v)
        self.pool = pool = Pairs.cat([self.old, self.new])
        gen_c = np.stack([lp[pool.k, pool.w] for lp in lps])
        gen_r = np.stack([lp[pool.k, pool.l] for lp in lps])
        idx = np.arange(len(pool))
        self.cols = dict(target_chosen_logps=gen_c[-1], target_rejected_logps=gen_r[-1],
                         gen_chosen_logps=gen_c[pool.version, idx], gen_rejected_logps=gen_r[pool.version, idx],
                         chosen_lengths=np.full(len(pool), float(L)), rejected_lengths=np.full(len(pool), float(L)))
        self.versions = [f"v{v}" for v in pool.version]
        self.version_logps = {f"v{v}": (gen_c[v], gen_r[v]) for v in sorted(set(pool.version.tolist()))}
        coll = log_collision(task.thetas[-1])
        self.collision = dict(target_chosen_log_collision=coll[pool.k, pool.w],
                              target_rejected_log_collision=coll[pool.k, pool.l])

    def weights(self, scheme, alpha=1.0, trust=None) -> np.ndarray:
        return compute_importance_weights(scheme, alpha=alpha, clip=CLIP, source_version=self.versions,
                                          version_logps=self.version_logps, version_trust=trust, **self.cols,
                                          **self.collision).weights.numpy()

    def gold_gain(self, lp) -> float:
        return float(((np.exp(lp) - np.exp(self.lps[-1])) * self.task.gold).sum(1).mean())

    def final(self, pairs: Pairs, w) -> float:
        """Gold gain at the regime's matched KL of DPO on `pairs` with weights `w`."""
        return at_kl(train(self.task.thetas[-1], pairs, w, self.gold_gain, kl_target=self.r.kl), self.r.kl)

    def agreement(self):
        """Per-version trust's evidence: DPO fits on each half of the new pairs, P(chosen ≻ rejected) under the
        fitted implicit reward for the other half and for every old pair."""
        new, old = self.new, self.old
        halves = np.array_split(self.rng.permutation(len(new)), 2)
        q_new, q_old = np.empty(len(new)), np.zeros(len(old))
        for a, b in ((0, 1), (1, 0)):
            fitted = train(self.task.thetas[-1], new.take(halves[a]), np.ones(len(halves[a])), None,
                           heldout=Pairs.cat([new.take(halves[b]), old]), kl_target=self.r.kl)
            q = np.exp(fitted[-1][1])
            q_new[halves[b]] = q[:len(halves[b])]
            q_old += q[len(halves[b]):] / 2
        return torch.tensor(q_old), torch.tensor(q_new)

    def pilot(self, candidate, w, heldout) -> PilotFit:
        """A pilot fit for `auto`: DPO on the pairs with weight > 0, scored on the held-out pairs along the way."""
        w = w.numpy()
        rows = np.nonzero(w > 0)[0]
        traj = train(self.task.thetas[-1], self.pool.take(rows), w[rows], None,
                     heldout=self.pool.take(heldout.numpy()), kl_target=self.r.kl)
        return PilotFit([k for k, _ in traj], [torch.tensor(x) for _, x in traj])

    def old_weights(self, w) -> np.ndarray:
        return w[self.pool.version != self.new_v]


def run_seed(r: Regime, seed: int) -> SeedResult:
    world = World(r, seed)
    pool, cols, new_v = world.pool, world.cols, world.new_v
    gain = {"union": world.final(pool, np.ones(len(pool))), "oracle": world.final(world.oracle, np.ones(len(world.oracle)))}
    lam = cols["target_chosen_logps"] + cols["target_rejected_logps"] - cols["gen_chosen_logps"] - cols["gen_rejected_logps"]
    alpha = tempered_alpha(world.old_weights(lam), 0.5, CLIP)
    for scheme, a in (("sequence", 1.0), ("tempered", alpha), ("length_normalized", 1.0), ("mixture", 1.0),
                      ("wpo", 1.0)):
        gain[scheme] = world.final(pool, world.weights(scheme, a))
    q = world.agreement() if len(world.new) >= 4 else None
    ln_old = world.old_weights(world.weights("length_normalized"))
    old_versions = [f"v{v}" for v in world.old.version]
    trust = version_trust_from_agreement(q[0], old_versions, q[1], ln_old).trust if q else {}
    gain["trust"] = world.final(pool, world.weights("none", trust=trust)) if trust else gain["union"]
    choice = choose_weighting(cols, world.versions, f"v{new_v}", pilot=world.pilot,
                              agreement=(lambda: q) if q else None, clip=CLIP, kl=r.kl)
    gain["auto"] = gain["union"] if choice.result is None else world.final(pool, choice.result.weights.numpy())
    ess = float(ln_old.sum() ** 2 / (len(ln_old) * (ln_old ** 2).sum()))
    lp2 = world.lps[-1]
    kl_old = float((np.exp(lp2) * (lp2 - world.lps[0])).sum(1).mean())
    return SeedResult(gain, choice.scheme, ess, kl_old, trust)


def ci95(d):
    d = d[~np.isnan(d)]
    if len(d) < 2:
        return "n/a"
    return f"{d.mean():+.3f} ± {stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / math.sqrt(len(d)):.3f}"


def one_sided_t(d, margin=0.0):
    """p of H0: mean(d) ≤ margin (paired, one-sided); exact 0/1 when d is constant."""
    d = d[~np.isnan(d)]
    sd = d.std(ddof=1) if len(d) > 1 else 0.0
    if sd == 0:
        return 0.0 if d.mean() > margin else 1.0
    t = (d.mean() - margin) / (sd / math.sqrt(len(d)))
    return float(stats.t.sf(t, len(d) - 1))


def wilcoxon_p(d, margin=0.0):
    d = d[~np.isnan(d)] - margin
    if np.all(d == 0):
        return 1.0
    return float(stats.wilcoxon(d, alternative="greater", zero_method="zsplit").pvalue)


def holm(pvalues: dict) -> dict:
    """Holm-adjusted p-values (step-down, monotone)."""
    order = sorted(pvalues, key=pvalues.get)
    out, running = {}, 0.0
    for i, key in enumerate(order):
        running = max(running, min(1.0, (len(order) - i) * pvalues[key]))
        out[key] = running
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=60)
    parser.add_argument("--regimes", default=",".join(REGIMES))
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    names = [n for n in args.regimes.split(",") if n]
    unknown = [n for n in names if n not in REGIMES]
    if unknown:
        parser.error(f"unknown regime(s) {unknown}; choose from {list(REGIMES)}")
    start = time.time()
    results = {}
    for name in names:
        t0 = time.time()
        results[name] = [run_seed(REGIMES[name], s) for s in range(args.seeds)]
        print(f"  {name}: {args.seeds} seeds in {time.time() - t0:.0f} s", file=sys.stderr, flush=True)
    print(f"bench/iw_sim.py: {args.seeds} seeds a regime, gold gain at KL(π‖v2) = {KL_TARGET} (flipped: 0.5) vs union "
          f"(paired, 95% t-interval); auto candidates {', '.join(AUTO_CANDIDATES)}; {time.time() - start:.0f} s\n")
    arms = [a for a in ARMS if a != "union"]
    print("| regime | KL(v2‖old) | old ESS/N (LN) | union gain | " + " | ".join(arms) + " | auto chose |")
    print("|" + "---|" * (5 + len(arms)))
    p_sup, p_ni, p_wil = {}, {}, {}
    for name, res in results.items():
        union = np.array([x.gain["union"] for x in res])
        cells = [ci95(np.array([x.gain[a] for x in res]) - union) for a in arms]
        d = np.array([x.gain["auto"] for x in res]) - union
        p_sup[name], p_ni[name], p_wil[name] = one_sided_t(d), one_sided_t(d, NI_MARGIN), wilcoxon_p(d)
        chose = {}
        for x in res:
            chose[x.choice] = chose.get(x.choice, 0) + 1
        chosen = ", ".join(f"{k} {v}" for k, v in sorted(chose.items(), key=lambda kv: -kv[1]))
        print(f"| {REGIMES[name].note} | {np.mean([x.kl_old for x in res]):.1f} | "
              f"{np.mean([x.ess_ln_old for x in res]):.2f} | {np.nanmean(union):.3f} | " + " | ".join(cells)
              + f" | {chosen} |")
    sup, ni = holm(p_sup), holm(p_ni)
    print(f"\nauto vs union, one-sided paired t-tests, Holm-corrected across {len(results)} regimes "
          f"(non-inferiority margin {NI_MARGIN}):\n")
    print("| regime | auto − union | p (better) | Holm p | Wilcoxon p | non-inferior p | Holm p | verdict |")
    print("|---|---|---|---|---|---|---|---|")
    verdicts = {}
    for name, res in results.items():
        d = np.array([x.gain["auto"] for x in res]) - np.array([x.gain["union"] for x in res])
        better, noninf = sup[name] < 0.05, ni[name] < 0.05
        verdicts[name] = (better, noninf)
        word = "better" if better else "non-inferior" if noninf else "NOT shown non-inferior"
        print(f"| {name} | {ci95(d)} | {p_sup[name]:.2g} | {sup[name]:.2g} | {p_wil[name]:.2g} | {p_ni[name]:.2g} | "
              f"{ni[name]:.2g} | {word} |")
    if "old_new" in verdicts:
        ok = verdicts["old_new"][0] and all(n for _, n in verdicts.values())
        print(f"\nTarget (auto non-inferior everywhere, better in old ≫ new at corrected p < 0.05): "
              f"{'MET' if ok else 'NOT MET'}")


if __name__ == "__main__":
    main()
