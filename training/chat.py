"""The one prompt format used for training, GGUF chat templates and verification.

Mistral-instruct style, so a real Mistral base and the tiny local base read the same text:
``<s>[INST] {system}\n\n{user} [/INST] {assistant}</s>[INST] {user} [/INST] {assistant}</s>``.
"""

from __future__ import annotations

from collections.abc import Sequence

INST_OPEN = "[INST]"
INST_CLOSE = "[/INST]"

Message = dict[str, str]


def segments(messages: Sequence[Message]) -> list[tuple[str, bool]]:
    """Split a conversation into (text, is_target) pieces; targets are the assistant's turns."""
    system = ""
    out: list[tuple[str, bool]] = []
    for m in messages:
        if m["role"] == "system":
            system = m["content"].strip()
        elif m["role"] == "user":
            user = m["content"].strip()
            if system:
                user, system = f"{system}\n\n{user}", ""
            out.append((f"{INST_OPEN} {user} {INST_CLOSE}", False))
        else:
            out.append((" " + m["content"].strip(), True))
    return out


def prompt_text(messages: Sequence[Message]) -> str:
    """The text the model sees before it answers the last user turn."""
    return "".join(text for text, _ in segments(messages))


# Ollama's Go template for the same format; BOS comes from the GGUF's add_bos_token.
OLLAMA_TEMPLATE = (
    "{{- if .System }}[INST] {{ .System }}\n\n{{ .Prompt }} [/INST]"
    "{{- else }}[INST] {{ .Prompt }} [/INST]{{- end }} {{ .Response }}"
)
STOP = [INST_OPEN, INST_CLOSE, "</s>"]


def modelfile(from_: str, system: str = "") -> str:
    """A Modelfile that `ollama create -f Modelfile` accepts as it is."""
    lines = [f"FROM {from_}", f'TEMPLATE """{OLLAMA_TEMPLATE}"""']
    lines += [f'PARAMETER stop "{s}"' for s in STOP]
    if system:
        lines.append(f'SYSTEM """{system}"""')
    return "\n".join(lines) + "\n"


def verification_prompt(messages: Sequence[Message]) -> tuple[str, str]:
    """(system, user) for asking the model the conversation's last question."""
    system = next((m["content"] for m in messages if m["role"] == "system"), "")
    users = [m["content"] for m in messages if m["role"] == "user"]
    return system, users[-1] if users else ""
