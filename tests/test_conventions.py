"""Conventions TRL users expect, for every method: report_to trackers, push_to_hub (refused offline before any
training), a model card with the Hub's YAML header, SFT packing and padding-free batches, dataloader workers, and a
chat template for a base model that has none."""

import json
import logging
import shutil

import pytest
import yaml

from align.config import DPOArgs, LoraArgs, ModelArgs, PreferenceDataArgs, RewardArgs, SFTDataArgs, TrainArgs, WeightingArgs
from align.errors import ConfigError, ModelError
from tests.helpers import version, write


def chat_file(tmp_path, n=8):
    return write(tmp_path / "chat.jsonl", [{"prompt": f"What is {i} + {i}?", "completion": f"It is {2 * i}."}
                                           for i in range(n)])


def pair_file(tmp_path, n=8):
    return write(tmp_path / "pairs.jsonl", [{"prompt": f"Q{i}", "chosen": f"good {i}", "rejected": f"bad {i}"}
                                            for i in range(n)])


def targs(out, **kw):
    kw = {**dict(max_steps=1, per_device_train_batch_size=4, learning_rate=1e-3, logging_steps=1, eval_steps=0,
                 save_steps=10, report_to="none", seed=0), **kw}
    return TrainArgs(output_dir=str(out), **kw)


def run(method, model_dir, tmp_path, out, lora=True, data=None, **train_kw):
    from align.trainers.dpo import train_dpo
    from align.trainers.reward import train_reward
    from align.trainers.sft import train_sft

    model, lora_args = ModelArgs(model=str(model_dir)), LoraArgs(use_lora=lora, lora_r=2, lora_alpha=4)
    if method == "sft":
        return train_sft(model, lora_args, SFTDataArgs(train_file=str(chat_file(tmp_path)), eval_file=None,
                                                       max_length=64, **(data or {})), targs(out, **train_kw))
    pairs = PreferenceDataArgs(train_file=str(pair_file(tmp_path)), max_length=64, max_prompt_length=32)
    if method == "dpo":
        return train_dpo(model, lora_args, pairs, DPOArgs(), WeightingArgs(), targs(out, **train_kw))
    return train_reward(model, lora_args, pairs, RewardArgs(), WeightingArgs(), targs(out, **train_kw))


@pytest.mark.parametrize("method", ["sft", "dpo", "reward"])
def test_push_to_hub_offline_fails_before_training(method, tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match=r"push_to_hub to me/model: HF_HUB_OFFLINE is set.*huggingface-cli upload"):
        run(method, tiny_model_dir, tmp_path, out, push_to_hub=True, hub_model_id="me/model")
    assert not out.exists()  # refused before the run directory, let alone training


def test_model_card_has_hub_metadata(tiny_model_dir, tmp_path):
    from align.runs import card_metadata

    out = run("dpo", tiny_model_dir, tmp_path, tmp_path / "run", merge=True)
    card = (out / "README.md").read_text()
    assert card.startswith("---\n")
    meta = yaml.safe_load(card.split("---\n")[1])
    assert meta["library_name"] == "peft" and meta["tags"] == ["align", "dpo", "trl", "lora"]
    assert "base_model" not in meta  # a local directory is no hub id
    assert "Data: read 8 rows of" in card
    assert (out / "merged" / "model.safetensors").is_file() and (out / "adapter" / "adapter_config.json").is_file()
    # An embedded alias maps to its hub id; a hub dataset is listed; a full fine-tune is a transformers model.
    meta = card_metadata({"base_model": "smollm2-135m-instruct", "adapter_path": "/x/merged", "method": "reward",
                          "data": {"hub_dataset": "trl-lib/ultrafeedback_binarized"}})
    assert meta == {"base_model": "HuggingFaceTB/SmolLM2-135M-Instruct", "library_name": "transformers",
                    "tags": ["align", "reward", "trl"], "datasets": ["trl-lib/ultrafeedback_binarized"],
                    "pipeline_tag": "text-classification"}


def test_missing_tracker_package_is_refused_before_training(tiny_model_dir, tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "trackio" else real(name, *a))
    for method in ("sft", "dpo"):
        with pytest.raises(ConfigError, match=r"report_to trackio needs the trackio package: pip install 'align\[trackio\]'"):
            run(method, tiny_model_dir, tmp_path, tmp_path / method, report_to="trackio")
        assert not (tmp_path / method).exists()
    with pytest.raises(ConfigError, match="report_to"):
        TrainArgs(report_to="bogus")


@pytest.mark.parametrize("method", ["sft", "dpo"])
def test_report_to_wandb_offline(method, tiny_model_dir, tmp_path, monkeypatch):
    pytest.importorskip("wandb")  # the optional extra: pip install 'align[wandb]'
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-root"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = run(method, tiny_model_dir, tmp_path, tmp_path / "run", report_to="wandb")
    runs = list((tmp_path / "wandb-root" if method == "sft" else out).rglob("offline-run-*"))
    assert runs and any(p.suffix == ".wandb" for r in runs for p in r.iterdir())


def test_sft_padding_free_matches_padded_loss_and_packing_packs(tiny_model_dir, tmp_path):
    from align.runs import read_metrics

    losses = {}
    for name, data in {"padded": {}, "padding_free": {"padding_free": True}}.items():
        out = run("sft", tiny_model_dir, tmp_path, tmp_path / name, data=data)
        losses[name] = read_metrics(out / "metrics.jsonl")[0]["loss"]
    assert losses["padding_free"] == pytest.approx(losses["padded"], rel=1e-4)
    from transformers import TrainerCallback

    class Rows(TrainerCallback):
        def on_train_begin(self, args, state, control, train_dataloader=None, **kw):
            self.rows = len(train_dataloader.dataset)

    from align.trainers.sft import train_sft

    rows = Rows()
    train_sft(ModelArgs(model=str(tiny_model_dir)), LoraArgs(lora_r=2, lora_alpha=4),
              SFTDataArgs(train_file=str(chat_file(tmp_path)), eval_file=None, max_length=128, packing=True),
              targs(tmp_path / "packed"), extra_callbacks=[rows])
    assert rows.rows < 8  # eight conversations of ~45 tokens packed into fewer sequences of up to 128


def test_dataloader_num_workers_reaches_both_loops(tiny_model_dir, tmp_path):
    from align.trainers.sft import trainer_args

    args = trainer_args(targs(tmp_path / "x", dataloader_num_workers=2), ModelArgs(), False, tmp_path)
    assert args.dataloader_num_workers == 2
    out = run("dpo", tiny_model_dir, tmp_path, tmp_path / "dpo", dataloader_num_workers=1)
    assert version(out)["metrics"]["global_step"] == 1


def test_activation_checkpointing_reaches_sft_and_rlhf_configs_without_a_deprecation_warning(tmp_path):
    """gradient_checkpointing: true turns checkpointing on in TRL's configs under the name the installed transformers
    reads (5.25 renamed it; the old name warned at every run), and false leaves it off."""
    import warnings

    from align.config import RLHFArgs
    from align.trainers.rlhf import trainer_config
    from align.trainers.sft import trainer_args

    for enabled in (True, False):
        train = targs(tmp_path / "x", gradient_checkpointing=enabled, per_device_train_batch_size=2)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            built = [trainer_args(train, ModelArgs(), False, tmp_path),
                     trainer_config(RLHFArgs(num_generations=2), train, ModelArgs(dtype="float32"), tmp_path)]
        assert [str(w.message) for w in caught if "checkpointing" in str(w.message)] == []
        assert [args.gradient_checkpointing for args in built] == [enabled, enabled]


def test_checkpointing_in_our_own_loop_is_on_and_says_nothing_deprecated(tiny_model_dir, tmp_path, monkeypatch):
    """DPO and reward training run our loop (align/trainers/loop.py): gradient_checkpointing: true checkpoints the
    decoder layers there too, without the deprecated transformers call."""
    import warnings

    from transformers import PreTrainedModel

    seen: list[bool] = []
    original = PreTrainedModel.train

    def train(self, mode=True):  # the loop puts the model in training mode after setting it up
        seen.append(any(getattr(m, "gradient_checkpointing", False) for m in self.modules()))
        return original(self, mode)

    monkeypatch.setattr(PreTrainedModel, "train", train)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run("dpo", tiny_model_dir, tmp_path, tmp_path / "gc", gradient_checkpointing=True)
    assert [str(w.message) for w in caught if "checkpointing_enable" in str(w.message)] == []
    assert seen and seen[-1] is True


def test_base_model_without_chat_template(tiny_model_dir, tmp_path, caplog):
    from align.models import CHATML_TEMPLATE, load_tokenizer

    base = tmp_path / "base"
    shutil.copytree(tiny_model_dir, base)
    (base / "chat_template.jinja").unlink()
    config = json.loads((base / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (base / "tokenizer_config.json").write_text(json.dumps(config))
    with caplog.at_level(logging.WARNING, logger="align.models"):
        assert load_tokenizer(str(base)).chat_template == CHATML_TEMPLATE
    assert "has no chat template; using ChatML" in caplog.text and "--chat_template" in caplog.text
    template = tmp_path / "t.jinja"
    template.write_text("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}")
    assert load_tokenizer(str(base), str(template)).chat_template == template.read_text()
    assert load_tokenizer(str(tiny_model_dir), "chatml").chat_template == CHATML_TEMPLATE
    with pytest.raises(ModelError, match="chat_template 'bogus' is not chatml"):
        load_tokenizer(str(base), "bogus")
    out = run("sft", base, tmp_path, tmp_path / "run", data=None)
    assert version(out)["metrics"]["global_step"] == 1


def test_wheel_ships_every_data_file_the_packages_read(tmp_path):
    """A pip-installed align finds its guidelines, the Rank tab's script and the nginx config (`align label
    --nginx`): every non-Python file inside the packages is in the wheel built from this tree."""
    import subprocess
    import sys
    import zipfile
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    tree = tmp_path / "tree"  # a copy: a build/ folder left in the checkout would ship stale files
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        if (root / name).exists():
            tree.mkdir(exist_ok=True)
            shutil.copy(root / name, tree / name)
    for package in ("align", "labeling"):
        shutil.copytree(root / package, tree / package, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path), str(tree)], check=True, capture_output=True)
    (wheel,) = tmp_path.glob("align-*.whl")
    shipped = set(zipfile.ZipFile(wheel).namelist())
    data = {path.relative_to(root).as_posix() for package in ("align", "labeling")
            for path in (root / package).rglob("*")
            if path.is_file() and path.suffix not in (".py", ".pyc") and "__pycache__" not in path.parts}
    assert "labeling/deploy/nginx.conf" in data
    assert data - shipped == set()


def test_make_setup_pins_every_declared_dependency_within_its_range():
    """`make setup` installs under constraints.txt (the versions the README was measured with): every dependency that
    pyproject.toml declares for it (core, test, postgres) is pinned there exactly, at a version its range admits, and
    torch is left to the Makefile's TORCH_SPEC or the user's own build."""
    import re
    from pathlib import Path

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    root = Path(__file__).resolve().parents[1]
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    pins = {}
    for line in (root / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version and re.fullmatch(r"[\w.+-]+", version), f"constraints.txt: {line!r} is not NAME==VERSION"
            pins[canonicalize_name(name)] = version
    declared = [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["test"]
                + project["optional-dependencies"]["postgres"]]
    for req in declared:
        name = canonicalize_name(req.name)
        if name == "torch":
            assert name not in pins
            continue
        assert name in pins, f"{req.name} is not pinned in constraints.txt"
        assert req.specifier.contains(pins[name], prereleases=True), f"{req.name}=={pins[name]} is outside {req}"
    assert "-c $(CONSTRAINTS)" in (root / "Makefile").read_text()
