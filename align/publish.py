"""Conventions TRL users expect: trackers (report_to), the Hub (push_to_hub / hub_model_id), chat templates.

Each check runs before training starts, so a missing package or an unreachable hub fails in a second with one
line that says what to do, not after an hour of training.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path
from typing import Any, Optional

from align.errors import ConfigError

log = logging.getLogger(__name__)

TRACKERS = {"wandb": "wandb", "trackio": "trackio"}  # report_to value -> the package (an optional extra)


def check_tracker(report_to: str) -> None:
    """wandb and trackio are optional extras: refuse before training when the package is missing."""
    package = TRACKERS.get(report_to)
    if package and importlib.util.find_spec(package) is None:
        raise ConfigError(f"report_to {report_to} needs the {package} package: pip install 'align[{report_to}]' "
                          "(or report_to tensorboard / none)")


class Tracker:
    """Scalars to wandb or trackio for the own DPO/reward loop (TRL's trainers use transformers' callbacks)."""

    def __init__(self, report_to: str, out: Path, config: Optional[dict] = None):
        check_tracker(report_to)
        self.kind = report_to
        project = os.environ.get("WANDB_PROJECT" if report_to == "wandb" else "TRACKIO_PROJECT", "align")
        if report_to == "wandb":
            import wandb

            self.run = wandb.init(project=project, name=out.resolve().name, dir=str(out), config=config or {},
                                  reinit="finish_previous")
        else:
            import trackio

            self.run = trackio.init(project=project, name=out.resolve().name, config=config or {})

    def log(self, scalars: dict[str, float], step: int) -> None:
        if self.kind == "wandb":
            self.run.log(scalars, step=step)
        else:
            import trackio

            trackio.log(scalars, step=step)

    def close(self) -> None:
        self.run.finish() if self.kind == "wandb" else __import__("trackio").finish()


def finish_tracker(report_to: str) -> None:
    """End the tracker run transformers' callback opened (wandb keeps it open past training)."""
    if report_to == "wandb" and importlib.util.find_spec("wandb") is not None:
        import wandb

        wandb.finish()


def hub_repo(train: Any) -> Optional[str]:
    """The hub repository a run pushes to (None: push_to_hub off); checked before training: token and network."""
    if not train.push_to_hub:
        if train.hub_model_id:
            log.warning("hub_model_id is set but push_to_hub is false: nothing will be uploaded")
        return None
    repo = train.hub_model_id or Path(train.output_dir).resolve().name
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    how = "train without push_to_hub and upload DIR later with `huggingface-cli upload REPO DIR`"
    if offline:
        raise ConfigError(f"push_to_hub to {repo}: HF_HUB_OFFLINE is set, so there is no hub to push to; {how}")
    from huggingface_hub import HfApi

    try:
        user = HfApi().whoami()
    except Exception as exc:  # noqa: BLE001 - no token, no network: one line, before any training
        text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(f"push_to_hub to {repo}: cannot reach the Hugging Face hub or no token ({text}); log in "
                          f"with `huggingface-cli login` where there is a network, or {how}") from None
    return repo if "/" in repo else f"{user['name']}/{repo}"


def push(out: Path, model_dir: Path, repo: str) -> str:
    """Upload the saved model, with the run's model card as its README; returns the repository URL."""
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo, exist_ok=True)
    card = out / "README.md"
    if card.is_file() and not (model_dir / "README.md").exists():
        (model_dir / "README.md").write_text(card.read_text())
    api.upload_folder(repo_id=repo, folder_path=str(model_dir), commit_message=f"align: {out.resolve().name}")
    url = f"https://huggingface.co/{repo}"
    log.info("pushed %s to %s", model_dir, url)
    return url
