"""Validate, clean, score and split a tenant's chat data.

Accepted line formats (JSON Lines, UTF-8):

* OpenAI chat: ``{"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}``
* prompt/completion pairs: ``{"prompt": "...", "completion": "..."}``

Every example is normalised to the chat form.
"""

from __future__ import annotations

import hashlib
import json
import statistics
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROLES = ("system", "user", "assistant")
MAX_LINE_BYTES = 256 * 1024
MAX_REPORTED_ERRORS = 100

Message = dict[str, str]


@dataclass
class LineError:
    file: str
    line: int
    message: str


@dataclass
class Example:
    messages: list[Message]
    alternating: bool
    source: str = ""
    line: int = 0

    @property
    def chars(self) -> int:
        return sum(len(m["content"]) for m in self.messages)

    @property
    def key(self) -> str:
        """Content hash used to find duplicates and to place the example in a split."""
        canonical = json.dumps(self.messages, ensure_ascii=False, sort_keys=True)
        return hashlib.sha256(canonical.encode()).hexdigest()


@dataclass
class QualityComponents:
    validity: float
    uniqueness: float
    length_spread: float
    alternation: float


@dataclass
class DatasetReport:
    files: int = 0
    total_lines: int = 0
    valid: int = 0
    invalid: int = 0
    duplicates: int = 0
    too_long: int = 0
    usable: int = 0
    quality_score: float = 0.0
    components: QualityComponents | None = None
    errors: list[LineError] = field(default_factory=list)
    errors_truncated: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def problem(self) -> str:
        """A sentence saying why this data cannot train a model (empty if it can)."""
        if self.files == 0:
            return "no .jsonl files found"
        if self.total_lines == 0:
            return "the dataset is empty"
        if self.usable == 0:
            parts = [f"0 usable examples out of {self.total_lines} lines"]
            if self.invalid:
                first = self.errors[0]
                where = f"{first.file} line {first.line}"
                parts.append(f"{self.invalid} invalid (first: {where}: {first.message})")
            if self.too_long:
                parts.append(f"{self.too_long} over the length limit")
            return "; ".join(parts)
        return ""


def parse_line(raw: bytes) -> tuple[Example | None, str]:
    """Parse one JSONL line into an Example, or return the reason it is invalid."""
    if len(raw) > MAX_LINE_BYTES:
        return None, f"line is longer than {MAX_LINE_BYTES} bytes"
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return None, f"not valid UTF-8 (byte {exc.start})"
    try:
        obj = json.loads(text)
    except RecursionError:
        return None, "JSON nested too deeply"
    except ValueError as exc:
        return None, f"not valid JSON: {exc}"
    if not isinstance(obj, dict):
        return None, 'expected a JSON object like {"messages": [...]} or {"prompt", "completion"}'
    if "messages" in obj:
        return _parse_chat(obj["messages"])
    if "prompt" in obj or "completion" in obj:
        prompt, completion = obj.get("prompt"), obj.get("completion")
        if not isinstance(prompt, str) or not prompt.strip():
            return None, '"prompt" must be a non-empty string'
        if not isinstance(completion, str) or not completion.strip():
            return None, '"completion" must be a non-empty string'
        msgs = [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
        return Example(messages=msgs, alternating=True), ""
    return None, 'expected a "messages" list or "prompt" and "completion" fields'


def _parse_chat(messages: Any) -> tuple[Example | None, str]:
    if not isinstance(messages, list) or not messages:
        return None, '"messages" must be a non-empty list'
    out: list[Message] = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            return None, f"messages[{i}] must be an object with role and content"
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            return None, f"messages[{i}].role must be one of {', '.join(ROLES)}, got {role!r}"
        if not isinstance(content, str) or not content.strip():
            return None, f"messages[{i}].content must be a non-empty string"
        if role == "system" and i != 0:
            return None, f"messages[{i}]: a system message may only come first"
        out.append({"role": role, "content": content})
    turns = [m["role"] for m in out if m["role"] != "system"]
    if "user" not in turns:
        return None, "needs at least one user message"
    if turns[-1] != "assistant":
        return None, "the last message must be from the assistant (it is what the model learns)"
    expected = ["user", "assistant"] * (len(turns) // 2 + 1)
    return Example(messages=out, alternating=turns == expected[: len(turns)]), ""


def iter_lines(paths: Iterable[Path]) -> Iterator[tuple[str, int, bytes]]:
    for path in paths:
        with path.open("rb") as fh:
            for number, raw in enumerate(fh, start=1):
                yield path.name, number, raw.rstrip(b"\r\n")


def analyze(paths: Iterable[Path], max_example_chars: int) -> tuple[DatasetReport, list[Example]]:
    """Validate every line, drop duplicates and over-long examples, and score what is left."""
    paths = list(paths)
    report = DatasetReport(files=len(paths))
    seen: set[str] = set()
    kept: list[Example] = []
    for name, number, raw in iter_lines(paths):
        if not raw.strip():
            continue
        report.total_lines += 1
        example, reason = parse_line(raw)
        if example is None:
            report.invalid += 1
            if len(report.errors) < MAX_REPORTED_ERRORS:
                report.errors.append(LineError(file=name, line=number, message=reason))
            else:
                report.errors_truncated = True
            continue
        report.valid += 1
        example.source, example.line = name, number
        key = example.key
        if key in seen:
            report.duplicates += 1
            continue
        seen.add(key)
        if example.chars > max_example_chars:
            report.too_long += 1
            continue
        kept.append(example)
    report.usable = len(kept)
    report.components = quality_components(report, kept)
    report.quality_score = quality_score(report.components)
    return report, kept


def quality_components(report: DatasetReport, kept: list[Example]) -> QualityComponents:
    """The four parts of the quality score, each in [0, 1]. See the README for the formula."""
    validity = report.valid / report.total_lines if report.total_lines else 0.0
    uniqueness = 1.0 - report.duplicates / report.valid if report.valid else 0.0
    lengths = [e.chars for e in kept]
    if len(lengths) >= 2 and statistics.fmean(lengths) > 0:
        cv = statistics.pstdev(lengths) / statistics.fmean(lengths)
        length_spread = 1.0 / (1.0 + max(0.0, cv - 1.0))
    else:
        length_spread = 1.0 if lengths else 0.0
    alternation = sum(e.alternating for e in kept) / len(kept) if kept else 0.0
    return QualityComponents(validity, uniqueness, length_spread, alternation)


def quality_score(c: QualityComponents) -> float:
    """0.4·validity + 0.3·uniqueness + 0.15·length spread + 0.15·role alternation."""
    score = 0.4 * c.validity + 0.3 * c.uniqueness + 0.15 * c.length_spread + 0.15 * c.alternation
    return round(score, 3)


def split(examples: list[Example], validation_share: float) -> tuple[list[Example], list[Example]]:
    """Split by content hash, so the same example always lands on the same side.

    With two or more examples, both sides get at least one.
    """
    threshold = int(validation_share * 2**32)
    train = [e for e in examples if int(e.key[:8], 16) >= threshold]
    val = [e for e in examples if int(e.key[:8], 16) < threshold]
    if len(examples) >= 2 and not val and validation_share > 0:
        first = min(train, key=lambda e: e.key)
        train.remove(first)
        val.append(first)
    if len(examples) >= 2 and not train:
        last = max(val, key=lambda e: e.key)
        val.remove(last)
        train.append(last)
    return train, val


def write_jsonl(examples: Iterable[Example], path: Path) -> str:
    """Write examples atomically (temp file + rename); return the file's sha256."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(name)
    digest = hashlib.sha256()
    try:
        with open(fd, "w", encoding="utf-8") as fh:
            for e in examples:
                line = json.dumps({"messages": e.messages}, ensure_ascii=False) + "\n"
                digest.update(line.encode())
                fh.write(line)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return digest.hexdigest()


def read_examples(path: Path) -> list[list[Message]]:
    """Read a cleaned split written by write_jsonl."""
    with path.open(encoding="utf-8") as fh:
        return [json.loads(line)["messages"] for line in fh if line.strip()]


@dataclass
class ExportedDataset:
    report: DatasetReport
    train_size: int
    validation_size: int
    sha256: str


def tenant_files(tenant_dir: Path) -> list[Path]:
    return (
        sorted(p for p in tenant_dir.glob("*.jsonl") if p.is_file()) if tenant_dir.is_dir() else []
    )


def export(
    tenant_dir: Path,
    outputs: list[tuple[Path, Path]],
    *,
    max_example_chars: int,
    validation_share: float,
    min_examples: int,
) -> ExportedDataset:
    """Clean a tenant's raw files and write the train/validation splits to each output pair.

    Raises ValueError with a message naming the problem when the data cannot train a model.
    """
    report, kept = analyze(tenant_files(tenant_dir), max_example_chars)
    problem = report.problem()
    if not problem and report.usable < min_examples:
        problem = f"only {report.usable} usable examples; at least {min_examples} are needed"
    if problem:
        raise ValueError(problem)
    train, val = split(kept, validation_share)
    digest = ""
    for train_path, val_path in outputs:
        digest = write_jsonl(train, train_path)
        write_jsonl(val, val_path)
    return ExportedDataset(report, len(train), len(val), digest)
