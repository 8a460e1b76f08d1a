"""Data parallelism on CPU: SFT (TRL's trainer) and DPO (our Accelerate loop) under `accelerate launch` with two
gloo processes give the same training as one process with the same global batch; a 2-process checkpoint resumes
in 1 process; only the main process writes artefacts.

Why the runs can match exactly: both paths use a seedable sampler, so the shuffled order of the whole dataset is a
function of the seed alone, and Accelerate shards it batch by batch (rank r takes batches r, r+W, ...). With
per_device_train_batch_size 2 on 2 processes, step 1 uses rows perm[0:4], exactly the batch of 4 one process takes.
The losses are means over a micro-batch (DPO) or over the global batch's tokens (SFT: TRL counts tokens across
ranks), and DDP averages gradients, so the global gradient is the same up to float summation order. LoRA dropout is
0 and every run is seeded. The data sizes (16 conversations, 12 pairs) are multiples of the global batch 4, so no
rank pads its last batch with repeated rows (Accelerate's even_batches would, changing that step's batch).

Launch note: `accelerate launch --cpu --num_processes 2` starts ONE process in accelerate 1.x (several need an MPI
hostfile), so the test launches recipes/accelerate/ddp.yaml with ACCELERATE_USE_CPU=true: torchrun starts 2
processes and Accelerate picks the gloo backend (DistributedType.MULTI_CPU).

One `accelerate launch` runs both methods (python -m tests.test_distributed, see `_worker`): process start-up
(imports, process group) dominates these tiny runs, so sharing it keeps the file at about 40 s of CPU time.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

# Final LoRA weights after 3 Adam steps at lr 1e-2 agree to ~3e-5 on this machine (float summation order differs
# between one process and an all-reduce of two); 1e-3 is a tenth of one Adam step, far below any real mismatch
# (a different batch or a doubled gradient moves weights by whole steps).
WEIGHT_ATOL = 1e-3
LOSS_RTOL = 1e-4


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- what runs inside each of the 2 processes ------------------------------------------------------------------------


def _seeded_lora(seed: int) -> None:
    """Seed LoRA's random init. align.trainers.sft applies LoRA before anything seeds torch (TRL seeds later, in the
    Trainer), so two SFT runs with the same `seed` start from different adapters; see the report. The DPO trainer
    seeds first and needs nothing."""
    import transformers

    import align.trainers.sft as sft

    apply_lora = sft.apply_lora

    def seeded(model, args):
        transformers.set_seed(seed)
        return apply_lora(model, args)

    sft.apply_lora = seeded


def _worker(spec_path: str) -> None:
    """`python -m tests.test_distributed SPEC.json` under accelerate launch: train SFT then DPO."""
    from accelerate import PartialState

    from align.config import DPO_CONFIG, SFT_CONFIG, parse_config
    from align.trainers.dpo import train_dpo
    from align.trainers.sft import train_sft

    spec = json.loads(Path(spec_path).read_text())
    state = PartialState()
    _seeded_lora(spec["seed"])
    train_sft(*parse_config(SFT_CONFIG, spec["sft"]))
    train_dpo(*parse_config(DPO_CONFIG, spec["dpo"]))
    state.wait_for_everyone()
    if state.is_main_process:  # proof, in the output, that two ranks took part
        print(f"WORLD {state.num_processes} {state.distributed_type}", flush=True)


# --- configs shared by the 2-process run and the 1-process references -----------------------------------------------


def sft_argv(tiny_model_dir, train_file, eval_file, out, **overrides):
    args = dict(model=tiny_model_dir, lora_r=4, lora_alpha=8, lora_dropout=0, train_file=train_file,
                eval_file=eval_file, max_length=64, max_steps=3, per_device_train_batch_size=4, learning_rate=1e-2,
                lr_scheduler_type="constant", warmup_steps=0, logging_steps=1, eval_steps=0, save_steps=2,
                report_to="none", seed=0, output_dir=out)
    args.update(overrides)
    return [token for key, value in args.items() for token in (f"--{key}", str(value))]


def dpo_argv(tiny_model_dir, train_file, eval_file, out, **overrides):
    # weighting_scheme sequence: non-uniform importance weights, normalised over the whole dataset before sharding.
    # 6 eval pairs at per-device batch 2: 3 batches over 2 ranks, so one rank pads with repeats that
    # gather_for_metrics must drop for the eval metrics to match.
    args = dict(model=tiny_model_dir, lora_r=4, lora_alpha=8, lora_dropout=0, train_file=train_file,
                eval_file=eval_file, max_length=128, max_prompt_length=64, weighting_scheme="sequence",
                max_steps=3, per_device_train_batch_size=4, per_device_eval_batch_size=2, learning_rate=1e-2,
                lr_scheduler_type="constant", warmup_steps=0, logging_steps=1, eval_steps=2, save_steps=2,
                report_to="none", seed=0, output_dir=out)
    args.update(overrides)
    return [token for key, value in args.items() for token in (f"--{key}", str(value))]


@pytest.fixture(scope="module")
def data(tiny_model_dir, tmp_path_factory):
    from tests.helpers import load_tokenizer, pair_rows, write_chat_rows, write_pairs

    root = tmp_path_factory.mktemp("dist-data")
    tokenizer = load_tokenizer(tiny_model_dir)
    return {
        "model": str(tiny_model_dir),
        "chat": (str(write_chat_rows(root / "chat.jsonl", 16)), str(write_chat_rows(root / "chat_eval.jsonl", 4, 100))),
        "pairs": (str(write_pairs(root / "pairs.jsonl", pair_rows(tokenizer, n=12))),
                  str(write_pairs(root / "pairs_eval.jsonl", pair_rows(tokenizer, n=6, offset=50)))),
    }


@pytest.fixture(scope="module")
def two_processes(data, tmp_path_factory):
    """One `accelerate launch` of 2 CPU processes (per-device batch 2): SFT for 3 steps, DPO for 2 steps."""
    root = tmp_path_factory.mktemp("dist-run")
    spec = {
        "seed": 0,
        "sft": sft_argv(data["model"], *data["chat"], root / "sft", per_device_train_batch_size=2),
        "dpo": dpo_argv(data["model"], *data["pairs"], root / "dpo", per_device_train_batch_size=2, max_steps=2),
    }
    spec_path = root / "spec.json"
    spec_path.write_text(json.dumps(spec))
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(ROOT / "recipes/accelerate/ddp.yaml"), "--num_processes", "2", "--mixed_precision", "no",
           "--main_process_port", str(free_port()), "-m", "tests.test_distributed", str(spec_path)]
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    assert "WORLD 2 DistributedType.MULTI_CPU" in result.stdout, result.stdout[-3000:]
    return {"root": root}


def adapter(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(run_dir / "adapter" / "adapter_model.safetensors")


def assert_same_adapter(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and len(a) > 0
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=WEIGHT_ATOL, msg=key)
    moved = max(float(b[k].abs().max()) for k in b if "lora_B" in k)
    assert moved > 10 * WEIGHT_ATOL  # the tolerance is small against what training changed (lora_B starts at 0)


def train_rows(run_dir: Path) -> list[dict]:
    from align.runs import read_metrics

    return [m for m in read_metrics(run_dir / "metrics.jsonl") if "loss" in m]


# --- tests ----------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sft_one_process(data, tmp_path_factory):
    """The 1-process reference: per-device batch 4, 3 steps (in this process)."""
    from align.config import SFT_CONFIG, parse_config
    from align.trainers import sft

    original = sft.apply_lora
    _seeded_lora(0)
    try:
        one = tmp_path_factory.mktemp("sft1") / "run"
        sft.train_sft(*parse_config(SFT_CONFIG, sft_argv(data["model"], *data["chat"], one)))
    finally:
        sft.apply_lora = original
    return one


def test_sft_two_processes_match_one(sft_one_process, two_processes):
    one, two = sft_one_process, two_processes["root"] / "sft"

    rows1, rows2 = train_rows(one), train_rows(two)
    assert [r["step"] for r in rows2] == [1, 2, 3]  # one row per step: rank 1 logs nothing
    for r1, r2 in zip(rows1, rows2):
        assert r2["loss"] == pytest.approx(r1["loss"], rel=LOSS_RTOL)
        assert r2["grad_norm"] == pytest.approx(r1["grad_norm"], rel=LOSS_RTOL)  # the all-reduced gradient
        assert r2["num_tokens"] == r1["num_tokens"]  # the same global batch
    assert_same_adapter(adapter(one), adapter(two))


def test_sft_checkpoint_from_two_processes_resumes_in_one(data, two_processes, sft_one_process, tmp_path):
    import shutil

    from align.config import SFT_CONFIG, parse_config
    from align.runs import read_metrics
    from align.trainers.sft import train_sft

    # No LoRA seeding needed: resuming loads the adapter from the checkpoint.
    resumed = tmp_path / "resumed"  # the 2-process run's step-2 checkpoint, continued by one process
    shutil.copytree(two_processes["root"] / "sft" / "checkpoints" / "checkpoint-2",
                    resumed / "checkpoints" / "checkpoint-2")
    train_sft(*parse_config(SFT_CONFIG, sft_argv(data["model"], *data["chat"], resumed, resume="true")))
    assert [m["step"] for m in read_metrics(resumed / "metrics.jsonl") if "loss" in m] == [3]
    assert_same_adapter(adapter(sft_one_process), adapter(resumed))


def test_dpo_two_processes_match_one_and_resume_in_one(data, two_processes, tmp_path):
    import shutil

    from align.config import DPO_CONFIG, parse_config
    from align.runs import read_metrics
    from align.trainers.dpo import train_dpo

    one = tmp_path / "dpo1"
    train_dpo(*parse_config(DPO_CONFIG, dpo_argv(data["model"], *data["pairs"], one)))
    two = two_processes["root"] / "dpo"

    # The same steps: loss (importance-weighted DPO), all-reduced gradient norm, every logged metric.
    rows1, rows2 = train_rows(one), train_rows(two)
    assert [r["step"] for r in rows2] == [1, 2]
    for r1, r2 in zip(rows1, rows2):
        for key in ("loss", "grad_norm", "rewards/margins", "logps/chosen", "kl/ref"):
            assert r2[key] == pytest.approx(r1[key], rel=LOSS_RTOL, abs=1e-6), key
    # Importance weights are computed on the whole dataset before sharding: identical, and not all 1.
    w1 = json.loads((one / "weights.json").read_text())["weights"]
    w2 = json.loads((two / "weights.json").read_text())["weights"]
    assert w2 == pytest.approx(w1, abs=1e-6) and max(w1) - min(w1) > 0.1
    # Evaluation over 6 pairs on 2 ranks (one pads its last batch): the same metrics as one process.
    eval1 = next(m for m in read_metrics(one / "metrics.jsonl") if "eval_loss" in m and m["step"] == 2)
    eval2 = next(m for m in read_metrics(two / "metrics.jsonl") if "eval_loss" in m and m["step"] == 2)
    for key in ("eval_loss", "eval_rewards/accuracies", "eval_rewards/margins", "eval_kl/ref"):
        assert eval2[key] == pytest.approx(eval1[key], rel=LOSS_RTOL, abs=1e-6), key

    # Resume the 2-process checkpoint (step 2) in one process with per-device batch 4: step 3 sees the same data,
    # weights, optimizer state and importance weights as the uninterrupted 1-process run.
    resumed = tmp_path / "resumed"
    shutil.copytree(two / "checkpoints" / "checkpoint-2", resumed / "checkpoints" / "checkpoint-2")
    train_dpo(*parse_config(DPO_CONFIG, dpo_argv(data["model"], *data["pairs"], resumed, resume="true")))
    rows = train_rows(resumed)
    assert [r["step"] for r in rows] == [3]
    assert rows[0]["loss"] == pytest.approx(rows1[2]["loss"], rel=LOSS_RTOL)
    assert_same_adapter(adapter(one), adapter(resumed))


def test_only_the_main_process_writes(two_processes):
    for method in ("sft", "dpo"):
        run = two_processes["root"] / method
        version = json.loads((run / "version.json").read_text())
        assert version["method"] == method
        steps = [m["step"] for m in train_rows(run)]
        assert steps == sorted(set(steps))  # no row written twice
        assert not list(run.glob("**/.write-test*"))
    dpo = two_processes["root"] / "dpo"
    # Accelerate's checkpoint: one RNG state per rank (that is per-rank state, written by each rank), one of the rest.
    ckpt = dpo / "checkpoints" / "checkpoint-2"
    assert sorted(p.name for p in ckpt.glob("random_states_*.pkl")) == ["random_states_0.pkl", "random_states_1.pkl"]
    assert len(list(dpo.glob("metrics.jsonl"))) == 1 and (dpo / "weights.json").is_file()


if __name__ == "__main__":
    _worker(sys.argv[1])
