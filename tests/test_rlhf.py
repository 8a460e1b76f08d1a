"""RLHF on a tiny model: RLOO trains a LoRA policy against a (random-head) reward model, logs KL, reward, β and the
gold evaluation, saves the run, resumes from its checkpoint and pushes audit pairs; GRPO runs a step."""

import contextlib
import json
import math
from pathlib import Path

import pytest
import torch
from transformers import TrainerCallback

from align.config import MonitorArgs, PromptDataArgs, RLHFArgs
from align.errors import ConfigError
from align.runs import read_metrics
from align.trainers.rlhf import AdaptiveKLController, RewardFunction, train_rlhf
from tests.helpers import rlhf_configs as configs

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def one_thread():
    """The tiny model gains nothing from threads, and the test machine is shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class ParamProbe(TrainerCallback):
    """Snapshots the trainable parameters at the start and the end of training."""

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.after = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_rloo_trains_saves_resumes_and_audits(tiny_model_dir, reward_run, prompts_file, tmp_path):
    out, db = tmp_path / "rlhf", tmp_path / "store.db"
    probe = ParamProbe()
    monitor = MonitorArgs(monitor_top_k=3, audit_db=f"sqlite:///{db}")
    train_rlhf(*configs(tiny_model_dir, reward_run, prompts_file, out, monitor=monitor), extra_callbacks=[probe])

    assert probe.before and all("lora" in n for n in probe.before)
    assert [n for n in probe.before if torch.equal(probe.before[n], probe.after[n])] == []

    rows = read_metrics(out / "metrics.jsonl")
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2]
    for row in train_rows:
        assert math.isfinite(row["loss"]) and math.isfinite(row["kl"]) and math.isfinite(row["reward"])
        assert row["monitor/flag"] == 0 and 0 <= row["monitor/repetition"] <= 1 and row["monitor/length"] >= 1
    betas = [r["kl/beta"] for r in train_rows]
    assert betas[0] != 0.05 and betas[1] != betas[0]  # the adaptive controller moved β
    evals = [r for r in rows if "eval/gold_reward" in r]
    assert [r["step"] for r in evals] == [0, 2]  # before training and every eval_steps
    assert {"eval/proxy_reward", "eval/length", "eval/gold/arithmetic"} <= set(evals[0])

    version = json.loads((out / "version.json").read_text())
    assert version["method"] == "rlhf" and version["metrics"]["global_step"] == 2
    assert {"kl", "reward", "eval/gold_reward", "eval/gold_reward_start"} <= set(version["metrics"])
    assert (out / "adapter" / "adapter_model.safetensors").is_file() and (out / "config.yaml").is_file()
    assert not json.loads((out / "monitor.json").read_text())["flagged"]

    from align.store import ModelVersion, Pair, Response, connect

    with connect(f"sqlite:///{db}") as store, store.read() as session:
        pairs = session.query(Pair).all()
        assert len(pairs) == 3 and {p.rule for p in pairs} == {"audit"} and {p.votes_required for p in pairs} == {3}
        for pair in pairs:
            a, b = session.get(Response, pair.response_a_id), session.get(Response, pair.response_b_id)
            assert a.prompt_id == b.prompt_id == pair.prompt_id
            assert session.get(ModelVersion, a.model_version_id).name == "rlhf"
            assert session.get(ModelVersion, b.model_version_id).method == "base" and b.token_logps

    # Resume: one more step from checkpoint-2, β picked up where it stopped.
    train_rlhf(*configs(tiny_model_dir, reward_run, prompts_file, out, max_steps=3, resume=True))
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3]
    resumed = [r for r in rows if "loss" in r][-1]
    assert resumed["kl/beta"] == pytest.approx(AdaptiveKLController.next_beta(
        betas[1], resumed["kl"], 0.01, 4, 20))
    assert json.loads((out / "version.json").read_text())["metrics"]["global_step"] == 3


class StepProbe(TrainerCallback):
    """The trainable parameters as each gold evaluation saw them: at the start and at every step's end."""

    def __init__(self):
        self.by_step = {}

    def _snap(self, step, model):
        self.by_step[step] = {n.replace(".default", ""): p.detach().clone()
                              for n, p in model.named_parameters() if p.requires_grad}

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._snap(state.global_step, model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self._snap(state.global_step, model)


def test_keep_policy_saves_the_policy_of_the_best_gold_evaluation(tiny_model_dir, reward_run, prompts_file,
                                                                   tmp_path, monkeypatch, caplog):
    import align.monitor
    from safetensors.torch import load_file

    def run(name, keep_policy, data_eval=True):
        out, probe = tmp_path / name, StepProbe()
        rl = RLHFArgs(reward_model=str(reward_run), num_generations=2, max_new_tokens=6, eval_per_family=1,
                      kl_target=0.01, kl_horizon=20, length_penalty=0.01, keep_policy=keep_policy)
        model, lora, data, rl, monitor, train = configs(tiny_model_dir, reward_run, prompts_file, out, rl=rl,
                                                        max_steps=3, eval_steps=1, learning_rate=0.2)
        if not data_eval:
            data = PromptDataArgs(prompts_file=str(prompts_file), eval_prompts_file=None)
        train_rlhf(model, lora, data, rl, monitor, train, extra_callbacks=[probe])
        saved = load_file(str(out / "adapter" / "adapter_model.safetensors"))
        return json.loads((out / "version.json").read_text())["metrics"], out, probe.by_step, saved

    # A tiny random policy games nothing, so the monitor's rules (tests/test_monitor.py) stay quiet: here the flag
    # is raised from the second training step on, and what is under test is what the run saves after a flag.
    monkeypatch.setattr(align.monitor, "detect", lambda series, cfg: ["forced"] if len(series.kl) >= 2 else [])
    metrics, out, by_step, saved = run("flagged", "best_if_flagged")
    assert metrics["monitor/flagged"] == 1
    evals = [r for r in read_metrics(out / "metrics.jsonl") if "eval/gold_reward" in r]
    assert [r["step"] for r in evals] == [0, 1, 2, 3]
    golds = [r["eval/gold_reward"] for r in evals]
    best = golds.index(max(golds))  # the earliest of the best
    assert best < 3  # this seed's gold first peaks before the last step: the run rolls back
    assert metrics["policy/kept_step"] == best and metrics["eval/gold_reward"] == golds[best]
    assert metrics["policy/dropped/gold_reward"] == golds[-1] and "policy/dropped/kl" in metrics
    assert json.loads((out / "best_policy" / "best.json").read_text())["step"] == best
    # the saved adapter holds the weights of that evaluation, not the last step's
    assert saved and all(torch.equal(saved[n], by_step[best][n]) for n in saved)
    assert any(not torch.equal(saved[n], by_step[3][n]) for n in saved)

    monkeypatch.undo()  # the real rules: quiet on this run
    metrics, _, by_step, saved = run("quiet", "best_if_flagged")
    assert metrics["monitor/flagged"] == 0 and "policy/kept_step" not in metrics
    assert all(torch.equal(saved[n], by_step[3][n]) for n in saved)  # not flagged: the last policy
    metrics, _, by_step, saved = run("best", "best")  # always the best evaluation's, flagged or not
    assert metrics["monitor/flagged"] == 0 and metrics["policy/kept_step"] == best
    assert all(torch.equal(saved[n], by_step[best][n]) for n in saved)

    # beyond noise: only an evaluation whose paired gain over the start has an interval above 0 may replace it
    metrics, out, by_step, saved = run("beyond-noise", "best_beyond_noise")
    evals = [r for r in read_metrics(out / "metrics.jsonl") if "eval/gold_reward" in r]
    assert "eval/gold_gain_low" not in evals[0] and all("eval/gold_gain_low" in r for r in evals[1:])
    qualified = [0] + [i for i, r in enumerate(evals) if i and r["eval/gold_gain_low"] > 0]
    expected = max(qualified, key=lambda i: (evals[i]["eval/gold_reward"], -i))
    assert metrics["policy/kept_step"] == evals[expected]["step"]
    assert all(torch.equal(saved[n], by_step[evals[expected]["step"]][n]) for n in saved)
    start = json.loads((out / "best_policy" / "start.json").read_text())
    assert start["step"] == 0 and len(start["rewards"]) == 7  # one task per family, paired across evaluations

    with caplog.at_level("WARNING", logger="align.trainers.rlhf"):  # nothing to choose among: said, last kept
        metrics, _, by_step, saved = run("no-eval", "best", data_eval=False)
    assert "keep_policy best does nothing here" in caplog.text and "policy/kept_step" not in metrics
    assert all(torch.equal(saved[n], by_step[3][n]) for n in saved)


def test_grpo_runs_a_step(tiny_model_dir, reward_run, prompts_file, tmp_path):
    out = tmp_path / "grpo"
    rl = RLHFArgs(algorithm="grpo", reward_model=str(reward_run), num_generations=2, max_new_tokens=6, beta=0.05)
    model, lora, data, rl, monitor, train = configs(tiny_model_dir, reward_run, prompts_file, out, rl=rl,
                                                    monitor=MonitorArgs(monitor=False), max_steps=1)
    data = PromptDataArgs(prompts_file=str(prompts_file), eval_prompts_file=None, max_prompts=2)
    train_rlhf(model, lora, data, rl, monitor, train)
    (row,) = [r for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
    assert math.isfinite(row["loss"]) and "kl" in row and "rewards/reward_model/mean" in row
    assert json.loads((out / "version.json").read_text())["method"] == "rlhf"
    assert not (out / "monitor.json").exists()


def test_reward_function_normalises_and_penalises_length(reward_run):
    from align.trainers.reward import load_reward_model, score

    model, tokenizer, stats = load_reward_model(reward_run)
    prompts = [[{"role": "user", "content": "Say hi."}]] * 2
    completions = [[{"role": "assistant", "content": "hi"}], [{"role": "assistant", "content": "hello there"}]]
    ids = [[1, 2], [1, 2, 3, 4, 5]]
    logged = {}
    fn = RewardFunction(model, tokenizer, stats, length_penalty=0.1)
    rewards = fn(prompts, completions, ids, family=["", ""], gold=["", ""], log_metric=logged.__setitem__)
    raw = score(model, tokenizer, prompts, ["hi", "hello there"])
    expected = [(r - 0.5) / 2.0 - 0.1 * len(i) for r, i in zip(raw, ids)]
    assert rewards == pytest.approx(expected, abs=1e-5)
    assert logged["monitor/length"] == pytest.approx(3.5) and "monitor/gold" not in logged


def test_adaptive_kl_controller_by_hand():
    # KL twice the target: the error is clipped to +0.2, β grows by 0.2 · n / horizon.
    assert AdaptiveKLController.next_beta(0.1, 0.2, 0.1, n=50, horizon=100) == pytest.approx(0.1 * 1.1)
    assert AdaptiveKLController.next_beta(0.1, 0.09, 0.1, n=100, horizon=100) == pytest.approx(0.1 * 0.9)
    assert AdaptiveKLController.next_beta(0.1, 0.1, 0.1, n=100, horizon=100) == pytest.approx(0.1)


def test_config_errors(tiny_model_dir, reward_run, prompts_file, tmp_path):
    with pytest.raises(ConfigError, match="must be a multiple of num_generations"):
        rl = RLHFArgs(reward_model=str(reward_run), num_generations=3)
        train_rlhf(*configs(tiny_model_dir, reward_run, prompts_file, tmp_path / "a", rl=rl))
    with pytest.raises(ConfigError, match="num_generations must be >= 2"):
        RLHFArgs(num_generations=1)
    with pytest.raises(ConfigError, match="kl_target needs a start beta > 0"):
        RLHFArgs(beta=0.0, kl_target=0.1)
    from align.generation import vllm_missing

    missing = vllm_missing()
    if missing:  # here: no vLLM or no CUDA; the same one line as `align generate --engine vllm`, before any loading
        rl = RLHFArgs(reward_model=str(reward_run), num_generations=2, engine="vllm")
        with pytest.raises(ConfigError, match=r"^engine vllm: vLLM (is not installed|needs a CUDA GPU)") as caught:
            train_rlhf(*configs(tiny_model_dir, reward_run, prompts_file, tmp_path / "b", rl=rl))
        assert str(caught.value) == missing and "\n" not in missing
        assert not (tmp_path / "b").exists()
    with pytest.raises(ConfigError, match="engine"):
        RLHFArgs(engine="sglang")


def test_engine_reaches_trl_config(tmp_path):
    """engine vllm asks TRL for vLLM rollouts, colocated; hf for transformers' generate."""
    from align.config import ModelArgs, TrainArgs
    from align.trainers.rlhf import trainer_config

    train = TrainArgs(output_dir=str(tmp_path), per_device_train_batch_size=2, report_to="none")
    hf = trainer_config(RLHFArgs(num_generations=2), train, ModelArgs(dtype="float32"), tmp_path)
    assert hf.use_vllm is False
    vllm = trainer_config(RLHFArgs(num_generations=2, engine="vllm"), train, ModelArgs(dtype="float32"), tmp_path)
    assert vllm.use_vllm is True and vllm.vllm_mode == "colocate"


def test_gain_beyond_noise_needs_a_paired_gain_whose_interval_is_above_zero():
    from align.trainers.rlhf import gain_low

    start = [0.0] * 10 + [1.0] * 10
    assert 0.25 < gain_low([1.0] * 20, start) < 0.5  # half the tasks gained 1, none lost: beyond noise
    assert gain_low([1.0] + [0.0] * 9 + [1.0] * 10, start) <= 0  # one task of twenty gained: noise
    assert gain_low([1.0] * 10 + [0.0] * 10, start) < -0.3  # swapped: as many losses as gains
    assert gain_low(start, start) == 0.0
    with pytest.raises(ValueError):
        gain_low([1.0], start)  # evaluations of different task sets are not paired


def test_cpu_fused_head_scores_completion_tokens_only_with_the_same_logps_and_grads(monkeypatch):
    """completion_tokens_only: TRL's fused LM head projects only the labelled rows on a CPU (the prompt's and the
    padding's are skipped), and the per-token log-probs, entropies and LoRA gradients are those of TRL's
    every-position path. Fails if a TRL release moves the switch (the lever would then silently be off)."""
    import trl.trainer.utils as trl_utils
    from trl.trainer.utils import add_fused_lm_head

    from align.config import LoraArgs
    from align.models import apply_lora, tiny_model
    from align.trainers.rlhf import completion_tokens_only

    torch.manual_seed(0)
    model = tiny_model(seed=3)
    add_fused_lm_head(model, temperature=0.7, outputs=("log_probs", "entropy"))
    model = apply_lora(model, LoraArgs(lora_r=4, lora_alpha=8))
    ids = torch.randint(5, 200, (3, 11))
    attention = torch.ones_like(ids)
    attention[0, 9:] = 0  # a completion that ended early: padding
    labels = ids.masked_fill(attention == 0, -100)
    labels[:, :6] = -100  # the prompt
    rows: list[int] = []
    chunked = trl_utils._ChunkedLogProbFunction.apply
    monkeypatch.setattr(trl_utils._ChunkedLogProbFunction, "apply",
                        lambda hidden, *args: rows.append(hidden.shape[0]) or chunked(hidden, *args))

    def run() -> tuple[torch.Tensor, torch.Tensor, dict]:
        model.zero_grad(set_to_none=True)
        out = model(input_ids=ids, attention_mask=attention, labels=labels, fused_lm_head=True)
        (out.log_probs.sum() + out.entropy.sum()).backward()
        return out.log_probs.detach(), out.entropy.detach(), {
            n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    every = run()
    with completion_tokens_only() as on:
        compact = run()
    assert on is True
    assert rows == [3 * 10, int((labels[:, 1:] != -100).sum())] == [30, 13]  # completions of 3, 5 and 5 tokens
    assert trl_utils._use_triton(torch.device("cpu")) is False  # TRL's own choice is back afterwards
    mask = labels[:, 1:] != -100
    for a, b in zip(every[:2], compact[:2]):
        assert torch.allclose(a[mask], b[mask], atol=1e-5) and not b[~mask].any()
    assert every[2].keys() == compact[2].keys() and len(every[2]) > 0
    for name, grad in every[2].items():
        assert torch.allclose(grad, compact[2][name], atol=1e-5), name


def test_bf16_rollouts_sample_what_plain_autocast_samples_and_give_the_float32_weights_back():
    """bf16_rollouts casts the frozen base weights once instead of autocast casting them at every token: the same
    bf16 matmuls, so the same samples; the head (tied to the embeddings) and the LoRA weights stay float32, and
    afterwards every weight is its float32 self again."""
    from align.config import LoraArgs
    from align.models import apply_lora, tiny_model
    from align.trainers.rlhf import bf16_rollouts

    torch.manual_seed(0)
    model = apply_lora(tiny_model(seed=5), LoraArgs(lora_r=4, lora_alpha=8))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)  # a trained adapter, not the zero one of step 0
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids = torch.randint(5, 200, (4, 7))

    def sample() -> tuple[torch.Tensor, torch.Tensor]:
        torch.manual_seed(11)
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=True,
                             temperature=0.7, top_k=0, pad_token_id=0, output_scores=True,
                             return_dict_in_generate=True)
        return out.sequences, torch.stack(out.scores)

    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        plain = sample()
    with torch.no_grad(), bf16_rollouts(model):
        dtypes = {n: p.dtype for n, p in model.named_parameters()}
        cast = sample()
    assert torch.equal(plain[0], cast[0]) and torch.equal(plain[1], cast[1])  # the same tokens from the same scores
    assert {dtypes[n] for n in dtypes if "base_layer" in n} == {torch.bfloat16}
    assert {dtypes[n] for n in dtypes if "lora_" in n or "embed" in n or "norm" in n} == {torch.float32}
    for name, param in model.named_parameters():
        assert param.dtype == torch.float32 and torch.equal(param, before[name]), name
    with torch.no_grad():
        full = sample()
    assert not torch.equal(full[1], plain[1])  # float32 scores differ: the test can tell the two paths apart


def test_cpu_bf16_rlhf_samples_its_rollouts_under_bf16_rollouts(tiny_model_dir, reward_run, prompts_file, tmp_path,
                                                                monkeypatch):
    """`mixed_precision: bf16` on a CPU: every generation of rollouts runs inside bf16_rollouts, and not the gold
    evaluations (float32). Fails if a TRL release stops calling the method the trainer hooks."""
    import align.trainers.rlhf as rlhf

    entered: list[torch.dtype] = []
    original = rlhf.bf16_rollouts

    @contextlib.contextmanager
    def counting(model):
        with original(model):
            entered.append(torch.get_autocast_dtype("cpu"))
            yield

    monkeypatch.setattr(rlhf, "bf16_rollouts", counting)
    out = tmp_path / "bf16"
    model, lora, data, rl, monitor, train = configs(tiny_model_dir, reward_run, prompts_file, out,
                                                    monitor=MonitorArgs(monitor=False), max_steps=2,
                                                    mixed_precision="bf16")
    train_rlhf(model, lora, data, rl, monitor, train)
    assert entered == [torch.bfloat16, torch.bfloat16]  # one generation of rollouts per step, none for the evaluations
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows if "eval/gold_reward" in r] == [0, 2]
    assert [math.isfinite(r["loss"]) for r in rows if "loss" in r] == [True, True]
