"""A test STAND-IN for the Ollama HTTP API. Tests only: production code must not import it.

Ollama itself cannot run on the machines these tests run on, so this module serves the part of
its HTTP API that TenantTune calls, with the real server's status codes, error texts
(``{"error": "..."}``) and response fields, read from ollama/ollama's ``server/routes.go``,
``server/create.go``, ``manifest/*.go``, ``types/model/name.go``, ``template/template.go`` and
``api/types.go``. Models really run: blobs are stored content-addressed, GGUF files are read
with the ``gguf`` package, ``quantize`` goes through llama.cpp's ``llama_model_quantize`` and
``/api/generate`` runs the model with llama-cpp-python.

Served: ``GET|HEAD /``, ``GET|HEAD /api/version``, ``HEAD|POST /api/blobs/<digest>``,
``POST /api/create`` (from ``files`` holding GGUF blobs), ``GET|HEAD /api/tags``,
``POST /api/show``, ``POST /api/generate`` and ``DELETE /api/delete``. Anything else answers
``404 page not found`` as gin does, and a request this stand-in cannot serve faithfully (``from``,
adapters, messages, safetensors files, ``{{ range }}``-style templates) answers 501 saying so
rather than pretending. One extra, non-Ollama endpoint helps tests that only hold the URL:
``GET /_standin/stats`` (blob POSTs, blobs actually written, creates, every request's status).

State lives where Ollama keeps it: ``<state_dir>/blobs/sha256-<hex>`` and
``<state_dir>/manifests/<host>/<namespace>/<model>/<tag>`` (``registry.ollama.ai/library/...``
for a plain name).

Known simplifications: no registry (pull/push), no chat endpoint, no embeddings, no GGUF chat
templates (Go ``TEMPLATE`` only), a prompt longer than the context is refused instead of
truncated, and ``num_ctx`` defaults to 512 rather than Ollama's 4096.
"""

from __future__ import annotations

import codecs
import contextlib
import ctypes
import hashlib
import json
import logging
import math
import os
import queue
import random
import re
import socket
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = [
    "DEFAULT_NUM_CTX",
    "STANDIN_VERSION",
    "OllamaStandin",
    "StandinStats",
    "TemplateError",
    "TemplateUnsupported",
    "create_standin_app",
    "parse_template",
    "render_template",
    "run_standin",
]

# What an Ollama build without a version stamp reports from /api/version.
STANDIN_VERSION = "0.0.0"
# Ollama's default is 4096 (or sized to the GPU); a small context keeps CPU tests fast.
DEFAULT_NUM_CTX = 512

MEDIA_MODEL = "application/vnd.ollama.image.model"
MEDIA_ADAPTER = "application/vnd.ollama.image.adapter"
MEDIA_PROJECTOR = "application/vnd.ollama.image.projector"
MEDIA_TEMPLATE = "application/vnd.ollama.image.template"
MEDIA_SYSTEM = "application/vnd.ollama.image.system"
MEDIA_PARAMS = "application/vnd.ollama.image.params"
MEDIA_LICENSE = "application/vnd.ollama.image.license"
MEDIA_CONFIG = "application/vnd.docker.container.image.v1+json"
MEDIA_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"

# manifest/paths.go BlobsPath: only real sha256 digests, ':' or '-' separated, either case.
_DIGEST_RE = re.compile(r"^sha256[:-][0-9a-fA-F]{64}$")
_GO_SPACE = " \t\r\n"

# fs/ggml/type.go FileType.String(); the gaps (4-6, 33-35) are file types removed from GGUF.
_FILE_TYPES = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 10: "Q2_K",
    11: "Q3_K_S", 12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M", 16: "Q5_K_S",
    17: "Q5_K_M", 18: "Q6_K", 19: "IQ2_XXS", 20: "IQ2_XS", 21: "Q2_K_S", 22: "IQ3_XS",
    23: "IQ3_XXS", 24: "IQ1_S", 25: "IQ4_NL", 26: "IQ3_S", 27: "IQ3_M", 28: "IQ2_S",
    29: "IQ2_M", 30: "IQ4_XS", 31: "IQ1_M", 32: "BF16", 36: "TQ1_0", 37: "TQ2_0",
    38: "MXFP4_MOE", 39: "NVFP4", 40: "Q1_0",
}  # fmt: skip
# fs/ggml/type.go ParseFileType: the only types `ollama create --quantize` accepts.
_QUANTIZE_TYPES = {
    "F32": 0,
    "F16": 1,
    "Q8_0": 7,
    "Q4_K_S": 14,
    "Q4_K_M": 15,
    "Q4_K": 15,
    "BF16": 32,
}
_QUANTIZE_SUPPORTED_TEXT = "F32, F16, Q4_K_S, Q4_K_M, Q8_0"

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# Go-compatible formatting
# --------------------------------------------------------------------------------------------


def _go_float(v: float) -> str:
    """Go's %v for a float64: strconv 'g' with the shortest digits, so %e from 1e+06 and
    below 1e-04 (strconv/ftoa.go: "if precision was the shortest possible, use precision 6")."""
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    if v == 0:
        return "-0" if math.copysign(1.0, v) < 0 else "0"
    sign = "-" if v < 0 else ""
    mantissa, _, exp_text = f"{abs(v):.16e}".partition("e")
    # Shortest digits that round-trip, as Go's strconv does.
    for precision in range(1, 17):
        candidate = f"{abs(v):.{precision - 1}e}"
        if float(candidate) == abs(v):
            mantissa, _, exp_text = candidate.partition("e")
            break
    digits = mantissa.replace(".", "").rstrip("0") or "0"
    exponent = int(exp_text)
    if exponent < -4 or exponent >= 6:
        body = digits[0] + ("." + digits[1:] if len(digits) > 1 else "")
        return f"{sign}{body}e{'-' if exponent < 0 else '+'}{abs(exponent):02d}"
    if exponent < 0:
        return f"{sign}0.{'0' * (-exponent - 1)}{digits}"
    whole = digits[: exponent + 1].ljust(exponent + 1, "0")
    frac = digits[exponent + 1 :]
    return f"{sign}{whole}{'.' + frac if frac else ''}"


def _go_quote(s: str) -> str:
    """strconv.Quote, which is what %q and %#v print for a string."""
    out = ['"']
    escapes = {'"': '\\"', "\\": "\\\\", "\a": "\\a", "\b": "\\b", "\f": "\\f"}
    escapes |= {"\n": "\\n", "\r": "\\r", "\t": "\\t", "\v": "\\v"}
    for ch in s:
        if ch in escapes:
            out.append(escapes[ch])
        elif ch.isprintable() or ch == " ":
            out.append(ch)
        elif ord(ch) < 0x80:
            out.append(f"\\x{ord(ch):02x}")
        elif ord(ch) < 0x10000:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(f"\\U{ord(ch):08x}")
    out.append('"')
    return "".join(out)


def _go_value(v: Any, *, sharp: bool) -> str:
    """fmt's %v (sharp=False) or %#v (sharp=True) of a value decoded from JSON by Go."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return _go_float(float(v))  # encoding/json decodes every number into a float64
    if isinstance(v, str):
        return _go_quote(v) if sharp else v
    if v is None:
        return "<nil>"
    return json.dumps(v)


def _go_normalize(v: Any) -> Any:
    """Numbers as Go's encoding/json writes float64s: integral values without a fraction."""
    if isinstance(v, float) and v.is_integer() and abs(v) < 1e21:
        return int(v)
    if isinstance(v, dict):
        return {k: _go_normalize(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_go_normalize(x) for x in v]
    return v


def _go_json(v: Any, *, sort_keys: bool = False) -> str:
    """JSON as Go's encoding/json writes it: compact, with <, > and & escaped."""
    text = json.dumps(
        _go_normalize(v), separators=(",", ":"), ensure_ascii=False, sort_keys=sort_keys
    )
    for raw, esc in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026")):
        text = text.replace(raw, esc)
    return text.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")


def _go_time(ns: int, *, utc: bool) -> str:
    """A time.Time as JSON (RFC 3339 with trailing-zero-free nanoseconds)."""
    seconds, frac = divmod(ns, 1_000_000_000)
    dt = datetime.fromtimestamp(seconds, UTC)
    if not utc:
        dt = dt.astimezone()
    text = dt.strftime("%Y-%m-%dT%H:%M:%S")
    if frac_text := f"{frac:09d}".rstrip("0"):
        text += "." + frac_text
    offset = dt.utcoffset()
    if not offset:
        return text + "Z"
    minutes = int(offset.total_seconds()) // 60
    sign = "+" if minutes >= 0 else "-"
    return f"{text}{sign}{abs(minutes) // 60:02d}:{abs(minutes) % 60:02d}"


def _human_number(n: int) -> str:
    """format.HumanNumber: 158016 -> '158K', 7_241_732_096 -> '7.2B'."""
    for size, unit, decimals in ((1_000_000_000, "B", 1), (1_000_000, "M", 2)):
        if n >= size:
            number = n / size
            if number == math.floor(number):
                return f"{number:.0f}{unit}"
            return f"{number:.{decimals}f}{unit}"
    if n >= 1000:
        return f"{n / 1000:.0f}K"
    return str(n)


def _file_type_name(ftype: int | None) -> str:
    """ggml.KV.FileType().String(): 0 or absent counts as unknown, as in fs/ggml/ggml.go."""
    if not ftype:
        return "unknown"
    return _FILE_TYPES.get(ftype, "unknown")


class _GoJSONResponse(Response):
    media_type = "application/json; charset=utf-8"

    def render(self, content: Any) -> bytes:
        return _go_json(content).encode("utf-8")


def _error(message: str, status: int) -> Response:
    return _GoJSONResponse({"error": message}, status_code=status)


# --------------------------------------------------------------------------------------------
# Model names (types/model/name.go)
# --------------------------------------------------------------------------------------------

_MISSING = "!MISSING!"


@dataclass(frozen=True)
class ModelName:
    host: str
    namespace: str
    model: str
    tag: str

    @classmethod
    def parse(cls, s: str) -> ModelName:
        """model.ParseName: fill in registry.ollama.ai, library and latest where missing."""

        def cut_promised(text: str, sep: str) -> tuple[str, str, bool]:
            i = text.rfind(sep)
            if i < 0:
                return text, "", False
            return text[:i] or _MISSING, text[i + 1 :] or _MISSING, True

        host = namespace = tag = ""
        if s.rfind(":") > s.rfind("/"):
            s, tag, _ = cut_promised(s, ":")
        s, model, promised = cut_promised(s, "/")
        if not promised:
            model = s
        else:
            s, namespace, promised = cut_promised(s, "/")
            if not promised:
                namespace = s
            else:
                scheme, sep, rest = s.partition("://")
                host = rest if sep else scheme
        return cls(host or "registry.ollama.ai", namespace or "library", model, tag or "latest")

    def is_valid(self) -> bool:
        parts = ((self.host, "host"), (self.namespace, "namespace"), (self.model, "model"))
        return all(_valid_part(p, kind) for p, kind in (*parts, (self.tag, "tag")))

    def parts(self) -> tuple[str, str, str, str]:
        return self.host, self.namespace, self.model, self.tag

    def __str__(self) -> str:
        return f"{self.host}/{self.namespace}/{self.model}:{self.tag}"

    def display_shortest(self) -> str:
        if self.host.lower() != "registry.ollama.ai":
            return f"{self.host}/{self.namespace}/{self.model}:{self.tag}"
        if self.namespace.lower() != "library":
            return f"{self.namespace}/{self.model}:{self.tag}"
        return f"{self.model}:{self.tag}"


def _valid_part(s: str, kind: str) -> bool:
    if not 1 <= len(s) <= (350 if kind == "host" else 80):
        return False
    for i, ch in enumerate(s):
        word = ch.isascii() and (ch.isalnum() or ch == "_")
        if i == 0:
            if not word:
                return False
        elif ch in "_-":
            continue
        elif ch == ".":
            if kind == "namespace":
                return False
        elif ch == ":":
            if kind != "host":
                return False
        elif not word:
            return False
    return True


# --------------------------------------------------------------------------------------------
# Go templates: the subset model TEMPLATEs use (template/template.go on top of text/template)
# --------------------------------------------------------------------------------------------


class TemplateError(ValueError):
    """text/template would refuse this template too (Ollama: 400 'template error: ...')."""


class TemplateUnsupported(ValueError):
    """Valid Go template syntax that this stand-in does not implement."""


@dataclass
class _Field:
    idents: tuple[str, ...]


@dataclass
class _Lit:
    value: Any


@dataclass
class _Dot:
    pass


@dataclass
class _Call:
    func: str
    args: list[_Expr]


_Expr = _Field | _Lit | _Dot | _Call


@dataclass
class _Text:
    text: str


@dataclass
class _Action:
    expr: _Expr


@dataclass
class _If:
    cond: _Expr
    body: list[_Node]
    orelse: list[_Node] | None


_Node = _Text | _Action | _If

_FUNCS = {"and", "or", "not", "eq", "ne", "lt", "le", "gt", "ge", "len", "print"}
_UNSUPPORTED_FUNCS = {
    "call", "html", "index", "js", "printf", "println", "slice", "urlquery",
    "json", "currentDate", "yesterdayDate", "toTypeScriptType",
}  # fmt: skip
_UNSUPPORTED_KEYWORDS = {"range", "with", "define", "template", "block", "break", "continue"}
_NO_VALUE = object()


@dataclass
class _ActionItem:
    tokens: list[tuple[str, Any]]
    line: int


@dataclass
class ParsedTemplate:
    """A parsed model TEMPLATE; `raw` is the text as stored."""

    raw: str
    nodes: list[_Node]
    vars: frozenset[str] = field(default_factory=frozenset)


def _lex(src: str) -> list[str | _ActionItem]:
    """Split into text and action token lists, applying {{- and -}} trims."""
    items: list[str | _ActionItem] = []
    pos, trim_next = 0, False
    while True:
        start = src.find("{{", pos)
        text = src[pos:] if start < 0 else src[pos:start]
        if trim_next:
            text = text.lstrip(_GO_SPACE)
        if start < 0:
            items.append(text)
            return items
        line = src.count("\n", 0, start) + 1
        k = start + 2
        trim_left = src[k : k + 1] == "-" and src[k + 1 : k + 2] in tuple(_GO_SPACE)
        if trim_left:
            text = text.rstrip(_GO_SPACE)
            k += 2
        items.append(text)
        if src.startswith("/*", k):
            end = src.find("*/", k + 2)
            if end < 0:
                raise TemplateError(f"template: :{line}: unclosed comment")
            k = end + 2
            delim, trim_next, k = _at_right_delim(src, k)
            if not delim:
                raise TemplateError(f"template: :{line}: comment ends before closing delimiter")
            pos = k
            continue
        tokens, trim_next, pos = _lex_action(src, k, line)
        items.append(_ActionItem(tokens, line))


def _at_right_delim(src: str, k: int) -> tuple[bool, bool, int]:
    if src[k : k + 1] in tuple(_GO_SPACE) and src[k + 1 : k + 4] == "-}}":
        return True, True, k + 4
    if src.startswith("}}", k):
        return True, False, k + 2
    return False, False, k


def _lex_action(src: str, k: int, line: int) -> tuple[list[tuple[str, Any]], bool, int]:
    tokens: list[tuple[str, Any]] = []
    n = len(src)
    while True:
        delim, trim, after = _at_right_delim(src, k)
        if delim:
            return tokens, trim, after
        if k >= n:
            raise TemplateError(f"template: :{line}: unclosed action")
        ch = src[k]
        if ch in _GO_SPACE:
            k += 1
            continue
        if ch == '"':
            j, buf = k + 1, []
            while True:
                if j >= n or src[j] == "\n":
                    raise TemplateError(f"template: :{line}: unterminated quoted string")
                if src[j] == "\\" and j + 1 < n:
                    buf.append(src[j : j + 2])
                    j += 2
                    continue
                if src[j] == '"':
                    break
                buf.append(src[j])
                j += 1
            tokens.append(("str", json.loads('"' + "".join(buf) + '"')))
            k = j + 1
        elif ch == "`":
            j = src.find("`", k + 1)
            if j < 0:
                raise TemplateError(f"template: :{line}: unterminated raw quoted string")
            tokens.append(("str", src[k + 1 : j]))
            k = j + 1
        elif ch == "." and k + 1 < n and (src[k + 1].isalpha() or src[k + 1] == "_"):
            m = re.compile(r"(\.[A-Za-z_][A-Za-z0-9_]*)+").match(src, k)
            assert m is not None
            tokens.append(("field", tuple(m.group(0)[1:].split("."))))
            k = m.end()
        elif ch == ".":
            tokens.append(("dot", None))
            k += 1
        elif ch.isdigit() or (ch in "+-" and k + 1 < n and src[k + 1].isdigit()):
            m = re.compile(r"[+-]?[0-9][0-9a-fA-FxXoObB_.eEpP+-]*").match(src, k)
            assert m is not None
            text = m.group(0)
            try:
                value: Any = int(text, 0)
            except ValueError:
                try:
                    value = float(text)
                except ValueError as exc:
                    raise TemplateError(f"template: :{line}: bad number syntax: {text!r}") from exc
            tokens.append(("num", value))
            k = m.end()
        elif ch.isalpha() or ch == "_":
            m = re.compile(r"[A-Za-z_][A-Za-z0-9_]*").match(src, k)
            assert m is not None
            tokens.append(("ident", m.group(0)))
            k = m.end()
        elif ch in "()":
            tokens.append((ch, None))
            k += 1
        elif ch in "$|'=:,":
            raise TemplateUnsupported(
                f"line {line}: variables, pipes and char constants ({ch!r}) are beyond "
                "the Ollama stand-in's template support"
            )
        else:
            raise TemplateError(f"template: :{line}: unexpected {ch!r} in command")


class _Parser:
    def __init__(self, items: list[str | _ActionItem]) -> None:
        self.items = items
        self.i = 0

    def parse_list(self) -> tuple[list[_Node], str, list[tuple[str, Any]], int]:
        """Nodes up to an {{else}}, {{end}} or the end: (nodes, stop, stop's tokens, line)."""
        nodes: list[_Node] = []
        while self.i < len(self.items):
            item = self.items[self.i]
            self.i += 1
            if isinstance(item, str):
                if item:
                    nodes.append(_Text(item))
                continue
            toks = item.tokens
            if not toks:
                raise TemplateError(f"template: :{item.line}: missing value for command")
            kind, value = toks[0]
            if kind == "ident" and value in ("end", "else"):
                return nodes, value, toks[1:], item.line
            if kind == "ident" and value in _UNSUPPORTED_KEYWORDS:
                raise TemplateUnsupported(
                    f"line {item.line}: {{{{ {value} }}}} is beyond the Ollama stand-in's "
                    "template support"
                )
            if kind == "ident" and value == "if":
                nodes.append(self.parse_if(toks[1:], item.line))
                continue
            nodes.append(_Action(_parse_pipeline(toks, item.line)))
        return nodes, "", [], 0

    def parse_if(self, cond_tokens: list[tuple[str, Any]], line: int) -> _If:
        if not cond_tokens:
            raise TemplateError(f"template: :{line}: missing value for if")
        cond = _parse_pipeline(cond_tokens, line)
        body, stop, rest, stop_line = self.parse_list()
        orelse: list[_Node] | None = None
        if stop == "else":
            if rest and rest[0] == ("ident", "if"):
                orelse = [self.parse_if(rest[1:], stop_line)]  # shares the outer {{ end }}
            elif rest:
                raise TemplateUnsupported(f"line {stop_line}: {{{{ else {rest[0][1]} }}}}")
            else:
                orelse, stop, _, _ = self.parse_list()
                if stop != "end":
                    raise TemplateError(f"template: :{line}: unexpected EOF")
        elif stop != "end":
            raise TemplateError(f"template: :{line}: unexpected EOF")
        return _If(cond, body, orelse)


def _parse_pipeline(tokens: list[tuple[str, Any]], line: int) -> _Expr:
    operands: list[_Expr] = []
    i = 0
    while i < len(tokens):
        kind, value = tokens[i]
        if kind == "(":
            depth, j = 1, i + 1
            while j < len(tokens) and depth:
                depth += {"(": 1, ")": -1}.get(tokens[j][0], 0)
                j += 1
            if depth:
                raise TemplateError(f"template: :{line}: unclosed left paren")
            operands.append(_parse_pipeline(tokens[i + 1 : j - 1], line))
            i = j
            continue
        if kind == ")":
            raise TemplateError(f"template: :{line}: unexpected right paren")
        if kind == "field":
            operands.append(_Field(value))
        elif kind == "dot":
            operands.append(_Dot())
        elif kind in ("str", "num"):
            operands.append(_Lit(value))
        elif value in ("true", "false"):
            operands.append(_Lit(value == "true"))
        elif value == "nil":
            operands.append(_Lit(None))
        elif value in _UNSUPPORTED_FUNCS:
            raise TemplateUnsupported(f"line {line}: function {value!r} in a template")
        elif value in _FUNCS:
            operands.append(_Call(value, []))
        elif value in ("if", "else", "end") or value in _UNSUPPORTED_KEYWORDS:
            raise TemplateError(f"template: :{line}: unexpected <{value}> in command")
        else:
            raise TemplateError(f'template: :{line}: function "{value}" not defined')
        i += 1
    if not operands:
        raise TemplateError(f"template: :{line}: missing value for command")
    head = operands[0]
    if isinstance(head, _Call) and not head.args:
        return _Call(head.func, operands[1:])
    if len(operands) > 1:
        raise TemplateError(f"template: :{line}: can't give argument to non-function")
    return head


def _identifiers(nodes: list[_Node]) -> set[str]:
    found: set[str] = set()

    def expr(e: _Expr) -> None:
        if isinstance(e, _Field):
            found.update(i.lower() for i in e.idents)
        elif isinstance(e, _Call):
            for a in e.args:
                expr(a)

    def walk(ns: list[_Node]) -> None:
        for n in ns:
            if isinstance(n, _Action):
                expr(n.expr)
            elif isinstance(n, _If):
                expr(n.cond)
                walk(n.body)
                walk(n.orelse or [])

    walk(nodes)
    return found


def parse_template(raw: str) -> ParsedTemplate:
    """template.Parse: parse, then append {{ .Response }} when the template names neither
    .Messages nor .Response."""
    parser = _Parser(_lex(raw))
    nodes, stop, _, line = parser.parse_list()
    if stop:
        raise TemplateError(f"template: :{line}: unexpected {{{{{stop}}}}}")
    names = _identifiers(nodes)
    if "messages" in names:
        raise TemplateUnsupported("templates that range over .Messages")
    if "response" not in names:
        nodes.append(_Action(_Field(("Response",))))
        names.add("response")
    return ParsedTemplate(raw, nodes, frozenset(names))


DEFAULT_TEMPLATE = "{{ .Prompt }}"


def _mentions_response(e: _Expr) -> bool:
    if isinstance(e, _Field):
        return "Response" in e.idents
    if isinstance(e, _Call):
        return any(_mentions_response(a) for a in e.args)
    return False


def _cut_after_response(nodes: list[_Node]) -> list[_Node]:
    """template.go deleteNode: drop every node walked after the first .Response field, so the
    prompt ends where the model's answer starts (if-conditions are not walked)."""
    cut = False

    def walk_list(ns: list[_Node]) -> list[_Node]:
        out: list[_Node] = []
        for n in ns:
            kept = walk(n)
            if kept is not None:
                out.append(kept)
        return out

    def walk(n: _Node) -> _Node | None:
        nonlocal cut
        if cut:
            return None
        if isinstance(n, _Action):
            if _mentions_response(n.expr):
                cut = True
            return n
        if isinstance(n, _If):
            body = walk_list(n.body)
            orelse = walk_list(n.orelse) if n.orelse is not None else None
            return _If(n.cond, body, orelse)
        return n

    return walk_list(nodes)


def _truth(v: Any) -> bool:
    if v is _NO_VALUE or v is None:
        return False
    if isinstance(v, bool):
        return v
    if isinstance(v, int | float | str | list | dict | tuple):
        return bool(v)
    return True


def _show(v: Any) -> str:
    if v is _NO_VALUE:
        return "<no value>"
    if isinstance(v, list | tuple):
        return "[" + " ".join(_show(x) for x in v) + "]"
    return _go_value(v, sharp=False)


def _eval(e: _Expr, data: Mapping[str, Any]) -> Any:
    if isinstance(e, _Lit):
        return e.value
    if isinstance(e, _Dot):
        return data
    if isinstance(e, _Field):
        v: Any = data
        for ident in e.idents:
            if isinstance(v, Mapping):
                v = v.get(ident, _NO_VALUE)  # Option("missingkey=zero") on a map[string]any
            elif v is _NO_VALUE or v is None:
                raise TemplateError(f"template: nil pointer evaluating interface {{}}.{ident}")
            else:
                raise TemplateError(
                    f"template: can't evaluate field {ident} in type {type(v).__name__}"
                )
        return v
    args = e.args
    if e.func in ("and", "or"):
        if not args:
            raise TemplateError(f"template: wrong number of args for {e.func}")
        v = None
        for a in args:
            v = _eval(a, data)
            if _truth(v) != (e.func == "and"):
                return v
        return v
    vals = [_eval(a, data) for a in args]
    vals = [None if v is _NO_VALUE else v for v in vals]
    if e.func == "not":
        if len(vals) != 1:
            raise TemplateError("template: wrong number of args for not: want 1")
        return not _truth(vals[0])
    if e.func == "len":
        if len(vals) != 1 or not hasattr(vals[0], "__len__"):
            raise TemplateError("template: error calling len")
        return len(vals[0])
    if e.func == "print":  # fmt.Sprint: a space between operands when neither is a string
        out = ""
        for i, v in enumerate(vals):
            if i and not isinstance(v, str) and not isinstance(vals[i - 1], str):
                out += " "
            out += _show(v)
        return out
    if len(vals) < 2:
        raise TemplateError(f"template: missing argument for {e.func}")
    first = vals[0]
    if e.func == "eq":
        return any(first == v for v in vals[1:])
    if len(vals) != 2:
        raise TemplateError(f"template: wrong number of args for {e.func}: want 2")
    other = vals[1]
    try:
        return {
            "ne": lambda: first != other,
            "lt": lambda: first < other,
            "le": lambda: first <= other,
            "gt": lambda: first > other,
            "ge": lambda: first >= other,
        }[e.func]()
    except TypeError as exc:
        raise TemplateError(f"template: error calling {e.func}: incompatible types") from exc


def _render(nodes: list[_Node], data: Mapping[str, Any], out: list[str]) -> None:
    for n in nodes:
        if isinstance(n, _Text):
            out.append(n.text)
        elif isinstance(n, _Action):
            out.append(_show(_eval(n.expr, data)))
        elif _truth(_eval(n.cond, data)):
            _render(n.body, data, out)
        elif n.orelse is not None:
            _render(n.orelse, data, out)


def render_template(template: ParsedTemplate, *, system: str = "", prompt: str = "") -> str:
    """The prompt Ollama builds for /api/generate from one (system, user) turn: the legacy
    Execute path of template/template.go with .Response empty and the template cut after it."""
    data = {
        "System": system,
        "Prompt": prompt,
        "Response": "",
        "Think": False,
        "ThinkLevel": "",
        "IsThinkSet": False,
    }
    out: list[str] = []
    _render(_cut_after_response(template.nodes), data, out)
    return "".join(out)


def _render_suffix(template: ParsedTemplate, prompt: str, suffix: str) -> str:
    data = {"Prompt": prompt, "Suffix": suffix, "Response": "", "Think": False}
    out: list[str] = []
    _render(template.nodes, data | {"ThinkLevel": "", "IsThinkSet": False}, out)
    return "".join(out)


# --------------------------------------------------------------------------------------------
# Blobs, layers and manifests (manifest/*.go)
# --------------------------------------------------------------------------------------------


class _Fail(Exception):
    """An error answer: Ollama's message and status (500 where the Go code sets none)."""

    def __init__(self, message: str, status: int = 500) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


class _InvalidDigest(ValueError):
    def __init__(self) -> None:
        super().__init__("invalid digest format")  # manifest.ErrInvalidDigestFormat


@dataclass
class Layer:
    media_type: str
    digest: str
    size: int
    from_: str = ""
    status: str = ""

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"mediaType": self.media_type, "digest": self.digest}
        out["size"] = self.size
        if self.from_:
            out["from"] = self.from_
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Layer:
        return cls(
            str(data.get("mediaType", "")),
            str(data.get("digest", "")),
            int(data.get("size", 0)),
            str(data.get("from", "")),
        )


@dataclass
class Manifest:
    name: ModelName
    path: Path
    config: Layer
    layers: list[Layer]
    digest: str  # sha256 of the manifest file, hex only (as /api/tags shows it)
    mtime_ns: int

    def size(self) -> int:
        return sum(layer.size for layer in [*self.layers, self.config])

    def all_digests(self) -> set[str]:
        return {layer.digest for layer in [*self.layers, self.config] if layer.digest}


@dataclass
class StandinStats:
    """What the stand-in did, for tests to assert on (e.g. that a blob was not re-uploaded)."""

    blob_writes: int = 0  # request bodies stored as new blobs by POST /api/blobs
    requests: list[tuple[str, str, int]] = field(default_factory=list)  # (method, path, status)

    def count(self, method: str, path_prefix: str = "") -> int:
        return sum(1 for m, p, _ in self.requests if m == method and p.startswith(path_prefix))

    def to_json(self) -> dict[str, Any]:
        """What GET /_standin/stats answers (not an Ollama endpoint; the real server 404s)."""
        return {
            "blob_posts": self.count("POST", "/api/blobs/"),
            "blob_writes": self.blob_writes,
            "creates": self.count("POST", "/api/create"),
            "requests": [list(r) for r in self.requests],
        }


@dataclass
class GGUFInfo:
    kv: dict[str, Any]
    tensors: list[dict[str, Any]]
    architecture: str
    kind: str
    parameter_count: int
    file_type: int | None

    @property
    def file_type_name(self) -> str:
        return _file_type_name(self.file_type)

    def capabilities(self) -> list[str]:
        """Completion unless the GGUF pools (an embedding model), as model_list_cache.go."""
        if f"{self.architecture}.pooling_type" in self.kv:
            return ["embedding"]
        return ["completion"]


def _read_gguf(path: Path) -> GGUFInfo:
    import numpy as np
    from gguf import GGUFReader, GGUFValueType

    reader = GGUFReader(str(path))
    kv: dict[str, Any] = {}
    for name, f in reader.fields.items():
        if name.startswith("GGUF."):
            continue
        value = f.contents()
        kind = f.types[-1] if f.types else None
        if kind == GGUFValueType.FLOAT32:  # float32s as their shortest decimal, as Go prints
            if isinstance(value, list):
                value = [float(str(np.float32(x))) for x in value]
            elif value is not None:
                value = float(str(np.float32(value)))
        kv[name] = value
    parameters = sum(int(t.n_elements) for t in reader.tensors)
    kv["general.parameter_count"] = parameters  # fs/ggml/gguf.go patches this in
    tensors = [
        {"name": t.name, "type": t.tensor_type.name, "shape": [int(d) for d in t.shape]}
        for t in reader.tensors
    ]
    ftype = kv.get("general.file_type")
    return GGUFInfo(
        kv=kv,
        tensors=tensors,
        architecture=str(kv.get("general.architecture") or "unknown"),
        kind=str(kv.get("general.type") or "unknown"),
        parameter_count=parameters,
        file_type=int(ftype) if isinstance(ftype, int) else None,
    )


class _Store:
    """Ollama's models directory: blobs/sha256-<hex> and manifests/<host>/<ns>/<model>/<tag>."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.blobs = root / "blobs"
        self.manifests = root / "manifests"
        self.blobs.mkdir(parents=True, exist_ok=True)
        self.manifests.mkdir(parents=True, exist_ok=True)
        self._gguf_cache: dict[str, GGUFInfo] = {}
        self._lock = threading.Lock()

    # blobs ----------------------------------------------------------------------------------

    def blob_path(self, digest: str) -> Path:
        """manifest.BlobsPath: refuse anything but sha256[:-]<64 hex>."""
        if not _DIGEST_RE.match(digest):
            raise _InvalidDigest()
        return self.blobs / digest.replace(":", "-")

    def new_layer(self, chunks: Iterator[bytes] | bytes, media_type: str) -> Layer:
        """manifest.NewLayer: hash into a temp file, keep it as sha256-<hex> unless present."""
        fd, tmp_name = tempfile.mkstemp(prefix="sha256-", dir=self.blobs)
        tmp = Path(tmp_name)
        try:
            h, n = hashlib.sha256(), 0
            with os.fdopen(fd, "wb") as out:
                for chunk in [chunks] if isinstance(chunks, bytes) else chunks:
                    h.update(chunk)
                    out.write(chunk)
                    n += len(chunk)
            return self.adopt(tmp, f"sha256:{h.hexdigest()}", n, media_type)
        finally:
            tmp.unlink(missing_ok=True)

    def new_layer_from_file(self, src: Path, media_type: str) -> Layer:
        def chunks() -> Iterator[bytes]:
            with src.open("rb") as fh:
                while chunk := fh.read(1 << 20):
                    yield chunk

        return self.new_layer(chunks(), media_type)

    def adopt(self, tmp: Path, digest: str, size: int, media_type: str) -> Layer:
        """Keep a hashed temp file as blob `digest`, unless that blob is already there."""
        blob = self.blob_path(digest)
        status = "using existing layer"
        with self._lock:
            if not blob.exists():
                status = "creating new layer"
                tmp.chmod(0o644)
                os.replace(tmp, blob)
        os.utime(blob)  # touchLayer
        return Layer(media_type, digest, size, status=f"{status} {digest}")

    def layer_from_blob(self, digest: str, media_type: str, from_: str) -> Layer:
        """manifest.NewLayerFromLayer: reuse an uploaded blob as a layer."""
        blob = self.blob_path(digest)
        size = blob.stat().st_size
        os.utime(blob)
        return Layer(media_type, digest, size, from_, f"using existing layer {digest}")

    def gguf(self, digest: str) -> GGUFInfo:
        with self._lock:
            cached = self._gguf_cache.get(digest)
        if cached is None:
            cached = _read_gguf(self.blob_path(digest))
            with self._lock:
                self._gguf_cache[digest] = cached
        return cached

    # manifests ------------------------------------------------------------------------------

    def manifest_path(self, name: ModelName) -> Path:
        return self.manifests.joinpath(*name.parts())

    def read_manifest(self, name: ModelName) -> Manifest | None:
        path = self.manifest_path(name)
        try:
            raw = path.read_bytes()
            st = path.stat()
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return None
        data = json.loads(raw)
        return Manifest(
            name=name,
            path=path,
            config=Layer.from_json(data.get("config") or {}),
            layers=[Layer.from_json(x) for x in data.get("layers") or []],
            digest=hashlib.sha256(raw).hexdigest(),
            mtime_ns=st.st_mtime_ns,
        )

    def write_manifest(self, name: ModelName, config: Layer, layers: list[Layer]) -> None:
        body = {
            "schemaVersion": 2,
            "mediaType": MEDIA_MANIFEST,
            "config": config.to_json(),
            "layers": [layer.to_json() for layer in layers],
        }
        path = self.manifest_path(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".manifest-", dir=path.parent)
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(_go_json(body) + "\n")  # json.NewEncoder(f).Encode(m)
        os.replace(tmp, path)

    def all_manifests(self) -> list[Manifest]:
        """manifest.Manifests(true): every readable manifests/*/*/*/* with a valid name."""
        found: list[Manifest] = []
        for path in sorted(self.manifests.glob("*/*/*/*")):
            if not path.is_file() or path.name.startswith(".manifest-"):
                continue
            rel = path.relative_to(self.manifests).parts
            name = ModelName(*rel)
            if not name.is_valid():
                continue
            with contextlib.suppress(ValueError, OSError):
                m = self.read_manifest(name)
                if m is not None:
                    found.append(m)
        return found

    def existing_name(self, n: ModelName) -> ModelName:
        """getExistingName: take each part's spelling from an existing manifest (case-folded)."""
        parts = list(n.parts())
        fixed = [False] * 4
        for m in self.all_manifests():
            for i, theirs in enumerate(m.name.parts()):
                if not fixed[i] and parts[i].lower() == theirs.lower():
                    parts[i], fixed[i] = theirs, True
        return ModelName(*parts)

    def remove_manifest(self, m: Manifest) -> None:
        """Manifest.Remove: delete the file, then prune empty directories."""
        m.path.unlink()
        for parent in m.path.parents:
            if parent == self.manifests or self.manifests not in parent.parents:
                break
            with contextlib.suppress(OSError):
                parent.rmdir()

    def remove_unused_layers(self, m: Manifest) -> None:
        """Manifest.RemoveLayers: delete this manifest's blobs that no other manifest uses."""
        in_use: set[str] = set()
        for other in self.all_manifests():
            in_use |= other.all_digests()
        for digest in m.all_digests() - in_use:
            with contextlib.suppress(FileNotFoundError, _InvalidDigest):
                self.blob_path(digest).unlink()
                with self._lock:
                    self._gguf_cache.pop(digest, None)


@dataclass
class _Model:
    """server.Model, as GetModel reads it from a manifest."""

    name: ModelName
    manifest: Manifest
    config: dict[str, Any]
    model_digest: str
    model_path: Path | None
    parent: str
    template: ParsedTemplate
    system: str
    options: dict[str, Any]
    license: list[str]
    adapters: list[Path]
    projectors: list[Path]


def _load_model(store: _Store, name: ModelName) -> _Model | None:
    m = store.read_manifest(name)
    if m is None:
        return None
    config: dict[str, Any] = {}
    if m.config.digest:
        config = json.loads(store.blob_path(m.config.digest).read_text(encoding="utf-8"))
    model = _Model(
        name, m, config, "", None, "", parse_template(DEFAULT_TEMPLATE), "", {}, [], [], []
    )
    for layer in m.layers:
        path = store.blob_path(layer.digest)
        if layer.media_type == MEDIA_MODEL:
            model.model_digest, model.model_path, model.parent = layer.digest, path, layer.from_
        elif layer.media_type == MEDIA_ADAPTER:
            model.adapters.append(path)
        elif layer.media_type == MEDIA_PROJECTOR:
            model.projectors.append(path)
        elif layer.media_type in (MEDIA_TEMPLATE, "application/vnd.ollama.image.prompt"):
            model.template = parse_template(path.read_text(encoding="utf-8"))
        elif layer.media_type == MEDIA_SYSTEM:
            model.system = path.read_text(encoding="utf-8")
        elif layer.media_type == MEDIA_PARAMS:
            model.options = json.loads(path.read_text(encoding="utf-8"))
        elif layer.media_type == MEDIA_LICENSE:
            model.license.append(path.read_text(encoding="utf-8"))
    return model


def _modelfile_quote(s: str) -> str:
    """parser.quote: only multi-line or space-padded arguments get quotes."""
    if "\n" in s or s.startswith(" ") or s.endswith(" "):
        return f'"""{s}"""' if '"' in s else f'"{s}"'
    return s


def _modelfile(model: _Model) -> str:
    """The `modelfile` of /api/show: a header, then Model.String() (server/images.go)."""
    lines = [
        '# Modelfile generated by "ollama show"',
        "# To build a new Modelfile based on this, replace FROM with:",
        f"# FROM {model.name.display_shortest()}",
        "",
        f"FROM {model.model_path or ''}",
    ]
    lines += [f"ADAPTER {_modelfile_quote(str(p))}" for p in model.adapters]
    lines += [f"FROM {p}" for p in model.projectors]
    lines.append(f"TEMPLATE {_modelfile_quote(model.template.raw)}")
    if model.system:
        lines.append(f"SYSTEM {_modelfile_quote(model.system)}")
    for key in sorted(model.options):  # Go ranges over a map: any order; sorted here
        value = model.options[key]
        for v in value if isinstance(value, list) else [value]:
            lines.append(f"PARAMETER {key} {_modelfile_quote(_go_value(v, sharp=False))}")
    lines += [f"LICENSE {_modelfile_quote(text)}" for text in model.license]
    return "\n".join(lines) + "\n"


def _parameters_text(options: Mapping[str, Any]) -> str:
    """ShowResponse.Parameters: fmt.Sprintf("%-*s %#v", 30, key, value) per value."""
    out: list[str] = []
    for key in sorted(options):
        value = options[key]
        for v in value if isinstance(value, list) else [value]:
            out.append(f"{key:<30} {_go_value(v, sharp=True)}")
    return "\n".join(out)


def _details(config: Mapping[str, Any], parent: str = "") -> dict[str, Any]:
    return {
        "parent_model": parent,
        "format": config.get("model_format", ""),
        "family": config.get("model_family", ""),
        "families": config.get("model_families"),
        "parameter_size": config.get("model_type", ""),
        "quantization_level": config.get("file_type", ""),
    }


# --------------------------------------------------------------------------------------------
# Running models (llama-cpp-python stands in for Ollama's llama-server runner)
# --------------------------------------------------------------------------------------------


@dataclass
class _Runner:
    llm: Any  # llama_cpp.Llama
    lock: threading.Lock
    n_ctx: int


class _Runners:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._runners: dict[tuple[str, int], _Runner] = {}

    def get(self, path: Path, n_ctx: int) -> _Runner:
        key = (str(path), n_ctx)
        with self._lock:
            runner = self._runners.get(key)
            if runner is None:
                import llama_cpp

                llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, verbose=False)
                runner = _Runner(llm, threading.Lock(), n_ctx)
                self._runners[key] = runner
            return runner

    def expire(self, path: Path | None = None) -> None:
        """Unload the runners of one model file (all when None, or those whose file is gone)."""
        with self._lock:
            for key in list(self._runners):
                gone = not Path(key[0]).exists()
                if (path is None and gone) or key[0] == str(path):
                    runner = self._runners.pop(key)
                    with runner.lock:
                        runner.llm.close()

    def close(self) -> None:
        with self._lock:
            runners, self._runners = list(self._runners.values()), {}
        for runner in runners:
            with runner.lock:
                runner.llm.close()


def _quantize_gguf(src: Path, dst: Path, ftype: int) -> int:
    import llama_cpp

    # llama.cpp logs through llama-cpp-python's logger; keep quantization quiet like verbose=False.
    logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = max(1, (os.cpu_count() or 2) // 2)
    params.allow_requantize = True  # Ollama runs llama-quantize --allow-requantize
    return int(
        llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    )


def _copy_gguf(src: Path, dst: Path) -> int:
    """llama-quantize ... COPY: rewrite the GGUF without changing any tensor type."""
    import llama_cpp

    logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)
    params = llama_cpp.llama_model_quantize_default_params()
    params.only_copy = True
    return int(
        llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    )


_OPTION_TYPES: dict[str, type] = {
    "num_predict": int, "num_ctx": int, "seed": int, "top_k": int, "temperature": float,
    "top_p": float, "min_p": float, "typical_p": float, "repeat_penalty": float,
    "presence_penalty": float, "frequency_penalty": float, "repeat_last_n": int, "num_keep": int,
}  # fmt: skip


def _options(
    model_options: Mapping[str, Any], request_options: Mapping[str, Any]
) -> dict[str, Any]:
    """api.DefaultOptions, then the model's PARAMETERs, then the request's options (a request
    `stop` replaces the model's, as Options.FromMap does)."""
    opts: dict[str, Any] = {
        "num_predict": -1, "num_keep": 4, "temperature": 0.8, "top_k": 40, "top_p": 0.9,
        "min_p": 0.0, "typical_p": 1.0, "repeat_last_n": 64, "repeat_penalty": 1.0,
        "presence_penalty": 0.0, "frequency_penalty": 0.0, "seed": -1,
        "num_ctx": DEFAULT_NUM_CTX, "stop": [],
    }  # fmt: skip
    for source in (model_options, request_options):
        for key, value in source.items():  # messages as api.Options.FromMap words them
            if value is None:
                continue
            if key == "stop":
                if not isinstance(value, list):
                    raise _Fail(f"option {_go_quote(key)} must be of type array")
                if not all(isinstance(v, str) for v in value):
                    raise _Fail(f"option {_go_quote(key)} must be of an array of strings")
                opts["stop"] = list(value)
            elif key in _OPTION_TYPES:
                want = _OPTION_TYPES[key]
                if isinstance(value, bool) or not isinstance(value, int | float):
                    go_type = "integer" if want is int else "float32"
                    raise _Fail(f"option {_go_quote(key)} must be of type {go_type}")
                opts[key] = want(value)
    return opts


# --------------------------------------------------------------------------------------------
# Requests and answers
# --------------------------------------------------------------------------------------------

_END = object()
_Emit = Callable[[Any], None]


def _spawn(
    work: Callable[[_Emit, threading.Event], None],
) -> tuple[queue.Queue[Any], threading.Event]:
    """Run `work` on a thread, like the handlers' goroutines writing to a channel."""
    q: queue.Queue[Any] = queue.Queue()
    cancel = threading.Event()

    def target() -> None:
        try:
            work(q.put, cancel)
        except _Fail as exc:
            q.put(exc)
        except Exception as exc:  # noqa: BLE001 - the real server answers 500 with the text
            log.exception("ollama stand-in: request failed")
            q.put(_Fail(str(exc) or type(exc).__name__))
        finally:
            q.put(_END)

    threading.Thread(target=target, name="ollama-standin-work", daemon=True).start()
    return q, cancel


async def _next(q: queue.Queue[Any]) -> Any:
    return await anyio.to_thread.run_sync(q.get)


async def _wait_for_stream(q: queue.Queue[Any]) -> Response:
    """waitForStream (routes.go): the last progress message, or the first error."""
    latest: Any = {}
    while (item := await _next(q)) is not _END:
        if isinstance(item, _Fail):
            return _error(item.message, item.status)
        latest = item
    return _GoJSONResponse(latest)


async def _stream_response(q: queue.Queue[Any], cancel: threading.Event) -> Response:
    """streamResponse (routes.go): NDJSON; an error before any output sets the status, an
    error after it becomes a final {"error": ...} line."""
    first = await _next(q)
    if isinstance(first, _Fail):
        return _error(first.message, first.status)

    async def lines() -> AsyncIterator[bytes]:
        try:
            item = first
            while item is not _END:
                if isinstance(item, _Fail):
                    yield (_go_json({"error": item.message}) + "\n").encode()
                    return
                yield (_go_json(item) + "\n").encode()
                item = await _next(q)
        finally:
            cancel.set()

    return StreamingResponse(lines(), media_type="application/x-ndjson")


def _json_kind(v: Any) -> str:
    if isinstance(v, bool):
        return "bool"
    if isinstance(v, int | float):
        return "number"
    if isinstance(v, str):
        return "string"
    if isinstance(v, list):
        return "array"
    return "object" if isinstance(v, dict) else "value"


def _field(
    data: Mapping[str, Any], key: str, kind: type | tuple[type, ...], struct: str, go_type: str
) -> Any:
    """A request field, refused the way encoding/json refuses a value of the wrong type."""
    value: Any = data.get(key)
    if value is None:
        return None
    kinds = kind if isinstance(kind, tuple) else (kind,)
    ok = isinstance(value, kinds) and (bool in kinds or not isinstance(value, bool))
    if ok and go_type == "map[string]string":
        ok = all(isinstance(v, str) for v in value.values())
    if not ok:
        raise _Fail(
            f"json: cannot unmarshal {_json_kind(value)} into Go struct field "
            f"{struct}.{key} of type {go_type}",
            400,
        )
    return value


async def _read_json(request: Request, struct: str) -> dict[str, Any]:
    raw = await request.body()
    if not raw.strip():
        raise _Fail("missing request body", 400)  # ShouldBindJSON's io.EOF
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise _Fail(f"invalid character in request body: {exc}", 400) from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise _Fail(
            f"json: cannot unmarshal {_json_kind(data)} into Go value of type api.{struct}", 400
        )
    return data


def _valid_fs_path(p: str) -> bool:
    """io/fs.ValidPath: unrooted, slash-separated, no empty, '.' or '..' elements."""
    if p == ".":
        return True
    return bool(p) and all(part not in ("", ".", "..") for part in p.split("/"))


def _content_type(head: bytes) -> str:
    """detectContentType (server/model.go) for the magics it knows."""
    if len(head) < 4:
        return "unknown"
    magic = int.from_bytes(head[:4], "little")
    known = {0x67676D6C: "ggml", 0x67676D66: "ggmf", 0x67676A74: "ggjt", 0x67676C61: "ggla"}
    if magic in (0x46554747, 0x47475546):
        return "gguf"
    return known.get(magic, "unknown")


def _duration_is_zero(v: Any) -> bool:
    """Whether a keep_alive value (seconds, or a Go duration string) is zero."""
    if isinstance(v, bool) or v is None:
        return False
    if isinstance(v, int | float):
        return v == 0
    if isinstance(v, str):
        parts = re.findall(r"([0-9.]+)(ns|us|µs|ms|s|m|h)?", v.strip())
        return bool(parts) and all(float(number) == 0 for number, _ in parts)
    return False


def _now_ns() -> int:
    return time.time_ns()


class OllamaStandin:
    """The stand-in's state and request handling; `create_standin_app` wraps it in FastAPI."""

    def __init__(self, state_dir: Path, *, validate_gguf_on_create: bool = False) -> None:
        self.store = _Store(state_dir)
        self.runners = _Runners()
        self.stats = StandinStats()
        # Ollama >= 0.30 (commit 9db4bdbad) rewrites every created GGUF through
        # `llama-quantize COPY`, so the model layer is a new blob, not the uploaded one.
        self.validate_gguf_on_create = validate_gguf_on_create

    # /api/blobs ----------------------------------------------------------------------------

    def head_blob(self, digest: str) -> Response:
        try:
            path = self.store.blob_path(digest)
        except _InvalidDigest as exc:
            return _error(str(exc), 400)
        if not path.is_file():
            return _error(f"blob {_go_quote(digest)} not found", 404)
        return Response(status_code=200)

    async def create_blob(self, digest: str, request: Request) -> Response:
        try:
            path = self.store.blob_path(digest)
        except _InvalidDigest as exc:
            return _error(str(exc), 400)
        if path.exists():
            return Response(status_code=200)  # the body is not read
        fd, tmp_name = tempfile.mkstemp(prefix="sha256-", dir=self.store.blobs)
        tmp = Path(tmp_name)
        try:
            h, n = hashlib.sha256(), 0
            with os.fdopen(fd, "wb") as out:
                async for chunk in request.stream():
                    h.update(chunk)
                    out.write(chunk)
                    n += len(chunk)
            layer = self.store.adopt(tmp, f"sha256:{h.hexdigest()}", n, "")
        finally:
            tmp.unlink(missing_ok=True)
        if layer.status.startswith("creating"):
            self.stats.blob_writes += 1
        if layer.digest != digest:
            # The body is kept under its real digest before the check, as NewLayer does.
            return _error(
                f"digest mismatch, expected {_go_quote(digest)}, got {_go_quote(layer.digest)}",
                400,
            )
        return Response(status_code=201)

    # /api/create ---------------------------------------------------------------------------

    async def create(self, request: Request) -> Response:
        try:
            req = await _read_json(request, "CreateRequest")
            struct = "CreateRequest"
            files = _field(req, "files", dict, struct, "map[string]string")
            adapters = _field(req, "adapters", dict, struct, "map[string]string")
            for key in ("model", "name", "from", "template", "system", "quantize", "quantization"):
                _field(req, key, str, struct, "string")
            _field(req, "parameters", dict, struct, "map[string]interface {}")
            stream = _field(req, "stream", bool, struct, "bool")
            for path, digest in (files or {}).items():
                if not _valid_fs_path(path):
                    raise _Fail("file path must be relative", 400)
                if digest == "":
                    raise _Fail("invalid digest format", 400)
            if any(d == "" for d in (adapters or {}).values()):
                raise _Fail("invalid digest format", 400)
            name = ModelName.parse(req.get("model") or req.get("name") or "")
            if not name.is_valid():
                raise _Fail("invalid model name", 400)  # errtypes.InvalidModelNameErrMsg
            name = self.store.existing_name(name)
        except _Fail as exc:
            return _error(exc.message, exc.status)
        q, cancel = _spawn(lambda emit, _cancel: self._create(req, name, emit))
        if stream is False:
            return await _wait_for_stream(q)
        return await _stream_response(q, cancel)

    def _create(self, req: dict[str, Any], name: ModelName, emit: _Emit) -> None:
        old = self.store.read_manifest(name)
        if req.get("from"):
            raise _Fail("ollama stand-in: creating FROM another model is not implemented", 501)
        if req.get("files") is None:
            raise _Fail("neither 'from' or 'files' was specified", 400)
        base = self._layers_from_files(req["files"], emit)
        if req.get("adapters"):
            raise _Fail("ollama stand-in: adapters are not implemented", 501)
        self._create_model(req, name, base, emit)
        if old is not None:
            self.store.remove_unused_layers(old)
        emit({"status": "success"})

    def _layers_from_files(
        self, files: Mapping[str, str], emit: _Emit
    ) -> list[tuple[Layer, GGUFInfo]]:
        kind = ""
        for filename, digest in files.items():  # detectModelTypeFromFiles: the first file decides
            if filename.endswith(".safetensors"):
                kind = "safetensors"
            elif filename.endswith(".gguf"):
                kind = "gguf"
            else:
                with contextlib.suppress(_InvalidDigest, OSError):
                    with self.store.blob_path(digest).open("rb") as fh:
                        kind = "gguf" if _content_type(fh.read(4)) == "gguf" else ""
            break
        if kind == "safetensors":
            raise _Fail("ollama stand-in: converting safetensors is not implemented", 501)
        if kind != "gguf":
            raise _Fail("unknown type", 400)  # errUnknownType
        layers: list[tuple[Layer, GGUFInfo]] = []
        for filename in sorted(files):
            emit({"status": "parsing GGUF"})
            digest = files[filename]
            try:
                path = self.store.blob_path(digest)
            except _InvalidDigest as exc:
                raise _Fail(str(exc)) from exc
            try:
                with path.open("rb") as fh:
                    head = fh.read(512)
            except FileNotFoundError as exc:
                raise _Fail(f"open {path}: no such file or directory") from exc
            if _content_type(head) != "gguf":
                raise _Fail("supplied file was not in GGUF format", 400)  # errOnlyGGUFSupported
            try:
                info = self.store.gguf(digest)
            except Exception as exc:  # noqa: BLE001 - ggml.Decode's error is a 500
                raise _Fail(f"failed to decode GGUF: {exc}") from exc
            media = MEDIA_MODEL
            if info.kind == "adapter":
                media = MEDIA_ADAPTER
            elif info.kind in ("projector", "mmproj"):
                media = MEDIA_PROJECTOR
            layers.append((self.store.layer_from_blob(digest, media, filename), info))
        return layers

    def _create_model(
        self,
        req: dict[str, Any],
        name: ModelName,
        base: list[tuple[Layer, GGUFInfo]],
        emit: _Emit,
    ) -> None:
        config: dict[str, Any] = {
            "model_format": "",
            "model_family": "",
            "model_families": None,
            "model_type": "",
            "file_type": "",
        }
        layers: list[Layer] = []
        for layer, info in base:
            if layer.media_type == MEDIA_MODEL:
                layer, info = self._maybe_quantize(req, layer, info, emit)
                config["model_format"] = config["model_format"] or "gguf"
                config["model_family"] = config["model_family"] or info.architecture
                config["model_type"] = config["model_type"] or _human_number(info.parameter_count)
                config["file_type"] = config["file_type"] or info.file_type_name
                config["model_families"] = [*(config["model_families"] or []), info.architecture]
            layers.append(layer)

        if template := req.get("template"):
            try:
                parse_template(template)
            except TemplateError as exc:
                raise _Fail(f"template error: {exc}", 400) from exc  # errBadTemplate
            except TemplateUnsupported as exc:
                raise _Fail(f"ollama stand-in: unsupported template: {exc}", 501) from exc
            layers.append(self.store.new_layer(template.encode(), MEDIA_TEMPLATE))
        if system := req.get("system"):
            layers.append(self.store.new_layer(system.encode(), MEDIA_SYSTEM))
        license_ = req.get("license")
        for text in [license_] if isinstance(license_, str) else license_ or []:
            if text:
                layers.append(self.store.new_layer(str(text).encode(), MEDIA_LICENSE))
        if params := req.get("parameters"):
            body = _go_json(params, sort_keys=True) + "\n"
            layers.append(self.store.new_layer(body.encode(), MEDIA_PARAMS))
        if req.get("messages"):
            raise _Fail("ollama stand-in: MESSAGE layers are not implemented", 501)

        config |= {"architecture": "amd64", "os": "linux"}
        config_layer = self.store.new_layer((_go_json(config) + "\n").encode(), MEDIA_CONFIG)
        for layer in layers:
            if layer.status:
                emit({"status": layer.status})
        emit({"status": "writing manifest"})
        self.store.write_manifest(name, config_layer, layers)

    def _maybe_quantize(
        self, req: Mapping[str, Any], layer: Layer, info: GGUFInfo, emit: _Emit
    ) -> tuple[Layer, GGUFInfo]:
        want = (req.get("quantize") or req.get("quantization") or "").upper()
        if want:
            if want not in _QUANTIZE_TYPES:
                raise _Fail(
                    f"unsupported quantization type {want} - supported types are "
                    f"{_QUANTIZE_SUPPORTED_TEXT}"
                )
            have = info.file_type_name
            if have not in ("F16", "BF16", "F32"):
                raise _Fail("quantization is only supported for F16, BF16 and F32 models")
            if have != _file_type_name(_QUANTIZE_TYPES[want]):
                status = f"quantizing {have} model to {want}"
                return self._rewrite(
                    layer,
                    status,
                    lambda src, dst: _quantize_gguf(src, dst, _QUANTIZE_TYPES[want]),
                    emit,
                )
        if self.validate_gguf_on_create:
            return self._rewrite(layer, "validating GGUF model", _copy_gguf, emit)
        return layer, info

    def _rewrite(
        self,
        layer: Layer,
        status: str,
        run: Callable[[Path, Path], int],
        emit: _Emit,
    ) -> tuple[Layer, GGUFInfo]:
        """rewriteLayerWithLlamaQuantize: llama.cpp writes a new GGUF that becomes a new blob."""
        src = self.store.blob_path(layer.digest)
        fd, tmp_name = tempfile.mkstemp(prefix="quantize-", dir=self.store.blobs)
        os.close(fd)
        tmp = Path(tmp_name)
        try:
            progress = {"status": status, "digest": "0000000000000000000", "total": layer.size}
            emit(progress)
            rc = run(src, tmp)
            if rc != 0:
                raise _Fail(f"llama-quantize failed: exit status {rc}")
            emit(progress | {"completed": layer.size})
            emit({"status": "verifying conversion"})
            new = self.store.new_layer_from_file(tmp, layer.media_type)
        finally:
            tmp.unlink(missing_ok=True)
        return new, self.store.gguf(new.digest)

    # /api/tags, /api/show, /api/delete ------------------------------------------------------

    def _gguf_of(self, model: _Model) -> GGUFInfo | None:
        if not model.model_digest:
            return None
        try:
            return self.store.gguf(model.model_digest)
        except Exception:  # noqa: BLE001 - a broken blob leaves details to the config
            return None

    def list_models(self) -> Response:
        entries: list[tuple[int, dict[str, Any]]] = []
        for m in self.store.all_manifests():
            model = _load_model(self.store, m.name)
            if model is None:
                continue
            details = _details(model.config)
            caps: list[str] = []
            info = self._gguf_of(model)
            if info is not None:
                caps = info.capabilities()
                arch = info.architecture
                for key in ("context_length", "embedding_length"):
                    if isinstance(value := info.kv.get(f"{arch}.{key}"), int) and value:
                        details[key] = value
                if details["quantization_level"] in ("", "unknown"):
                    details["quantization_level"] = info.file_type_name
            entry: dict[str, Any] = {
                "name": m.name.display_shortest(),
                "model": m.name.display_shortest(),
                "modified_at": _go_time(m.mtime_ns, utc=False),
                "size": m.size(),
                "digest": m.digest,
                "details": details,
            }
            if caps:
                entry["capabilities"] = caps
            entries.append((m.mtime_ns // 1_000_000_000, entry))
        entries.sort(key=lambda e: -e[0])  # newest first, by whole seconds, stable
        return _GoJSONResponse({"models": [entry for _, entry in entries]})

    async def show(self, request: Request) -> Response:
        try:
            req = await _read_json(request, "ShowRequest")
            for key in ("model", "name", "system"):
                _field(req, key, str, "ShowRequest", "string")
            verbose = bool(_field(req, "verbose", bool, "ShowRequest", "bool"))
            text = req.get("model") or req.get("name") or ""
            if not text:
                raise _Fail("model is required", 400)
            if not text.strip():
                raise _Fail("model is required", 400)
            name = ModelName.parse(text.strip())
            if not name.is_valid():
                raise _Fail("invalid model name", 400)
            name = self.store.existing_name(name)
            model = _load_model(self.store, name)
            if model is None:
                raise _Fail(f"model '{name.display_shortest()}' not found", 404)
        except _Fail as exc:
            return _error(exc.message, exc.status)
        if req.get("system"):
            model.system = req["system"]
        resp: dict[str, Any] = {}
        if model.license:
            resp["license"] = "\n".join(model.license)
        resp["modelfile"] = _modelfile(model)
        if params := _parameters_text(model.options):
            resp["parameters"] = params
        resp["template"] = model.template.raw
        if model.system:
            resp["system"] = model.system
        details = _details(model.config, model.parent)
        model_info: dict[str, Any] = {}
        info = self._gguf_of(model)
        if info is not None:
            if details["quantization_level"] in ("", "unknown"):
                details["quantization_level"] = info.file_type_name
            for key, value in info.kv.items():
                if key in ("general.name", "tokenizer.chat_template"):
                    continue
                short = not verbose and isinstance(value, list) and len(value) > 5
                model_info[key] = [] if short else value
        resp["details"] = details
        resp["model_info"] = model_info
        if info is not None:
            resp["tensors"] = info.tensors
            resp["capabilities"] = info.capabilities()
        resp["modified_at"] = _go_time(model.manifest.mtime_ns, utc=False)
        return _GoJSONResponse(resp)

    async def delete(self, request: Request) -> Response:
        try:
            req = await _read_json(request, "DeleteRequest")
            for key in ("model", "name"):
                _field(req, key, str, "DeleteRequest", "string")
            text = req.get("model") or req.get("name") or ""
            if not text.strip():
                raise _Fail("model is required", 400)
            name = ModelName.parse(text.strip())
            if not name.is_valid():
                raise _Fail(f"name {_go_quote(text)} is invalid", 400)
            m = self.store.read_manifest(self.store.existing_name(name))
            if m is None:
                raise _Fail(f"model '{text}' not found", 404)
        except _Fail as exc:
            return _error(exc.message, exc.status)
        self.store.remove_manifest(m)
        self.store.remove_unused_layers(m)  # DeleteHandler: m.RemoveLayers()
        self.runners.expire()
        return Response(status_code=200)

    # /api/generate -------------------------------------------------------------------------

    async def generate(self, request: Request) -> Response:
        start = time.perf_counter_ns()
        try:
            req = await _read_json(request, "GenerateRequest")
            struct = "GenerateRequest"
            for key in ("model", "prompt", "suffix", "system", "template"):
                _field(req, key, str, struct, "string")
            raw = bool(_field(req, "raw", bool, struct, "bool"))
            stream = _field(req, "stream", bool, struct, "bool")
            options = _field(req, "options", dict, struct, "map[string]interface {}") or {}
            context = _field(req, "context", list, struct, "[]int")
            model_text: str = req.get("model") or ""
            if not model_text.strip():
                raise _Fail(f"model '{model_text}' not found", 404)  # ParseRef: model required
            name = ModelName.parse(model_text.strip())
            if not name.is_valid():
                raise _Fail("invalid model name", 400)
            model = _load_model(self.store, self.store.existing_name(name))
            if model is None or model.model_path is None:
                raise _Fail(f"model '{model_text}' not found", 404)
            prompt: str = req.get("prompt") or ""
            if prompt == "" and "keep_alive" in req and _duration_is_zero(req["keep_alive"]):
                self.runners.expire(model.model_path)
                return _GoJSONResponse(self._chunk(model_text, "", done=True, reason="unload"))
            if raw and (req.get("template") or req.get("system") or context):
                raise _Fail("raw mode does not support template, system, or context", 400)
            if req.get("images"):
                raise _Fail("ollama stand-in: images are not implemented", 501)
            if req.get("format"):
                raise _Fail("ollama stand-in: structured output (format) is not implemented", 501)
            think = req.get("think")
            if think is True or (isinstance(think, str) and think not in ("", "false")):
                raise _Fail(f"{_go_quote(model_text)} does not support thinking", 400)
            info = self._gguf_of(model)
            if info is not None and "completion" not in info.capabilities():
                raise _Fail(f"{_go_quote(model_text)} does not support generate", 400)
            suffix: str = req.get("suffix") or ""
            if suffix and "suffix" not in model.template.vars:
                raise _Fail(f"{model.name} does not support insert", 400)
            opts = _options(model.options, options)
            runner = await anyio.to_thread.run_sync(
                self.runners.get, model.model_path, opts["num_ctx"]
            )
        except _Fail as exc:
            return _error(exc.message, exc.status)
        except ValueError as exc:  # llama.cpp could not load the file
            return _error(str(exc), 500)
        loaded = time.perf_counter_ns()
        if prompt == "":
            return _GoJSONResponse(self._chunk(model_text, "", done=True, reason="load"))

        try:
            if raw:
                text = prompt
            elif suffix:
                text = _render_suffix(self._template_for(req, model), prompt, suffix)
            else:
                text = render_template(
                    self._template_for(req, model),
                    system=req.get("system") or model.system,
                    prompt=prompt,
                )
        except (TemplateError, TemplateUnsupported) as exc:
            return _error(str(exc), 500)

        def work(emit: _Emit, cancel: threading.Event) -> None:
            if context and not raw:
                with runner.lock:
                    prefix = runner.llm.detokenize([int(t) for t in context])
                full = prefix.decode("utf-8", errors="replace") + text
            else:
                full = text
            self._complete(runner, full, opts, model_text, not raw, start, loaded, emit, cancel)

        q, cancel = _spawn(work)
        if stream is False:
            return await self._collect(q)
        return await _stream_response(q, cancel)

    @staticmethod
    def _template_for(req: Mapping[str, Any], model: _Model) -> ParsedTemplate:
        if req.get("template"):
            try:
                return parse_template(req["template"])
            except (TemplateError, TemplateUnsupported) as exc:
                raise TemplateError(str(exc)) from exc
        return model.template

    @staticmethod
    def _chunk(model: str, text: str, *, done: bool, reason: str = "") -> dict[str, Any]:
        out: dict[str, Any] = {"model": model, "created_at": _go_time(_now_ns(), utc=True)}
        out["response"] = text
        out["done"] = done
        if reason:
            out["done_reason"] = reason
        return out

    def _complete(
        self,
        runner: _Runner,
        prompt: str,
        opts: Mapping[str, Any],
        model_text: str,
        want_context: bool,
        start: int,
        loaded: int,
        emit: _Emit,
        cancel: threading.Event,
    ) -> None:
        """The runner's completion loop: sample up to num_predict tokens, stop at an
        end-of-generation token or a stop sequence (cut off, partial matches held back),
        stream the text, finish with Ollama's metrics."""
        import llama_cpp

        with runner.lock:
            llm = runner.llm
            tokens = llm.tokenize(prompt.encode("utf-8"), add_bos=True, special=True)
            room = runner.n_ctx - len(tokens)
            if room <= 0:
                raise _Fail(
                    f"ollama stand-in: the prompt has {len(tokens)} tokens, more than "
                    f"num_ctx {runner.n_ctx}; Ollama would truncate it",
                )
            num_predict = int(opts["num_predict"])
            limit = num_predict if 0 < num_predict < room else room
            stops: list[str] = [s for s in opts["stop"] if s]
            seed = int(opts["seed"])
            llm.set_seed(seed if seed >= 0 else random.randrange(2**31))
            vocab = llama_cpp.llama_model_get_vocab(llm.model)
            decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
            parts: list[str] = []
            held, reason, sampled, stopped = "", "length", 0, False
            t0 = time.perf_counter_ns()
            t_first = 0
            for token in llm.generate(
                tokens,
                top_k=int(opts["top_k"]),
                top_p=float(opts["top_p"]),
                min_p=float(opts["min_p"]),
                typical_p=float(opts["typical_p"]),
                temp=float(opts["temperature"]),
                repeat_penalty=float(opts["repeat_penalty"]),
                frequency_penalty=float(opts["frequency_penalty"]),
                presence_penalty=float(opts["presence_penalty"]),
            ):
                t_first = t_first or time.perf_counter_ns()
                sampled += 1
                if llama_cpp.llama_vocab_is_eog(vocab, token):
                    reason = "stop"
                    break
                held += decoder.decode(llm.detokenize([token]))
                hits = [i for i in (held.find(s) for s in stops) if i >= 0]
                if hits:
                    held, reason, stopped = held[: min(hits)], "stop", True
                    break
                keep = max(
                    (n for s in stops for n in range(1, len(s)) if held.endswith(s[:n])),
                    default=0,
                )
                if out := held[: len(held) - keep]:
                    parts.append(out)
                    emit(self._chunk(model_text, out, done=False))
                held = held[len(held) - keep :]
                if sampled >= limit or cancel.is_set():
                    break
            if not stopped:
                held += decoder.decode(b"", final=True)
            if held:
                parts.append(held)
                emit(self._chunk(model_text, held, done=False))
            t_end = time.perf_counter_ns()
            context: list[int] = []
            if want_context:
                text = prompt + "".join(parts)
                context = llm.tokenize(text.encode("utf-8"), add_bos=True, special=True)
        t_first = t_first or t_end
        final = self._chunk(model_text, "", done=True, reason=reason)
        if context:
            final["context"] = context
        metrics = {
            "total_duration": time.perf_counter_ns() - start,
            "load_duration": loaded - start,
            "prompt_eval_count": len(tokens),
            "prompt_eval_duration": t_first - t0,
            "eval_count": sampled,
            "eval_duration": t_end - t_first,
        }
        final |= {k: v for k, v in metrics.items() if v}  # api.Metrics fields are omitempty
        emit(final)

    @staticmethod
    async def _collect(q: queue.Queue[Any]) -> Response:
        """GenerateHandler with stream=false: the final chunk with the whole response."""
        parts: list[str] = []
        last: dict[str, Any] = {}
        while (item := await _next(q)) is not _END:
            if isinstance(item, _Fail):
                return _error(item.message, item.status)
            parts.append(item.get("response", ""))
            last = item
        return _GoJSONResponse(last | {"response": "".join(parts)})


# --------------------------------------------------------------------------------------------
# The app and a server for tests
# --------------------------------------------------------------------------------------------


class _RecordRequests:
    """ASGI middleware noting (method, path, status) of every request in StandinStats."""

    def __init__(self, app: ASGIApp, stats: StandinStats) -> None:
        self.app = app
        self.stats = stats

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def record(message: Message) -> None:
            if message["type"] == "http.response.start":
                self.stats.requests.append((scope["method"], scope["path"], message["status"]))
            await send(message)

        await self.app(scope, receive, record)


def create_standin_app(state_dir: Path, *, validate_gguf_on_create: bool = False) -> FastAPI:
    """A FastAPI app serving the Ollama API from `state_dir` (created if missing).

    `validate_gguf_on_create=True` behaves like Ollama >= 0.30, which rewrites each created
    GGUF through llama-quantize COPY, so `FROM` names a new blob rather than the uploaded one.
    `app.state.standin` is the OllamaStandin, `app.state.standin.stats` its StandinStats.
    """
    standin = OllamaStandin(state_dir, validate_gguf_on_create=validate_gguf_on_create)
    app = FastAPI(
        title="Ollama stand-in (tests only)",
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.state.standin = standin
    app.add_middleware(_RecordRequests, stats=standin.stats)

    @app.exception_handler(StarletteHTTPException)
    async def not_found(_request: Request, exc: StarletteHTTPException) -> Response:
        if exc.status_code in (404, 405):  # gin answers both with its plain 404
            return PlainTextResponse("404 page not found", status_code=404)
        return PlainTextResponse(str(exc.detail), status_code=exc.status_code)

    @app.api_route("/", methods=["GET", "HEAD"])
    async def root() -> Response:
        return PlainTextResponse("Ollama is running", media_type="text/plain; charset=utf-8")

    @app.get("/_standin/stats")
    async def stats() -> Response:
        return _GoJSONResponse(standin.stats.to_json())

    @app.api_route("/api/version", methods=["GET", "HEAD"])
    async def version() -> Response:
        return _GoJSONResponse({"version": STANDIN_VERSION})

    @app.head("/api/blobs/{digest}")
    async def head_blob(digest: str) -> Response:
        return standin.head_blob(digest)

    @app.post("/api/blobs/{digest}")
    async def create_blob(digest: str, request: Request) -> Response:
        return await standin.create_blob(digest, request)

    @app.post("/api/create")
    async def create(request: Request) -> Response:
        return await standin.create(request)

    @app.api_route("/api/tags", methods=["GET", "HEAD"])
    async def tags() -> Response:
        return await anyio.to_thread.run_sync(standin.list_models)

    @app.post("/api/show")
    async def show(request: Request) -> Response:
        return await standin.show(request)

    @app.delete("/api/delete")
    async def delete(request: Request) -> Response:
        return await standin.delete(request)

    @app.post("/api/generate")
    async def generate(request: Request) -> Response:
        return await standin.generate(request)

    return app


@contextlib.contextmanager
def run_standin(state_dir: Path, *, app: FastAPI | None = None) -> Iterator[str]:
    """Serve the stand-in on a free 127.0.0.1 port in a background thread; yield its base URL.

    Pass `app` (from create_standin_app) to keep a handle on it, e.g. for its stats.
    """
    app = app or create_standin_app(state_dir)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", lifespan="off", access_log=False)
    server = uvicorn.Server(config)
    thread = threading.Thread(
        target=server.run, kwargs={"sockets": [sock]}, name="ollama-standin", daemon=True
    )
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the Ollama stand-in did not start")
            time.sleep(0.01)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()
        standin = getattr(app.state, "standin", None)
        if isinstance(standin, OllamaStandin):
            standin.runners.close()
