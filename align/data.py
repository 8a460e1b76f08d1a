"""The one way data comes in: files, globs, `save_to_disk` folders or hub datasets, read through `datasets`
(memory-mapped Arrow), recognised once, validated into the rows every method uses; tokenisation of chats.

Every refusal names the file (or dataset) and the 1-based row (for JSON Lines files, the line), so a bad row in a
100k-row file is found at once.
"""

from __future__ import annotations

import csv
import glob
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Optional, Sequence

from align.errors import AlignError, DataError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")
# A text longer than this many characters per token of max_length is cut before tokenising: it would be truncated
# anyway, and tokenising a 50 MB line whole costs gigabytes. No tokenizer here averages 32 characters a token.
CHARS_PER_TOKEN = 32
BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".arrow": "arrow"}


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, row) for each non-blank line; a malformed line raises DataError naming the file, the 1-based
    line and, where there is one, the column."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            row = parse_json_line(raw, f"{path}:{lineno}")
            if row is not None:
                yield lineno, row


def parse_json_line(raw: bytes, where: str) -> Optional[dict[str, Any]]:
    """One JSON Lines line as an object (None when blank), or DataError naming `where` and the column."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        column = len(raw[: exc.start].decode("utf-8", errors="replace")) + 1
        raise DataError(f"{where}: not valid UTF-8 (byte 0x{raw[exc.start]:02x} at column {column})") from None
    text = line.rstrip("\r\n")
    if not text.strip():
        return None
    try:
        row = json.loads(text)
    except json.JSONDecodeError as exc:
        end = len(text.rstrip())
        cut = f"; the line ends at column {end} before the JSON does: truncated?" if exc.pos >= end or \
            exc.msg.startswith("Unterminated") else ""
        raise DataError(f"{where}: malformed JSON ({exc.msg.removesuffix(' at')} at column {exc.colno}{cut})") \
            from None
    except RecursionError:
        raise DataError(f"{where}: JSON nested too deeply to read (thousands of levels)") from None
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    return row


def read_jsonl(path: str | Path, required: Iterable[str] = ()) -> list[dict[str, Any]]:
    """Rows of a JSONL file; a malformed line or a missing column raises DataError naming it."""
    required = tuple(required)
    rows = []
    for lineno, row in iter_jsonl(path):
        missing = [key for key in required if key not in row]
        if missing:
            raise DataError(f"{path}:{lineno}: missing column(s) {', '.join(missing)}")
        rows.append(row)
    if not rows:
        raise DataError(f"{path}: no rows (the file is empty)")
    return rows


def write_jsonl(rows: Iterable[dict[str, Any]], path: str | Path, sort_keys: bool = False) -> Path:
    """Write one JSON object per line, atomically: readers see the old file or the whole new one."""
    return write_atomically(path, (json.dumps(row, ensure_ascii=False, sort_keys=sort_keys, default=str) + "\n"
                                   for row in rows))


def write_atomically(path: str | Path, pieces: Iterable[str]) -> Path:
    """Write text to `path` so that readers see the old file or the whole new one (a temporary file renamed over
    it). Only a regular file or a new path is replaced that way: a symlink's target is written (the link stays),
    and a device, FIFO or socket (`/dev/stdout`, `/dev/full`) is written into directly, never replaced by a file.
    Any OS error becomes one line naming the path."""
    path = Path(path)
    target = Path(os.path.realpath(path))
    try:
        if target.is_dir():
            raise AlignError(f"cannot write {path}: it is a directory")
        if target.exists() and not target.is_file():
            with open(target, "w", encoding="utf-8") as f:
                f.writelines(pieces)
            return path
        target.parent.mkdir(parents=True, exist_ok=True)
        handle = tempfile.NamedTemporaryFile(
            "w", dir=target.parent, prefix=f".{target.name}.", suffix=".tmp", delete=False, encoding="utf-8")
        try:
            with handle:
                handle.writelines(pieces)
                handle.flush()
                os.fsync(handle.fileno())
            if target.exists():
                shutil.copymode(target, handle.name)  # a replaced file keeps its permissions
            else:
                os.chmod(handle.name, 0o666 & ~current_umask())  # a new file gets open()'s mode, not mkstemp's 0600
            os.replace(handle.name, target)
        except BaseException:
            Path(handle.name).unlink(missing_ok=True)
            raise
    except OSError as exc:
        raise AlignError(f"cannot write {path}: {exc.strerror or exc}") from None
    return path


def current_umask() -> int:
    """The process umask (reading it means setting it; set straight back)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def files_sha256(*paths: Optional[str | Path]) -> str:
    """One hash over the contents of data files: the data snapshot a run trained on (read in blocks)."""
    digest = hashlib.sha256()
    for p in paths:
        if p is not None and Path(p).is_file():
            with open(p, "rb") as f:
                while block := f.read(1 << 20):
                    digest.update(block)
    return digest.hexdigest()[:16]


# --- the entry point: any file, glob, save_to_disk folder or hub dataset, through `datasets` -----------------------


@dataclass
class Source:
    """The rows of one input as read: a memory-mapped `datasets.Dataset` (a list only for a JSON Lines file whose
    columns mix types, e.g. a prompt that is text in one row and messages in another, which Arrow cannot hold)."""

    name: str  # what the user passed: a path, glob, folder or hub id
    rows: Any  # a datasets.Dataset or a list of dicts
    files: tuple[str, ...] = ()  # the local files read (for line numbers and the data hash)
    fingerprint: Optional[str] = None  # a hub or save_to_disk dataset's own fingerprint
    _lines: Optional[list[int]] = field(default=None, repr=False)
    textual: bool = False  # a CSV file: every cell is text (see csv_values)

    @property
    def columns(self) -> list[str]:
        if isinstance(self.rows, list):
            return list(dict.fromkeys(k for row in self.rows for k in row))
        return list(self.rows.column_names)

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for row in self.rows:
            yield csv_values(row) if self.textual else {k: _plain(v) for k, v in row.items()}

    def take(self, limit: Optional[int]) -> "Source":
        if not limit or limit >= len(self.rows):
            return self
        rows = self.rows[:limit] if isinstance(self.rows, list) else self.rows.select(range(limit))
        return Source(self.name, rows, self.files, self.fingerprint, self._lines, self.textual)

    def where(self, index: int) -> str:
        """'FILE:LINE' for a JSON Lines file (what an editor jumps to), else 'NAME: row N', 1-based."""
        if len(self.files) == 1 and _is_json_lines(self.files[0]):
            if self._lines is None:
                self._lines = _line_numbers(Path(self.files[0]))
            if index < len(self._lines):
                return f"{self.files[0]}:{self._lines[index]}"
        return f"{self.name}: row {index + 1}"

    def rename(self, mapping: dict[str, str]) -> "Source":
        """`--columns prompt=question,...`: the user's column names mapped onto the ones align recognises."""
        if not mapping:
            return self
        have = self.columns
        missing = [src for src in mapping.values() if src not in have]
        if missing:
            raise DataError(f"{self.name}: --columns names {', '.join(map(repr, missing))}, not a column here "
                            f"(columns: {', '.join(have)})")
        renames = {src: dst for dst, src in mapping.items() if src != dst}
        clash = [dst for dst in renames.values() if dst in have and dst not in renames]
        if clash:
            raise DataError(f"{self.name}: --columns maps onto {', '.join(clash)}, which is already a column; "
                            "map that one elsewhere too or drop it from --columns")
        if isinstance(self.rows, list):
            rows = [{renames.get(k, k): v for k, v in row.items()} for row in self.rows]
        else:
            rows = self.rows.rename_columns(renames)
        return Source(self.name, rows, self.files, self.fingerprint, self._lines, self.textual)

    def data_hash(self) -> str:
        return files_sha256(*self.files) if self.files else (self.fingerprint or "unknown")[:16]


def parse_columns(spec: Optional[str]) -> dict[str, str]:
    """'prompt=question,chosen=good' -> {"prompt": "question", "chosen": "good"} (align's name = the data's)."""
    mapping: dict[str, str] = {}
    for item in (spec or "").split(","):
        if not item.strip():
            continue
        ours, _, theirs = item.partition("=")
        if not ours.strip() or not theirs.strip():
            raise DataError(f"--columns: {item!r} is not NAME=COLUMN (e.g. prompt=question,chosen=good,rejected=bad)")
        mapping[ours.strip()] = theirs.strip()
    return mapping


def _plain(value: Any) -> Any:
    """Arrow gives every struct the union of the keys seen in its column (None where a row lacks one): drop them,
    so a message or a per-version map reads back as it was written."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _is_json_lines(path: str) -> bool:
    if Path(path).suffix == ".jsonl":
        return True
    with open(path, "rb") as f:
        return f.read(64).lstrip()[:1] == b"{"


def _line_numbers(path: Path) -> list[int]:
    """Line number of each non-blank line (a JSON Lines reader skips blank lines, so row i is on numbers[i])."""
    with path.open("rb") as f:
        return [n for n, line in enumerate(f, start=1) if line.strip()]


def _quiet_datasets() -> Any:
    import datasets

    datasets.disable_progress_bars()
    datasets.utils.logging.set_verbosity_error()
    return datasets


def open_source(spec: str, split: Optional[str] = None, *, config: Optional[str] = None,
                revision: Optional[str] = None, hub: bool = False) -> Source:
    """Open one input: a JSON / JSON Lines / CSV / Parquet file or glob, a folder of such files, a `save_to_disk`
    folder, or (hub=True, a name that is not a local path) a Hugging Face hub dataset. `split` picks a split or
    slice ("train", "test[:500]") of a hub or save_to_disk dataset."""
    datasets = _quiet_datasets()
    path = Path(spec).expanduser()
    if hub and not path.exists():
        return _open_hub(spec, config, split or "train", revision)
    if path.is_dir():
        if any((path / marker).is_file() for marker in ("dataset_info.json", "dataset_dict.json", "state.json")):
            try:
                loaded = datasets.load_from_disk(str(path))
            except Exception as exc:  # noqa: BLE001 - any failure is the folder's: one line naming it
                raise DataError(f"{spec}: cannot read the save_to_disk folder ({_first_line(exc)})") from None
            if isinstance(loaded, datasets.DatasetDict):
                loaded = _pick_split(loaded, split or "train", spec)
            elif split and split != "train":
                loaded = _pick_split(datasets.DatasetDict({"train": loaded}), split, spec)
            return _nonempty(Source(spec, loaded, fingerprint=loaded._fingerprint))
        files = sorted(p for p in path.rglob("*") if p.suffix in BUILDERS and not p.name.startswith("."))
        if not files:
            raise DataError(f"{spec}: a folder with neither a save_to_disk dataset nor data files "
                            f"({', '.join(sorted(BUILDERS))})")
    elif glob.has_magic(spec):
        files = sorted(Path(p) for p in glob.glob(str(path)) if Path(p).is_file())
        if not files:
            raise DataError(f"data file not found: no file matches {spec}")
    else:
        if not path.is_file():
            raise DataError(f"data file not found: {spec}")
        files = [path]
    kinds = {BUILDERS.get(f.suffix) for f in files}
    if None in kinds:
        odd = next(f for f in files if f.suffix not in BUILDERS)
        raise DataError(f"{odd}: cannot tell the format from the extension {odd.suffix!r}; use "
                        f"{', '.join(sorted(BUILDERS))}, or a save_to_disk folder")
    if len(kinds) > 1:
        raise DataError(f"{spec}: mixes file formats ({', '.join(sorted(f.suffix for f in set(files)))}); use one")
    return _load_files(spec, kinds.pop(), files)


def _load_files(spec: str, builder: str, files: list[Path]) -> Source:
    datasets = _quiet_datasets()
    names = tuple(str(f) for f in files)
    kwargs: dict[str, Any] = {}
    if builder == "csv":
        # Every CSV cell is text ("98" stays the answer "98", not the number 98); csv_values converts the numeric and
        # boolean columns align knows, and an empty cell is no value.
        with open(files[0], newline="", encoding="utf-8") as f:
            header = next(csv.reader(f), [])
        kwargs = {"features": datasets.Features({c: datasets.Value("string") for c in header}),
                  "keep_default_na": False}
    if builder == "json" and not all(_is_json_lines(n) for n in names):
        return _load_json_arrays(spec, names)
    try:
        with _no_pandas_json():
            loaded = datasets.load_dataset(builder, data_files=list(names), split="train", **kwargs)
        if builder == "json":
            loaded.data.table.validate(full=True)  # Arrow loads invalid UTF-8 and fails only when a row is read
    except Exception as exc:  # noqa: BLE001 - Arrow's errors name neither file nor line: find them ourselves
        if builder != "json":
            raise DataError(f"{spec}: cannot read as {builder} ({_first_line(exc)})") from None
        loaded, reason = None, _first_line(exc)
    else:
        # datasets keeps a column of mixed types as its `Json` feature, whose decoding turns the text "98" into the
        # number 98: such files are read row by row instead.
        reason = "columns of mixed types" if "Json(" in repr(loaded.features) else None
    if reason is not None:
        rows = [row for name in names for _, row in iter_jsonl(name)]  # names a malformed line
        log.debug("%s: read without Arrow (%s)", spec, reason)
        return _nonempty(Source(spec, rows, names))
    return _nonempty(Source(spec, loaded, names, textual=builder == "csv"))


def _load_json_arrays(spec: str, names: tuple[str, ...]) -> Source:
    """.json files holding one array of objects (small by nature: big data comes as JSON Lines)."""
    rows: list[dict[str, Any]] = []
    for name in names:
        if _is_json_lines(name):
            rows += [row for _, row in iter_jsonl(name)]
            continue
        try:
            data = json.loads(Path(name).read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise DataError(f"{name}:{exc.lineno}: malformed JSON ({exc.msg} at column {exc.colno})") from None
        if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
            raise DataError(f"{name}: expected JSON Lines or one JSON array of objects")
        rows += data
    return _nonempty(Source(spec, rows, names))


@contextmanager
def _no_pandas_json() -> Iterator[None]:
    """datasets' JSON loader falls back to pandas when Arrow cannot type a column, and pandas turns the answer "98"
    into the number 98: refuse that fallback (we read such files row by row instead)."""
    import importlib

    json_builder = importlib.import_module("datasets.packaged_modules.json.json")

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise ValueError("columns of mixed types")

    original = json_builder.pandas_read_json
    json_builder.pandas_read_json = refuse
    try:
        yield
    finally:
        json_builder.pandas_read_json = original


NUMERIC_COLUMNS = ("margin", "weight", "label_agreement", "score_chosen", "score_rejected", "gen_chosen_logps",
                   "gen_rejected_logps", "n_votes")


def csv_values(row: dict[str, Any]) -> dict[str, Any]:
    """A CSV row (all text) with align's numeric columns as numbers and `label` true/false as a boolean; an empty
    cell is no value. Anything else stays text, so validation refuses it naming the row."""
    out: dict[str, Any] = {}
    for key, value in row.items():
        if value == "" and key != "text":
            value = None
        elif key in NUMERIC_COLUMNS:
            try:
                value = float(value)
            except ValueError:
                pass
        elif key == "label" and value.strip().lower() in ("true", "false"):
            value = value.strip().lower() == "true"
        out[key] = value
    return out


def _nonempty(source: Source) -> Source:
    if len(source) == 0:
        raise DataError(f"{source.name}: no rows (the file is empty)")
    return source


def _open_hub(name: str, config: Optional[str], split: str, revision: Optional[str]) -> Source:
    datasets = _quiet_datasets()
    local_copy = ("pass a local copy instead: --train_file PATH (a .jsonl/.json/.csv/.parquet file or glob, or a "
                  "folder written by datasets' save_to_disk on a machine with a network)")
    offline = any(os.environ.get(k, "").lower() in ("1", "true", "yes", "on")
                  for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
    try:
        loaded = datasets.load_dataset(name, config, split=split, revision=revision)
    except Exception as exc:  # noqa: BLE001 - one line, never a traceback
        text = _first_line(exc)
        if offline or any(w in text.lower() for w in ("offline", "connect", "network", "resolve", "reach", "timed out")):
            raise DataError(f"dataset {name!r}: no network to reach the Hugging Face hub here; {local_copy}") from None
        raise DataError(f"dataset {name!r} (config {config}, split {split!r}): {text}; {local_copy}") from None
    if isinstance(loaded, datasets.DatasetDict):
        loaded = _pick_split(loaded, split, name)
    return _nonempty(Source(name, loaded, fingerprint=loaded._fingerprint))


def _pick_split(dsd: Any, split: str, name: str) -> Any:
    """'train', 'test[:500]' or 'train[100:]' of a DatasetDict."""
    match = re.fullmatch(r"\s*([\w.-]+)\s*(?:\[\s*(-?\d*)\s*:\s*(-?\d*)\s*\])?\s*", split)
    if not match:
        raise DataError(f"{name}: split {split!r} is not NAME or NAME[start:end]")
    key, start, end = match.groups()
    if key not in dsd:
        raise DataError(f"{name}: no split {key!r} (splits: {', '.join(dsd)})")
    ds = dsd[key]
    if start or end:
        ds = ds.select(range(len(ds))[slice(int(start) if start else None, int(end) if end else None)])
    return ds


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def open_split(args: Any, which: str) -> Optional[Source]:
    """The training (which="train") or held-out set a data config names: `dataset_name` (a hub id or local
    dataset, with dataset_config / dataset_split / dataset_eval_split / dataset_revision), else train_file /
    eval_file. None: no held-out set. `--columns` is applied."""
    columns = parse_columns(getattr(args, "columns", None))
    if getattr(args, "dataset_name", None):
        split = args.dataset_split if which == "train" else args.dataset_eval_split
        if split is None:
            return None
        source = open_source(args.dataset_name, split, config=args.dataset_config, revision=args.dataset_revision,
                             hub=True)
    else:
        path = args.train_file if which == "train" else args.eval_file
        if path is None:
            return None
        source = open_source(path)
    return source.rename(columns)


def data_record(args: Any, train_set: Any, eval_set: Any = None, counts: Optional[dict] = None) -> dict[str, Any]:
    """What a run read, for version.json["data"] and the model card: the detected format, rows read and dropped
    (and why), a hash of the data, the hub dataset when there is one."""
    record = {"format": train_set.format, "described": train_set.describe(), "source": train_set.name,
              "rows_read": train_set.n_read, "dropped": dict(train_set.dropped), **(counts or {}),
              "hash": train_set.data_hash if eval_set is None else
              hashlib.sha256(f"{train_set.data_hash}+{eval_set.data_hash}".encode()).hexdigest()[:16]}
    name = getattr(args, "dataset_name", None)
    if name and not Path(name).expanduser().exists():
        record["hub_dataset"] = name
    return record


# --- SFT rows: every common format becomes messages (or plain text) ----------------------------------------------

SFT_FORMATS = {
    "messages": "conversations (messages)",
    "conversations": "conversations (conversations: role/content)",
    "sharegpt": "ShareGPT conversations (from/value, human/gpt)",
    "prompt-completion": "prompt-completion rows",
    "unpaired": "unpaired rows (prompt, completion, boolean label; label true trained on)",
    "alpaca": "Alpaca instructions (instruction/input/output)",
    "text": "plain text (loss on every token, no chat template applied)",
}
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


@dataclass
class SFTSet:
    """Validated SFT rows: each {"where", "messages"} or {"where", "text"}; `dropped` counts rows left out."""

    name: str
    format: str
    rows: list[dict[str, Any]]
    n_read: int
    dropped: dict[str, int] = field(default_factory=dict)
    data_hash: str = ""

    def describe(self) -> str:
        return f"read {self.n_read:,} rows of {self.name} as {SFT_FORMATS[self.format]}"


def sft_format(source: Source) -> str:
    cols = set(source.columns)
    if "messages" in cols:
        return "messages"
    if "conversations" in cols:
        first = next(iter(source))["conversations"]
        turn = first[0] if isinstance(first, list) and first and isinstance(first[0], dict) else {}
        return "sharegpt" if "from" in turn else "conversations"
    if {"prompt", "completion"} <= cols:
        return "unpaired" if "label" in cols else "prompt-completion"
    if {"instruction", "output"} <= cols:
        return "alpaca"
    if "text" in cols:
        return "text"
    raise DataError(f"{source.name}: cannot tell the SFT format from the columns {', '.join(source.columns)}; "
                    "align reads messages, prompt/completion, text, ShareGPT conversations (from/value) and Alpaca "
                    "(instruction/input/output); map other names with --columns, e.g. --columns prompt=question,"
                    "completion=answer")


def check_messages(messages: Any, where: str, column: str = "messages") -> list[dict[str, str]]:
    """A list of {role, content} with known roles; refusals name the row and the message."""
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: '{column}' must be a non-empty list of {{role, content}} objects")
    out = []
    for i, message in enumerate(messages, start=1):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise DataError(f"{where}: message {i} of '{column}' must be an object with 'role' and 'content'")
        if message["role"] not in ROLES:
            raise DataError(f"{where}: message {i} of '{column}' has role {message['role']!r}; expected one of "
                            f"{', '.join(ROLES)} (map other names in your data before training)")
        if not isinstance(message["content"], str):
            raise DataError(f"{where}: message {i} of '{column}': content must be a string")
        out.append({"role": message["role"], "content": message["content"]})
    return out


def validate_messages(messages: Any, where: str) -> list[dict[str, str]]:
    """Check one conversation: a list of {role, content}, ending with a non-empty assistant turn."""
    messages = check_messages(messages, where)
    last = messages[-1]
    if last["role"] != "assistant" or not last["content"].strip():
        raise DataError(f"{where}: the last message must be a non-empty assistant response")
    return messages


def _text(value: Any, column: str, where: str) -> str:
    if not isinstance(value, str):
        raise DataError(f"{where}: '{column}' must be a string, got {type(value).__name__}")
    return value


def sft_messages(fmt: str, row: dict[str, Any], where: str) -> Optional[dict[str, Any]]:
    """One row -> {"messages"} or {"text"}; None for a row left out (a false label)."""
    if fmt == "text":
        return {"text": _text(row["text"], "text", where)}
    if fmt in ("messages", "conversations"):
        return {"messages": check_messages(row[fmt], where, fmt)}
    if fmt == "sharegpt":
        turns = row["conversations"]
        if not isinstance(turns, list) or not turns:
            raise DataError(f"{where}: 'conversations' must be a non-empty list of {{from, value}} turns")
        messages = []
        for i, turn in enumerate(turns):
            if not isinstance(turn, dict) or turn.get("from") not in SHAREGPT_ROLES:
                who = turn.get("from") if isinstance(turn, dict) else turn
                raise DataError(f"{where}: conversations turn {i} is from {who!r}; expected one of "
                                f"{', '.join(SHAREGPT_ROLES)}")
            messages.append({"role": SHAREGPT_ROLES[turn["from"]], "content": _text(turn.get("value"), "value", where)})
        return {"messages": messages}
    if fmt == "alpaca":
        instruction = _text(row["instruction"], "instruction", where)
        extra = row.get("input") or ""
        user = f"{instruction}\n\n{_text(extra, 'input', where)}" if extra.strip() else instruction
        return {"messages": [{"role": "user", "content": user},
                             {"role": "assistant", "content": _text(row["output"], "output", where)}]}
    if fmt == "unpaired":
        label = row["label"]
        if not isinstance(label, bool):
            raise DataError(f"{where}: label {label!r} must be true or false (true: a good completion, trained on; "
                            "false: a bad one, left out)")
        if not label:
            return None
    prompt, completion = row["prompt"], row["completion"]
    prompt = check_messages(prompt, where, "prompt") if isinstance(prompt, list) else as_messages(
        _text(prompt, "prompt", where))
    if isinstance(completion, list):
        completion = check_messages(completion, where, "completion")
    else:
        completion = [{"role": "assistant", "content": _text(completion, "completion", where)}]
    return {"messages": prompt + completion}


def cap_text(text: str, max_chars: Optional[int]) -> str:
    return text if max_chars is None or len(text) <= max_chars else text[:max_chars]


def load_sft(source: Source, limit: Optional[int] = None, max_length: Optional[int] = None) -> SFTSet:
    """Recognise, convert and validate SFT rows. Rows whose response is empty are dropped and counted; texts
    longer than CHARS_PER_TOKEN x max_length characters are cut before tokenising (they are truncated anyway)."""
    source = source.take(limit)
    fmt = sft_format(source)
    max_chars = None if max_length is None else max_length * CHARS_PER_TOKEN
    rows, dropped = [], {"empty_responses": 0, "false_labels": 0}
    for i, raw in enumerate(source):
        where = source.where(i)
        row = sft_messages(fmt, raw, where)
        if row is None:
            dropped["false_labels"] += 1
            continue
        if "text" in row:
            if not row["text"].strip():
                dropped["empty_responses"] += 1
                continue
            row["text"] = cap_text(row["text"], max_chars)
        else:
            messages = row["messages"]
            if messages[-1]["role"] != "assistant":
                raise DataError(f"{where}: the last message must be an assistant response (the one trained on)")
            if not messages[-1]["content"].strip():
                dropped["empty_responses"] += 1
                continue
            row["messages"] = [dict(m, content=cap_text(m["content"], max_chars)) for m in messages]
        rows.append({"where": where, **row})
    dropped = {k: v for k, v in dropped.items() if v}
    result = SFTSet(source.name, fmt, rows, len(source), dropped, source.data_hash())
    log.info("%s", result.describe())
    if dropped:
        log.warning("%s: left out %s", source.name, ", ".join(f"{v} row(s) with {k.replace('_', ' ')}"
                                                              for k, v in dropped.items()))
    if not rows:
        raise DataError(f"{source.name}: no rows left to train on ({', '.join(f'{k}: {v}' for k, v in dropped.items())})")
    return result


def load_chat_file(path: str | Path, limit: Optional[int] = None) -> list[list[dict[str, str]]]:
    """Conversations of an SFT input (any format load_sft reads), validated."""
    return [row["messages"] for row in load_sft(open_source(str(path)), limit).rows if "messages" in row]


# --- chat templates: applied once, never twice ---------------------------------------------------------------------


def template_markers(tokenizer: "PreTrainedTokenizerBase") -> list[str]:
    """The special tokens the chat template writes (e.g. <|im_start|>): text holding one is already templated."""
    template = tokenizer.chat_template or ""
    return [t for t in tokenizer.all_special_tokens if t and t != tokenizer.pad_token and t in template]


def refuse_templated(text: str, markers: Sequence[str], where: str, column: str) -> None:
    found = next((m for m in markers if m in text), None)
    if found is not None:
        raise DataError(f"{where}: '{column}' already holds the chat-template marker {found!r}; align applies the "
                        "template itself and would apply it twice: pass the plain text (or the conversation as "
                        "messages), or put pre-templated text in a 'text' column for SFT, which is used as-is")


def tokenize_chat(
    messages: list[dict[str, str]], tokenizer: "PreTrainedTokenizerBase", max_length: int
) -> dict[str, list[int]]:
    """Token ids of a conversation and a mask that is 1 on assistant tokens (the ones we train on).

    Works with any chat template, with or without `{% generation %}` markers: each assistant turn's
    tokens are found by rendering the conversation up to the turn's generation prompt, then through
    the turn. This needs the template to be prefix-stable (true of ChatML, Llama 3, Qwen, ...), and
    checks it rather than assuming it.
    """
    ids = _render(tokenizer, messages, add_generation_prompt=False)
    mask = [0] * len(ids)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = len(_render(tokenizer, messages[:i], add_generation_prompt=True)) if i else 0
        through = _render(tokenizer, messages[: i + 1], add_generation_prompt=False)
        end = len(through)
        if ids[:end] != through or start > end:
            raise DataError("the chat template is not prefix-stable; cannot locate assistant tokens")
        mask[start:end] = [1] * (end - start)
    ids, mask = ids[:max_length], mask[:max_length]
    return {"input_ids": ids, "assistant_masks": mask}


def _render(tokenizer: "PreTrainedTokenizerBase", messages: list[dict[str, str]], add_generation_prompt: bool) -> list[int]:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def prompt_ids(tokenizer: "PreTrainedTokenizerBase", messages: list[dict[str, str]]) -> list[int]:
    """Token ids of a prompt rendered with the generation prompt: what the model continues from."""
    return _render(tokenizer, messages, add_generation_prompt=True)


def as_messages(prompt: str | list[dict[str, str]]) -> list[dict[str, str]]:
    """A prompt given as text or as chat messages, as chat messages."""
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


def tokenize_sft_row(row: dict[str, Any], tokenizer: "PreTrainedTokenizerBase", max_length: int,
                     markers: Sequence[str]) -> dict[str, list[int]]:
    """A load_sft row -> input_ids and assistant_masks. Messages get the chat template once (a message that already
    holds its markers is refused); plain text is used as-is, every token trained on, eos appended."""
    if "text" in row:
        ids = tokenizer(row["text"], add_special_tokens=False)["input_ids"]
        if tokenizer.eos_token_id is not None and ids[-1:] != [tokenizer.eos_token_id]:
            ids.append(tokenizer.eos_token_id)
        ids = ids[:max_length]
        return {"input_ids": ids, "assistant_masks": [1] * len(ids)}
    for i, message in enumerate(row["messages"], start=1):
        refuse_templated(message["content"], markers, row["where"], f"{message['role']} message {i}")
    return tokenize_chat(row["messages"], tokenizer, max_length)
