"""Run directories: a folder that is not an align run is never written into, and a run that fails before it
trains leaves the directory as it found it."""

import pytest

from align.errors import AlignError, DataError
from align.runs import RUN_MARKER, prepare_output_dir
from align.trainers.sft import train_sft
from tests.test_sft import configs as sft_configs


def test_a_project_folder_is_refused_and_left_untouched(tiny_model_dir, chat_files, tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    (project / "README.md").write_text("# my project\n")
    (project / "config.yaml").write_text("mine: true\n")
    with pytest.raises(AlignError, match=rf"output directory {project} is not empty and is not an align run "
                                         r"\(it holds README.md, config.yaml\)"):
        train_sft(*sft_configs(tiny_model_dir, chat_files, project, max_steps=1))
    assert (project / "README.md").read_text() == "# my project\n" and (project / "config.yaml").read_text() == "mine: true\n"
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
