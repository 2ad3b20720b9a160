"""Conversation → token ids and the position masks every loss needs.

The text is rendered by the processor's chat template, never by string surgery. To know which
characters came from which message, the template is rendered once more with each message replaced by
a sentinel; the two renders must agree, so a template that edits message text is refused rather than
mis-labelled. Tokens are then classified by their character offsets:

* **response**: what the model must generate after the template's generation prompt: from the end of
  the prompt rendered for the turns before it to the end of the answer, plus the special token the
  template closes the turn with (end-of-turn);
* **instruction**: the user's own text in turns that come after the image, minus the ``<image>``
  placeholder and surrounding whitespace (no system prompt, no role tags);
* **vision**: the image-token ids, expanded to the number of visual tokens per image, exactly as the
  processor expands them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from aligntI.config import ConfigError
from aligntI.data.records import json_type

IMAGE_PLACEHOLDER = "<image>"  # what LLaVA-format data writes where the image goes
ROLE_OF = {"human": "user", "gpt": "assistant", "system": "system"}


class FormatError(ValueError):
    """A sample cannot be formatted; the message says why (the caller adds file and id)."""


class TooLongError(FormatError):
    """A sample cannot be cut to ``max_length`` without cutting through image or prompt tokens."""


def load_chat_template(name_or_path: str) -> str:
    """A shipped template by name (``llava_v1``, ``llava_v1_compact``) or a ``.jinja`` file path.

    A name or file that is not there is a :class:`ConfigError`: it comes from a recipe key or a CLI flag.
    """
    path = Path(name_or_path)
    if path.suffix == ".jinja":
        if not path.is_file():
            raise ConfigError(f"chat template file not found: {path}")
        try:
            return path.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            raise ConfigError(f"chat template {path}: not valid UTF-8 at byte {err.start}") from None
    shipped = resources.files("aligntI.data") / "templates" / f"{name_or_path}.jinja"
    if not shipped.is_file():
        names = sorted(p.name.removesuffix(".jinja") for p in (resources.files("aligntI.data") / "templates").iterdir())
        raise ConfigError(f"unknown chat template {name_or_path!r}; shipped: {names}, or give a .jinja path")
    return shipped.read_text()


def to_messages(conversations) -> tuple[list[dict], int]:
    """LLaVA ``conversations`` → chat messages; returns them and the number of ``<image>`` tags.

    Checks each turn's shape, the role order and that no turn is empty: an empty answer would train the
    model to stop at once, an empty question asks nothing. A human turn may be only ``<image>``.
    """
    if not isinstance(conversations, list) or not conversations:
        got = "an empty array" if conversations == [] else f"a JSON {json_type(conversations)}"
        raise FormatError(f"'conversations' must be a non-empty list of turns, got {got}")
    messages, n_images = [], 0
    for i, turn in enumerate(conversations):
        messages.append({"role": _role(i, turn), "content": _text(i, turn)})
    roles = [m["role"] for m in messages]
    body = roles[1:] if roles[0] == "system" else roles
    expected = ["user", "assistant"] * (len(body) // 2)
    if len(body) < 2 or len(body) % 2 or body != expected:
        raise FormatError("roles must alternate human, gpt, ... and end with gpt (optionally after one system turn); "
                          f"got {[t['from'] for t in conversations]}")
    for i, m in enumerate(messages):
        count = m["content"].count(IMAGE_PLACEHOLDER)
        if count and m["role"] != "user":
            raise FormatError(f"turn {i} ({m['role']}) contains {IMAGE_PLACEHOLDER}; only human turns may")
        if not count and not m["content"].strip():
            need = ": an answer needs text" if m["role"] == "assistant" else ""
            raise FormatError(f"turn {i} ({conversations[i]['from']}) is empty{need}")
        n_images += count
    return messages, n_images


def _role(i: int, turn) -> str:
    if not isinstance(turn, dict):
        raise _bad_turn(i, f"it is a JSON {json_type(turn)}")
    if not isinstance(turn.get("from"), str):
        raise _bad_turn(i, "it has no 'from'" if "from" not in turn else f"its 'from' is a JSON {json_type(turn['from'])}")
    role = ROLE_OF.get(turn["from"])
    if role is None:
        raise FormatError(f"turn {i} has unknown role {turn['from']!r} (expected human, gpt or system)")
    return role


def _text(i: int, turn: dict) -> str:
    if "value" not in turn:
        raise _bad_turn(i, "it has no 'value'")
    value = turn["value"]
    if not isinstance(value, str):
        raise _bad_turn(i, f"its 'value' is a JSON {json_type(value)} {json.dumps(value)[:40]}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:  # a lone surrogate escape such as \ud800: valid JSON, not text
        raise FormatError(f"turn {i}: 'value' holds an unpaired surrogate {value[err.start]!r} at character "
                          f"{err.start}; it is not valid Unicode") from None
    return value


def _bad_turn(i: int, detail: str) -> FormatError:
    return FormatError(f"turn {i} must be an object with string 'from' and 'value'; {detail}")


@dataclass
class Encoded:
    """One sample as arrays of equal length (no padding yet)."""

    input_ids: np.ndarray  # int64 [L]
    vision_mask: np.ndarray  # bool [L]
    instruction_mask: np.ndarray  # bool [L]
    response_mask: np.ndarray  # bool [L]
    truncated: bool = False

    @property
    def labels(self) -> np.ndarray:
        """int64 [L]: the token where it is a response position, -100 elsewhere."""
        return np.where(self.response_mask, self.input_ids, -100)


class ConversationEncoder:
    """Renders, tokenises and labels conversations for one tokenizer, template and image-token count."""

    def __init__(self, tokenizer, chat_template: str, image_token: str, image_token_id: int,
                 num_image_tokens: int, max_length: int):
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.image_token = image_token
        self.image_token_id = image_token_id
        self.num_image_tokens = num_image_tokens
        self.max_length = max_length
        self.special_ids = set(tokenizer.all_special_ids)

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        return self.tokenizer.apply_chat_template(
            messages, chat_template=self.chat_template, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        """Token ids of a generation prompt (for evaluation), images expanded like in training."""
        text = self.render(self._with_image_token(messages), add_generation_prompt=True)
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return self._expand_images(np.asarray(ids, dtype=np.int64))[0].tolist()

    def encode(self, messages: list[dict]) -> Encoded:
        messages = self._with_image_token(messages)
        text, spans = self._render_with_spans(messages)
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = np.asarray(enc["input_ids"], dtype=np.int64)
        offsets = np.asarray(enc["offset_mapping"], dtype=np.int64).reshape(-1, 2)
        starts, ends = offsets[:, 0], offsets[:, 1]

        response = np.zeros(len(ids), dtype=bool)
        instruction = np.zeros(len(ids), dtype=bool)
        is_image = ids == self.image_token_id
        first_image = int(np.argmax(is_image)) if is_image.any() else None
        for kind, a, b in spans:
            hit = (starts < b) & (ends > a) & (ends > starts)
            if kind == "instruction":
                instruction |= hit
            else:
                if not hit.any():
                    continue
                response |= hit
                close = int(np.nonzero(hit)[0][-1]) + 1
                if close >= len(ids) or int(ids[close]) not in self.special_ids:
                    raise FormatError(
                        "the chat template must close each assistant turn with a special end-of-turn token "
                        f"right after the answer; found {self.tokenizer.decode(ids[close:close + 1])!r}"
                    )
                response[close] = True
        instruction &= ~is_image
        if first_image is None:
            instruction[:] = False  # no image: no instruction-to-vision interaction to align
        else:
            instruction[:first_image] = False  # turns before the image cannot see it

        ids, expand = self._expand_images(ids)
        response, instruction = response[expand], instruction[expand]
        out = Encoded(ids, ids == self.image_token_id, instruction, response)
        return self._truncate(out) if len(ids) > self.max_length else out

    # -- internals

    def _with_image_token(self, messages: list[dict]) -> list[dict]:
        if self.image_token == IMAGE_PLACEHOLDER:
            return messages
        return [{**m, "content": m["content"].replace(IMAGE_PLACEHOLDER, self.image_token)} for m in messages]

    def _render_with_spans(self, messages: list[dict]) -> tuple[str, list[tuple[str, int, int]]]:
        sentinels = [f"\x00{i}\x00" for i in range(len(messages))]
        marked = self.render([{**m, "content": s} for m, s in zip(messages, sentinels)])
        spans, prompts, cursor, pieces = [], [], 0, []
        for i, (m, s) in enumerate(zip(messages, sentinels)):
            at = marked.find(s, cursor)
            if at < 0:
                raise FormatError(f"the chat template dropped message {i} ({m['role']})")
            pieces.append(marked[cursor:at])
            start = sum(len(p) for p in pieces)
            pieces.append(m["content"])
            cursor = at + len(s)
            if m["role"] == "user":
                for a, b in _text_spans(m["content"], self.image_token):
                    spans.append(("instruction", start + a, start + b))
            elif m["role"] == "assistant":
                prompt = self.render(messages[:i], add_generation_prompt=True)
                prompts.append(prompt)
                spans.append(("response", len(prompt), start + len(m["content"])))
        pieces.append(marked[cursor:])
        text = "".join(pieces)
        plain = self.render(messages)
        if text != plain:
            raise FormatError("the chat template changes message text (e.g. strips it); it cannot be labelled exactly")
        if not all(plain.startswith(prompt) for prompt in prompts):
            raise FormatError("the chat template's generation prompt is not a prefix of the rendered conversation")
        return text, spans

    def _expand_images(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Repeat each image token ``num_image_tokens`` times; also return the index map for masks."""
        repeats = np.where(ids == self.image_token_id, self.num_image_tokens, 1)
        index = np.repeat(np.arange(len(ids)), repeats)
        return ids[index], index

    def _truncate(self, enc: Encoded) -> Encoded:
        """Cut to at most ``max_length`` where the kept part ends on a response token."""
        limit = self.max_length
        cut = limit
        while cut > 0 and not enc.response_mask[cut - 1]:
            cut -= 1
        if cut == 0 or enc.vision_mask[cut:].any():
            raise TooLongError(
                f"{len(enc.input_ids)} tokens exceed max_length {limit} and no cut inside an answer keeps "
                "every image token and at least one answer token"
            )
        keep = slice(0, cut)
        return Encoded(enc.input_ids[keep], enc.vision_mask[keep], enc.instruction_mask[keep],
                       enc.response_mask[keep], truncated=True)


def _text_spans(content: str, image_token: str) -> list[tuple[int, int]]:
    """Character spans of the words in ``content`` around the image token (whitespace trimmed)."""
    spans, pos = [], 0
    for piece in content.split(image_token):
        stripped = piece.strip()
        if stripped:
            a = pos + piece.index(stripped)
            spans.append((a, a + len(stripped)))
        pos += len(piece) + len(image_token)
    return spans
