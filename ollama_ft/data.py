"""Training data: read JSONL / JSON / CSV / Parquet files (or a hub dataset), detect the format,
check every record, and turn each into a list of chat messages.

Formats: `messages` (chat turns), `alpaca` (instruction/input/output), `text` (plain text). Every
record is checked before training starts; a bad one is reported with its file and line, or
skipped and counted when the recipe says `on_bad_record = "skip"`.

Files as editors and exporters write them are accepted: a UTF-8 byte-order mark at the start
(Windows Notepad, Excel's "CSV UTF-8"), CRLF line endings, and a message `content` given as a list
of OpenAI-style parts (`[{"type": "text", "text": ...}, ...]`). Text parts are joined with "\n",
as vLLM's OpenAI server joins them: an empty joiner would glue the last word of one part to the
first word of the next. Any other part (an image, audio, a file) stops the run with the record's
file:line, since ollama-ft trains text-only models.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from ollama_ft.errors import DataError

ROLES = ("system", "user", "assistant")


@dataclass
class Example:
    """One training example: chat messages, or plain text (messages empty)."""
    messages: list[dict[str, str]] = field(default_factory=list)
    text: str | None = None
    source: str = ""  # "file:line", for error messages


@dataclass
class LoadedData:
    train: list[Example]
    validation: list[Example]
    format: str
    skipped: int = 0
    skipped_reasons: dict[str, int] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        return {"format": self.format, "train_examples": len(self.train), "validation_examples": len(self.validation),
                "skipped": self.skipped, "skipped_reasons": self.skipped_reasons}


def _read_records(path: Path) -> Iterator[tuple[int, Any]]:
    """(line or row number, record) pairs; JSON errors become DataError with the position."""
    suffix = path.suffix.lower()
    try:
        if suffix == ".jsonl":
            with open(path, "rb") as fh:
                for number, raw in enumerate(fh, start=1):
                    try:
                        # "utf-8-sig" drops a byte-order mark, which can only stand at the very start.
                        line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
                    except UnicodeDecodeError as exc:
                        yield number, DataError(f"{path}:{number}: not valid UTF-8 (byte {exc.start})",
                                                "save the file as UTF-8")
                        continue
                    if not line.strip():
                        continue
                    try:
                        yield number, json.loads(line)
                    except json.JSONDecodeError as exc:
                        yield number, DataError(f"{path}:{number}: not valid JSON ({exc.msg} at column {exc.colno})",
                                                "each line of a .jsonl file must be one JSON object")
        elif suffix == ".json":
            data = json.loads(path.read_text(encoding="utf-8-sig"))
            if not isinstance(data, list):
                raise DataError(f"{path}: a .json data file must hold a list of records", "or use .jsonl")
            yield from enumerate(data, start=1)
        elif suffix in (".csv", ".parquet"):
            import pandas as pd  # a dependency of datasets; only needed for these formats

            if suffix == ".csv":
                frame = pd.read_csv(path, keep_default_na=False, encoding="utf-8-sig")
            else:
                frame = pd.read_parquet(path)
            for number, row in enumerate(frame.to_dict(orient="records"), start=2 if suffix == ".csv" else 1):
                if suffix == ".csv":
                    # A quoted cell of a CRLF file keeps its "\r\n"s: they are the file's line endings, not text.
                    row = {k: v.replace("\r\n", "\n") if isinstance(v, str) else v for k, v in row.items()}
                yield number, row
        else:
            raise DataError(f"{path}: unsupported data file type {suffix!r}", "use .jsonl, .json, .csv or .parquet")
    except UnicodeDecodeError:
        raise DataError(f"{path}: not valid UTF-8", "save the file as UTF-8") from None
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from None


def detect_format(record: Any) -> str | None:
    if not isinstance(record, dict):
        return None
    if "messages" in record or "conversations" in record:
        return "messages"
    if "instruction" in record and "output" in record:
        return "alpaca"
    if "text" in record:
        return "text"
    return None


def _as_text(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{what} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise ValueError(f"{what} is empty")
    return value


def to_example(record: Any, fmt: str, source: str, system_prompt: str | None) -> Example:
    """Convert one record; raise ValueError with a reason when it does not fit `fmt`."""
    if not isinstance(record, dict):
        raise ValueError(f"a record must be an object, got {type(record).__name__}")
    if fmt == "text":
        return Example(text=_as_text(record.get("text"), "'text'"), source=source)
    if fmt == "alpaca":
        instruction = _as_text(record.get("instruction"), "'instruction'")
        extra = record.get("input") or ""
        if not isinstance(extra, str):
            raise ValueError("'input' must be a string")
        user = instruction + ("\n\n" + extra if extra.strip() else "")
        messages = [{"role": "user", "content": user},
                    {"role": "assistant", "content": _as_text(record.get("output"), "'output'")}]
    else:
        raw = record.get("messages", record.get("conversations"))
        if not isinstance(raw, list) or not raw:
            raise ValueError("'messages' must be a non-empty list")
        messages = []
        for i, message in enumerate(raw):
            if not isinstance(message, dict):
                raise ValueError(f"messages[{i}] must be an object")
            # ShareGPT-style {"from": "human", "value": ...} is common enough to accept.
            role = message.get("role", {"human": "user", "gpt": "assistant"}.get(message.get("from"), message.get("from")))
            if role not in ROLES:
                raise ValueError(f"messages[{i}].role = {role!r}; use one of {', '.join(ROLES)}")
            content = message.get("content", message.get("value"))
            if isinstance(content, list):
                content = _join_text_parts(content, f"messages[{i}].content")
            content = _as_text(content, f"messages[{i}].content")
            messages.append({"role": role, "content": content})
        _check_order(messages)
    if system_prompt and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system_prompt}, *messages]
    return Example(messages=messages, source=source)


class NotTextPart(ValueError):
    """A content part ollama-ft cannot train on; carries its own fix for the one-line error."""

    fix = ("ollama-ft trains text-only models: keep only {\"type\": \"text\"} parts in the record, "
           "or set data.on_bad_record = \"skip\" to leave such records out")


def _join_text_parts(parts: list[Any], what: str) -> str:
    """OpenAI-style content parts -> one string: the text parts joined with "\n" (see the top)."""
    texts = []
    for j, part in enumerate(parts):
        if not isinstance(part, dict):
            raise ValueError(f"{what}[{j}] must be an object such as {{\"type\": \"text\", \"text\": ...}}, "
                             f"got {type(part).__name__}")
        if part.get("type") != "text":
            raise NotTextPart(f"{what}[{j}] has type {part.get('type')!r}, not 'text'")
        texts.append(_as_text(part.get("text"), f"{what}[{j}].text"))
    if not texts:
        raise ValueError(f"{what} is an empty list of parts")
    return "\n".join(texts)


def _check_order(messages: list[dict[str, str]]) -> None:
    """system? then user/assistant alternating, ending with an assistant answer."""
    turns = messages[1:] if messages[0]["role"] == "system" else messages
    if not turns:
        raise ValueError("only a system message; add a user turn and an assistant answer")
    for i, message in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if message["role"] != expected:
            raise ValueError(f"roles out of order: turn {i + 1} is {message['role']!r}, expected {expected!r} "
                             "(system first, then user and assistant alternating)")
    if turns[-1]["role"] != "assistant":
        raise ValueError("the last turn must be the assistant's answer")


def _hub_records(dataset_id: str, split: str = "train") -> Iterator[tuple[int, Any]]:
    """Records of a hub dataset (`org/name`, optionally `org/name:split`), numbered from 1."""
    try:
        from datasets import load_dataset
    except ImportError:
        raise DataError("hub datasets need the `datasets` package", "pip install datasets") from None
    name, _, wanted = dataset_id.partition(":")
    try:
        dataset = load_dataset(name, split=wanted or split)
    except Exception as exc:  # offline, unknown id, gated: all one answer for the user
        raise DataError(f"data.train: cannot load hub dataset {dataset_id!r} ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0][:160]})",
                        "check the id and your network, or download it and give a local .jsonl/.parquet") from None
    yield from enumerate(dataset, start=1)


def load_examples(paths: list[Path | str], fmt: str, *, system_prompt: str | None, on_bad_record: str,
                  max_examples: int | None = None) -> tuple[list[Example], str, int, dict[str, int]]:
    examples: list[Example] = []
    skipped, reasons = 0, {}
    detected = None if fmt == "auto" else fmt
    for path in paths:
        records = _read_records(path) if isinstance(path, Path) else _hub_records(path)
        for number, record in records:
            source = f"{path}:{number}"
            try:
                if isinstance(record, DataError):
                    raise record
                if detected is None:
                    detected = detect_format(record)
                    if detected is None:
                        raise DataError(f"{source}: cannot tell the data format from the first record",
                                        "records need 'messages', 'instruction'+'output', or 'text'; "
                                        "or set data.format")
                examples.append(to_example(record, detected, source, system_prompt))
            except (ValueError, DataError) as exc:
                if on_bad_record == "error":
                    if isinstance(exc, DataError):
                        raise
                    fix = getattr(exc, "fix", "fix the record, or set data.on_bad_record = \"skip\"")
                    raise DataError(f"{source}: {exc}", fix) from None
                skipped += 1
                reason = str(exc).split(":")[0] if isinstance(exc, ValueError) else "unreadable line"
                reasons[reason] = reasons.get(reason, 0) + 1
            if max_examples and len(examples) >= max_examples:
                break
    return examples, detected or "messages", skipped, reasons


def load_data(recipe) -> LoadedData:
    """Load and check the recipe's training (and validation) data."""
    d = recipe.data
    paths: list[Path | str] = []
    for value in d.train:
        path = recipe.resolve(value)
        if path.is_file():
            paths.append(path)
        elif "/" in value and not value.startswith((".", "/", "~")) and not path.suffix:
            paths.append(value)  # a hub dataset id such as "org/name" or "org/name:split"
        else:
            raise DataError(f"data.train: {value!r} is not a file ({path})",
                            "give a local .jsonl/.json/.csv/.parquet, or a hub dataset id like org/name")
    train, fmt, skipped, reasons = load_examples(paths, d.format, system_prompt=d.system_prompt,
                                                 on_bad_record=d.on_bad_record, max_examples=d.max_examples)
    if not train:
        raise DataError(f"data.train: no usable examples in {', '.join(map(str, paths))}"
                        + (f" ({skipped} skipped as bad)" if skipped else ""), "add records to the file")
    validation: list[Example] = []
    if d.validation:
        validation, _, _, _ = load_examples([recipe.resolve(d.validation)], fmt, system_prompt=d.system_prompt,
                                            on_bad_record=d.on_bad_record)
    elif d.validation_split > 0:
        # Hold out a seeded random subset; the remaining order stays as in the file.
        rng = random.Random(recipe.train.seed)
        count = max(1, int(len(train) * d.validation_split))
        held = set(rng.sample(range(len(train)), count))
        validation = [e for i, e in enumerate(train) if i in held]
        train = [e for i, e in enumerate(train) if i not in held]
    return LoadedData(train=train, validation=validation, format=fmt, skipped=skipped, skipped_reasons=reasons)
