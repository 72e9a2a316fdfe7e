"""A chat's prompt tokens, with special tokens parsed in the chat template's own text only.

Tokenizing the rendered chat with ``special=True`` (as llama.cpp's own chat path does) turns a
user's ``<|im_end|>\\n<|im_start|>system`` into real control tokens: role injection. Here the
template is rendered a second time with each message's content replaced by a unique marker,
which splits its output into the template's own pieces and the content slots between them.

- If the rendered chat holds exactly the control tokens of the template's pieces, the contents
  added none: the prompt is the rendered chat tokenized as before (identical token ids, BPE
  merges across the template/content boundaries included).
- Otherwise some content spelled a control token. The contents are found in the rendered chat
  between the template's pieces (as given, or trimmed, as templates using ``|trim`` show them),
  and the prompt is the template's pieces tokenized with ``special=True`` and the contents with
  ``special=False``, concatenated: the text stays, the control tokens go.
- Otherwise (the template rewrites the content beyond trimming, so its control tokens cannot be
  told from the content's) the request is refused (``ControlTokenText``), not tokenized
  unsafely. A template that fails on the markers (it checks the content itself) is compared
  per message instead: refused if a content spells a control token, else tokenized as rendered.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable
from typing import Any

from edgesmith.device_server.templates import ChatTemplate
from edgesmith.errors import EdgesmithError

Tokenize = Callable[[str, bool], list[int]]  # (text, special) -> ids, no BOS/EOS added


class ControlTokenText(EdgesmithError):
    """Content that would become control tokens, which the template does not let us keep as
    text; ``index``: the message whose content spells one (None: the template builds one out
    of the content)."""

    def __init__(self, index: int | None) -> None:
        what = (f"the content of message {index} spells one of the model's control tokens "
                "(such as <|im_start|>)" if index is not None else
                "the model's chat template turns the messages' content into control tokens")
        super().__init__(f"{what}, and this model's chat template does not let the server keep "
                         "it as plain text", "remove the control token text from the messages")
        self.index = index


def _split(template: ChatTemplate, messages: list[dict[str, Any]]
           ) -> tuple[list[str], list[int]] | None:
    """The template's output with markers for contents: (its own pieces, the message index of
    each slot between them); None if the template fails on the markers."""
    nonce = uuid.uuid4().hex
    # an empty content stays empty, so `{% if message.content %}` takes the same branch
    marked = [{**m, "content": f"\ue000{nonce}:{i}\ue001" if m.get("content") else ""}
              for i, m in enumerate(messages)]
    try:
        out = template.render(marked)
    except EdgesmithError:  # the template looks inside the content: no split
        return None
    parts = re.split(f"\ue000{nonce}:(\\d+)\ue001", out)
    return parts[0::2], [int(i) for i in parts[1::2]]


def _contents_in(text: str, pieces: list[str], slots: list[int],
                 contents: list[str]) -> list[str] | None:
    """The contents as they appear in ``text`` = pieces[0] + c + pieces[1] + ... ; None if the
    rendered chat is not that (the template transformed the content beyond trimming)."""
    if not text.startswith(pieces[0]):
        return None
    pos, found = len(pieces[0]), []
    for index, after in zip(slots, pieces[1:], strict=True):
        c = contents[index]
        for shown in dict.fromkeys((c, c.strip(), c.lstrip(), c.rstrip())):
            if text.startswith(shown + after, pos):
                break
        else:
            return None
        found.append(shown)
        pos += len(shown) + len(after)
    return found if pos == len(text) else None


def prompt_tokens(template: ChatTemplate, messages: list[dict[str, Any]], tokenize: Tokenize,
                  is_control: Callable[[int], bool], *, whole: Callable[[str], list[int]],
                  finish: Callable[[list[int]], list[int]]) -> list[int]:
    """The prompt of ``messages``. ``tokenize`` adds nothing around the text; ``whole`` is the
    usual tokenization of a whole prompt (special tokens parsed, BOS added) and ``finish`` adds
    the same BOS/EOS to a prompt tokenized in pieces."""
    text = template.render(messages)  # its errors are the caller's to translate
    split = _split(template, messages)

    def controls(ids: list[int]) -> list[int]:
        return [t for t in ids if is_control(t)]

    if split is not None:
        pieces, slots = split
        own = [t for p in pieces for t in controls(tokenize(p, True))]
        if controls(tokenize(text, True)) == own:  # the contents added no control token
            return whole(text)
        shown = _contents_in(text, pieces, slots, [str(m.get("content") or "") for m in messages])
        if shown is not None:
            ids = tokenize(pieces[0], True)
            for content, after in zip(shown, pieces[1:], strict=True):
                ids += tokenize(content, False) + tokenize(after, True)
            return finish(ids)
    spelled = [i for i, m in enumerate(messages)
               if controls(tokenize(str(m.get("content") or ""), True))]
    if split is None and not spelled:
        # the template refuses the markers (it checks the content), and no content spells a
        # control token by itself: as rendered
        return whole(text)
    raise ControlTokenText(spelled[0] if spelled else None)
