"""Run directories: a folder that is not an align run is never written into, a run that fails before it trains
leaves the directory as it found it, and resuming keeps the books (train_loss over every step, a finished run
left alone, a damaged checkpoint passed over, bit-identical DPO)."""

import json
import logging
import math

import pytest
import torch

from align.config import DPOArgs
from align.errors import AlignError, DataError
from align.runs import RUN_MARKER, prepare_output_dir
from align.trainers.dpo import train_dpo
from align.trainers.sft import train_sft
from tests.helpers import dpo_configs, sft_configs



QUICK_DPO = DPOArgs(interference_samples=0, interference_per_family=0)  # interference: not measured here

def test_a_project_folder_is_refused_and_left_untouched(tiny_model_dir, chat_files, tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    (project / "README.md").write_text("# my project\n")
    (project / "config.yaml").write_text("mine: true\n")
    with pytest.raises(AlignError, match=rf"output directory {project} is not empty and is not an align run "
                                         r"\(it holds README.md, config.yaml\)"):
        train_sft(*sft_configs(tiny_model_dir, chat_files, project, max_steps=1))
    assert (project / "README.md").read_text() == "# my project\n"
    assert (project / "config.yaml").read_text() == "mine: true\n"
    assert sorted(p.name for p in project.iterdir()) == ["README.md", "config.yaml"]


def test_a_file_is_refused(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(AlignError, match="is a file, not a directory"):
        prepare_output_dir(tmp_path / "f", resume=False)


def test_run_directories_are_marked_and_reusable(tmp_path):
    out = prepare_output_dir(tmp_path / "run", resume=False)
    assert (out / RUN_MARKER).is_file()
    (out / "metrics.jsonl").write_text("")  # an attempt that stopped before its first checkpoint
    assert prepare_output_dir(out, resume=False) == out


def test_two_processes_preparing_one_run_directory_do_not_trip_over_each_other(tmp_path, monkeypatch):
    """The ranks of a distributed run prepare the same directory at once. Another process preparing it between this
    one's probe write and unlink (the interleaving that failed a 2-process CI run) finds a run, not a stranger's
    files, and leaves this one's probe in place: each process probes with a file of its own."""
    import subprocess
    import sys
    from pathlib import Path as P

    out = tmp_path / "run"
    write_text = P.write_text

    def write_then_other_rank(self, *args, **kwargs):
        written = write_text(self, *args, **kwargs)
        if self.name.startswith(".write-test"):
            other = subprocess.run([sys.executable, "-c", "import sys; from align.runs import prepare_output_dir; "
                                    "prepare_output_dir(sys.argv[1], resume=True)", str(out)],
                                   capture_output=True, text=True)
            assert other.returncode == 0, other.stderr
        return written

    monkeypatch.setattr(P, "write_text", write_then_other_rank)
    assert prepare_output_dir(out, resume=True) == out
    assert sorted(p.name for p in out.iterdir()) == [RUN_MARKER]


@pytest.mark.parametrize("existed", [False, True])
def test_a_run_failing_before_training_leaves_nothing(tiny_model_dir, chat_files, tmp_path, existed):
    out = tmp_path / "new-run"
    if existed:
        out.mkdir()
    train_file, eval_file = chat_files
    train_file.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')  # no assistant turn
    with pytest.raises(DataError):
        train_sft(*sft_configs(tiny_model_dir, (train_file, eval_file), out, max_steps=1))
    assert out.exists() == existed and (not existed or list(out.iterdir()) == [])


# ---- resume bookkeeping ----------------------------------------------------------------------------------------------

class KillAtStep3:
    """Raises as a kill -9 would cut the run: after step 2's checkpoint, during step 3 (align loop callback)."""

    def on_log(self, step, metrics):
        if step == 3:
            raise KeyboardInterrupt


def _adapter(out):
    from safetensors.torch import load_file

    return load_file(out / "adapter" / "adapter_model.safetensors")


def test_dpo_resumed_mid_epoch_is_bit_identical_with_dropout(tiny_model_dir, data_files, tmp_path):  # noqa: F811
    def configs(out, **kw):
        c = dpo_configs(tiny_model_dir, data_files, dpo=QUICK_DPO, out=out, max_steps=5, save_steps=2, eval_steps=0,
                        **kw)
        c[1].lora_dropout = 0.1  # dropout masks come from the global RNG: the checkpoint must carry its state
        return c

    train_dpo(*configs(tmp_path / "straight"))
    with pytest.raises(KeyboardInterrupt):
        train_dpo(*configs(tmp_path / "resumed"), callbacks=[KillAtStep3()])
    train_dpo(*configs(tmp_path / "resumed", resume=True))  # 11 pairs in batches of 4: step 2 is mid-epoch
    a, b = _adapter(tmp_path / "straight"), _adapter(tmp_path / "resumed")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    loss = [json.loads((tmp_path / d / "version.json").read_text())["metrics"]["train_loss"]
            for d in ("straight", "resumed")]
    assert loss[0] == loss[1]  # over all 5 steps, not the 3 resumed ones


def test_sft_train_loss_covers_the_steps_before_a_resume(tiny_model_dir, chat_files, tmp_path):
    from transformers import TrainerCallback

    class Kill(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 3:
                raise KeyboardInterrupt

    train_sft(*sft_configs(tiny_model_dir, chat_files, tmp_path / "straight", max_steps=5, save_steps=2, eval_steps=0))
    with pytest.raises(KeyboardInterrupt):
        train_sft(*sft_configs(tiny_model_dir, chat_files, tmp_path / "resumed", max_steps=5, save_steps=2,
                               eval_steps=0), extra_callbacks=[Kill()])
    train_sft(*sft_configs(tiny_model_dir, chat_files, tmp_path / "resumed", max_steps=5, save_steps=2, eval_steps=0,
                           resume=True))
    a, b = _adapter(tmp_path / "straight"), _adapter(tmp_path / "resumed")
    assert all(torch.equal(a[k], b[k]) for k in a)
    versions = [json.loads((tmp_path / d / "version.json").read_text()) for d in ("straight", "resumed")]
    assert versions[1]["metrics"]["train_loss"] == pytest.approx(versions[0]["metrics"]["train_loss"], rel=1e-6)
    assert versions[1]["metrics"]["global_step"] == 5


def strict_json(path):
    def refuse(constant):
        raise ValueError(f"{path} holds {constant}, which is not JSON")

    return json.loads(path.read_text(), parse_constant=refuse)


@pytest.mark.parametrize("method", ["sft", "dpo"])
def test_resume_on_a_finished_run_is_a_no_op_that_says_so(tiny_model_dir, chat_files, data_files, tmp_path, caplog,
                                                          method):  # noqa: F811
    out = tmp_path / "run"
    if method == "sft":
        def train(**kw):
            return train_sft(*sft_configs(tiny_model_dir, chat_files, out, max_steps=2, **kw))
    else:
        def train(**kw):
            return train_dpo(*dpo_configs(tiny_model_dir, data_files, dpo=QUICK_DPO, out=out, max_steps=2, **kw))
    train()
    before = {p.name: p.read_bytes() for p in (out / "version.json", out / "metrics.jsonl")}
    with caplog.at_level(logging.WARNING):
        assert train(resume=True) == out
    assert "is a finished run (its version.json records the steps asked for): --resume has nothing to do" in caplog.text
    assert {p.name: p.read_bytes() for p in (out / "version.json", out / "metrics.jsonl")} == before
    assert strict_json(out / "version.json")["metrics"]["global_step"] == 2


def test_version_json_is_strict_json(tmp_path):
    from align.runs import write_json

    write_json(tmp_path / "v.json", {"metrics": {"train_loss": math.nan, "acc": [1.0, math.inf]}})
    assert strict_json(tmp_path / "v.json") == {"metrics": {"train_loss": None, "acc": [1.0, None]}}


def test_a_damaged_last_checkpoint_falls_back_to_the_one_before(tmp_path, caplog):
    from tests.helpers import run_toy_loop as loop_run

    straight, _ = loop_run(tmp_path / "a", max_steps=6, save_steps=2)
    loop_run(tmp_path / "b", max_steps=4, save_steps=2)  # checkpoints 2 and 4 (constant learning rate)
    torn = tmp_path / "b" / "checkpoints" / "checkpoint-4" / "model.safetensors"
    torn.write_bytes(torn.read_bytes()[:-7])  # a copy cut short
    with caplog.at_level(logging.WARNING):
        resumed, metrics = loop_run(tmp_path / "b", max_steps=6, save_steps=2, resume=True)
    assert f"checkpoint checkpoint-4 is damaged: {torn} (" in caplog.text
    assert metrics["global_step"] == 6
    for x, y in zip(straight, resumed):  # steps 3-4 were redone from checkpoint 2: the same weights
        torch.testing.assert_close(x, y, rtol=0, atol=0)


def test_a_torn_torch_archive_is_found(tmp_path):
    from align.runs import checkpoint_problem, last_checkpoint

    for step in (1, 2):
        ckpt = tmp_path / "checkpoints" / f"checkpoint-{step}"
        ckpt.mkdir(parents=True)
        torch.save({"x": torch.ones(100)}, ckpt / "optimizer.pt")
        (ckpt / "trainer_state.json").write_text("{}")
    data = (ckpt / "optimizer.pt").read_bytes()
    (ckpt / "optimizer.pt").write_bytes(data[: len(data) // 2])
    assert checkpoint_problem(ckpt).startswith(f"{ckpt / 'optimizer.pt'} (")
    assert last_checkpoint(tmp_path).name == "checkpoint-1"
