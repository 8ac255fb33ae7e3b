"""SFT formatting with the DeepSeek-V2 chat template (docs/model.md §7.2):

    <bos>{system}\\n\\nUser: {user}\\n\\nAssistant: {answer}<eos>User: {user}\\n\\nAssistant: {answer}<eos>

Only the assistant answers (" {answer}" and its EOS) are trained; the prompt, including "Assistant:", is context.
Segments are tokenized separately so the trained span is exact, as DeepSeek's own SFT code does (ESFT `utils.py`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .tokenizer import TextTokenizer

ROLES = ("system", "user", "assistant")


def check_messages(messages: Any, field_name: str = "messages") -> str | None:
    """None if `messages` is a usable conversation, else why not."""
    if messages is None:
        return f"missing field '{field_name}'"
    if not isinstance(messages, list) or not messages:
        return f"field '{field_name}' is not a non-empty list"
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            return f"message {i} is not an object"
        if message.get("role") not in ROLES:
            return f"message {i} has role {message.get('role')!r}; allowed: {', '.join(ROLES)}"
        content = message.get("content")
        if not isinstance(content, str):
            return f"message {i} content is {type(content).__name__}, not a string"
        try:
            content.encode("utf-8")
        except UnicodeEncodeError:
            return f"message {i} has invalid unicode (lone surrogate)"
    if not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
        return "no non-empty assistant message to train on"
    return None


def messages_extractor(field_name: str):
    def extract(obj: dict) -> tuple[Any, str | None]:
        messages = obj.get(field_name)
        return messages, check_messages(messages, field_name)
    return extract


def segments(messages: list[dict]) -> list[tuple[str, bool]]:
    """(text, trained) pieces of the rendered conversation, without BOS/EOS."""
    out: list[tuple[str, bool]] = []
    for message in messages:
        role, content = message["role"], message["content"]
        if role == "system":
            out.append((content + "\n\n", False))
        elif role == "user":
            out.append(("User: " + content + "\n\n", False))
        else:
            out.append(("Assistant:", False))
            out.append((" " + content, True))
            out.append(("<eos>", True))  # placeholder: the EOS id, trained
    return out


def render_text(messages: list[dict], bos: str, eos: str, add_generation_prompt: bool = False) -> str:
    """The template as one string (for generation prompts and for checking against the published rendering)."""
    text = bos + "".join(eos if piece == "<eos>" else piece for piece, _ in segments(messages))
    return text + ("Assistant:" if add_generation_prompt else "")


def encode_conversations(tokenizer: TextTokenizer, conversations: list[list[dict]]
                         ) -> list[tuple[np.ndarray, np.ndarray]]:
    """(token ids, trained mask) per conversation: BOS, then each segment tokenized on its own."""
    if tokenizer.eos_id is None:
        raise ValueError(f"{tokenizer.source}: SFT needs an EOS token to end each answer; none was found")
    pieces = [segments(m) for m in conversations]
    texts = [text for conv in pieces for text, _ in conv if text != "<eos>"]
    encoded = iter(tokenizer.encode_batch(texts, add_special_tokens=False))
    out = []
    for conv in pieces:
        ids: list[np.ndarray] = [np.array([tokenizer.bos_id], np.int32)] if tokenizer.bos_id is not None else []
        mask: list[np.ndarray] = [np.zeros(len(ids[0]), bool)] if ids else []
        for text, trained in conv:
            part = np.array([tokenizer.eos_id], np.int32) if text == "<eos>" else next(encoded)
            ids.append(part)
            mask.append(np.full(len(part), trained))
        out.append((np.concatenate(ids), np.concatenate(mask)))
    return out


def encode_prompt(tokenizer: TextTokenizer, messages: list[dict]) -> list[int]:
    """A generation prompt tokenized exactly as training saw the same turns (BOS, each segment on its own, EOS ids
    after earlier answers), ending with "Assistant:" so the model writes the answer."""
    ids = [tokenizer.bos_id] if tokenizer.bos_id is not None else []
    for text, _ in segments(messages) + [("Assistant:", False)]:
        ids += [tokenizer.eos_id] if text == "<eos>" else tokenizer.encode(text)
    return ids
