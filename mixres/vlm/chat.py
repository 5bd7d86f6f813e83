"""Conversations (LLaVA's `conversations` list) -> text segments, trained or not.

    [{"from": "human", "value": "<image>\\nWhat is it?"}, {"from": "gpt", "value": "A cat."}]

With a tokenizer that has a chat template, the conversation is rendered by it, and each
assistant turn's share of the rendering (its text and the template's end-of-turn marks)
is the trained part: the rendering up to turn k with the generation prompt is the
untrained prefix, the rendering through turn k the trained rest. Without a template the
turns are joined plainly: every non-assistant turn is followed by a newline, every
assistant turn but the last by a trained newline (the last one ends with <eos>).
Loss falls only on assistant turns either way.
"""

from __future__ import annotations

__all__ = ["ROLES", "to_messages", "conversation_segments"]

# LLaVA's "from" names and the chat-template "role" names
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
         "system": "system"}


def to_messages(turns, where: str = "conversations") -> list[dict]:
    """LLaVA turns ({"from", "value"}) or chat messages ({"role", "content"}) -> messages."""
    if not isinstance(turns, list) or not turns:
        raise ValueError(f"{where}: expected a non-empty list of turns")
    out = []
    for i, t in enumerate(turns):
        if not isinstance(t, dict):
            raise ValueError(f"{where}[{i}]: expected an object, got {type(t).__name__}")
        who, text = t.get("from", t.get("role")), t.get("value", t.get("content"))
        if who not in ROLES:
            raise ValueError(f"{where}[{i}]: 'from' must be one of {sorted(ROLES)}, got {who!r}")
        if not isinstance(text, str):
            raise ValueError(f"{where}[{i}]: 'value' must be a string")
        out.append({"role": ROLES[who], "content": text})
    if not any(m["role"] == "assistant" for m in out):
        raise ValueError(f"{where}: no gpt/assistant turn, nothing to train on")
    return out


def conversation_segments(tokenizer, turns, where: str = "conversations") -> list[tuple[str, bool]]:
    """[(text, trained), ...] whose concatenation is the rendered conversation."""
    msgs = to_messages(turns, where)
    if tokenizer.chat_template:
        segs, done = [], ""
        for k, m in enumerate(msgs):
            if m["role"] != "assistant":
                continue
            before = tokenizer.render_chat(msgs[:k], add_generation_prompt=True)
            through = tokenizer.render_chat(msgs[:k + 1], add_generation_prompt=False)
            if not (before.startswith(done) and through.startswith(before)):
                raise ValueError(f"{where}: the tokenizer's chat template does not render a "
                                 f"conversation as a growing prefix; cannot tell assistant turns apart")
            segs += [(before[len(done):], False), (through[len(before):], True)]
            done = through
        return segs
    segs = []
    last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
    for i, m in enumerate(msgs):
        if i > last:
            break
        if m["role"] == "assistant":
            segs.append((m["content"] + ("\n" if i < last else ""), True))
        else:
            segs.append((m["content"] + "\n", False))
    return segs
