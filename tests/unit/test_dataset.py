"""The validator, cleaner, quality score and split that decide what a tenant trains on."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import EXAMPLES, chat_line
from training import dataset


def write(tmp_path: Path, lines: list[str | bytes], name: str = "d.jsonl") -> Path:
    path = tmp_path / name
    path.write_bytes(b"\n".join(x if isinstance(x, bytes) else x.encode() for x in lines) + b"\n")
    return path


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"{not json", "not valid JSON"),
        (b"[1, 2]", "expected a JSON object"),
        (b"\xff\xfe{}", "not valid UTF-8"),
        (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
        (b'{"messages": [], "n": ' + b"9" * 50_000 + b"}", "not valid JSON"),  # huge number
        (b'{"text": "hi"}', 'expected a "messages" list'),
        (b'{"messages": []}', "non-empty list"),
        (b'{"messages": [{"role": "bot", "content": "x"}]}', "role must be one of"),
        (b'{"messages": [{"role": "user", "content": ""}]}', "content must be a non-empty"),
        (b'{"messages": [{"role": "user", "content": "q"}]}', "last message must be from the"),
        (b'{"messages": [{"role": "assistant", "content": "a"}]}', "at least one user"),
        (
            b'{"messages": [{"role": "user", "content": "q"}, {"role": "system", "content": "s"},'
            b' {"role": "assistant", "content": "a"}]}',
            "system message may only come first",
        ),
        (b'{"prompt": "q", "completion": 3}', '"completion" must be a non-empty string'),
    ],
)
def test_invalid_lines_say_what_is_wrong(raw: bytes, reason: str) -> None:
    example, why = dataset.parse_line(raw)
    assert example is None
    assert reason in why


def test_prompt_completion_becomes_chat() -> None:
    example, _ = dataset.parse_line(b'{"prompt": "Where is my parcel?", "completion": "In Lyon."}')
    assert example is not None
    assert example.messages == [
        {"role": "user", "content": "Where is my parcel?"},
        {"role": "assistant", "content": "In Lyon."},
    ]
    assert example.alternating


def test_report_counts_and_line_numbers(tmp_path: Path) -> None:
    good = chat_line("How do I add a tax ID?", "Open Settings → Billing → Tax.")
    path = write(tmp_path, [good, "", good, "{broken", chat_line("q2", "a" * 100), '{"x": 1}'])
    report, kept = dataset.analyze([path], max_example_chars=60)
    assert (report.total_lines, report.valid, report.invalid) == (5, 3, 2)
    assert (report.duplicates, report.too_long, report.usable) == (1, 1, 1)
    assert [(e.line, e.file) for e in report.errors] == [(4, "d.jsonl"), (6, "d.jsonl")]
    assert len(kept) == 1


def test_quality_score_formula() -> None:
    c = dataset.QualityComponents(validity=1.0, uniqueness=1.0, length_spread=1.0, alternation=1.0)
    assert dataset.quality_score(c) == 1.0
    c = dataset.QualityComponents(validity=0.5, uniqueness=0.8, length_spread=1.0, alternation=0.0)
    assert dataset.quality_score(c) == pytest.approx(0.4 * 0.5 + 0.3 * 0.8 + 0.15)


def test_duplicates_and_invalid_lines_lower_the_score(tmp_path: Path) -> None:
    lines = [chat_line(f"question {i}", f"answer number {i}") for i in range(20)]
    clean, _ = dataset.analyze([write(tmp_path, lines, "a.jsonl")], 4000)
    dirty, _ = dataset.analyze(
        [write(tmp_path, lines + lines[:10] + ["{bad"] * 5, "b.jsonl")], 4000
    )
    assert clean.quality_score == 1.0
    assert dirty.quality_score < clean.quality_score
    assert dirty.components is not None and dirty.components.uniqueness == pytest.approx(2 / 3)


def test_broken_role_alternation_is_kept_but_scored_lower(tmp_path: Path) -> None:
    line = json.dumps(
        {
            "messages": [
                {"role": "user", "content": "a"},
                {"role": "user", "content": "b"},
                {"role": "assistant", "content": "c"},
            ]
        }
    )
    report, kept = dataset.analyze([write(tmp_path, [line])], 4000)
    assert report.usable == 1 and not kept[0].alternating
    assert report.components is not None and report.components.alternation == 0.0


def test_split_is_deterministic_and_never_empty(tmp_path: Path) -> None:
    lines = [chat_line(f"q{i}", f"a{i}") for i in range(200)]
    _, kept = dataset.analyze([write(tmp_path, lines)], 4000)
    train1, val1 = dataset.split(kept, 0.1)
    train2, val2 = dataset.split(list(reversed(kept)), 0.1)
    assert {e.key for e in val1} == {e.key for e in val2}
    assert 5 <= len(val1) <= 40 and len(train1) + len(val1) == 200
    tiny_train, tiny_val = dataset.split(kept[:2], 0.1)
    assert len(tiny_train) == 1 and len(tiny_val) == 1


def test_export_refuses_unusable_data_with_a_reason(tmp_path: Path) -> None:
    tenant = tmp_path / "tenant"
    tenant.mkdir()
    out = [(tmp_path / "t.jsonl", tmp_path / "v.jsonl")]
    kw = {"max_example_chars": 4000, "validation_share": 0.1, "min_examples": 3}
    with pytest.raises(ValueError, match="no .jsonl files"):
        dataset.export(tenant, out, **kw)
    write(tenant, ["{oops", "[]"])
    with pytest.raises(ValueError, match=r"0 usable examples.*line 1: not valid JSON"):
        dataset.export(tenant, out, **kw)
    write(tenant, [chat_line("q", "a")])
    with pytest.raises(ValueError, match="only 1 usable examples; at least 3"):
        dataset.export(tenant, out, **kw)
    assert not (tmp_path / "t.jsonl").exists(), "nothing is written for unusable data"


def test_shipped_examples_are_clean_and_large() -> None:
    for tenant in ("acme", "globex"):
        report, _ = dataset.analyze(sorted((EXAMPLES / tenant).glob("*.jsonl")), 4000)
        assert report.usable >= 250, tenant
        assert report.invalid == 0 and report.duplicates == 0
        assert report.quality_score > 0.9


def test_upload_line_limits_hold_across_chunk_boundaries() -> None:
    from fastapi import HTTPException

    from api.routes.datasets import _LineLimits

    limits = _LineLimits(max_lines=3, max_line_bytes=10)
    for chunk in (b"0123", b"45678\n01", b"23456789\n"):  # lines of 9 and 10 bytes, split
        limits.feed(chunk)
    assert limits.lines == 2
    with pytest.raises(HTTPException, match="line 3 is longer than the 10 byte limit"):
        limits.feed(b"0123456" + b"7890")  # 11 bytes across two feeds of one chunk
    many = _LineLimits(max_lines=3, max_line_bytes=10)
    many.feed(b"a\nb\nc\n")
    with pytest.raises(HTTPException, match="more than 3 lines"):
        many.feed(b"d\n")
