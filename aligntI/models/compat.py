"""Start-up checks that a teacher and a student can be distilled together.

KD compares the two models position by position and logit by logit, so both must read the same token ids,
the same rendered prompt and the same image-token layout. A mismatch does not crash: it silently trains
the student towards a teacher that saw something else. These checks run before the first step and refuse
with a message naming both models, the failed check and the differing values.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from aligntI.data.formatting import load_chat_template
from aligntI.models.loading import num_image_tokens

SHOW = 5  # differing ids / settings quoted in a message
PROBE_SIZE = (37, 29)  # (width, height) of the probe image: not square, not a model size, so resizing runs
LAYOUT_FIELDS = ("vision_feature_select_strategy", "vision_feature_layer")


class IncompatibleModelsError(ValueError):
    """Teacher and student differ where KD needs them identical; ``failures`` is [(check, detail), ...]."""

    def __init__(self, failures: list[tuple[str, str]], teacher_path: str | None = None,
                 student_path: str | None = None):
        self.failures = list(failures)
        self.teacher_path, self.student_path = teacher_path, student_path
        who = (f"teacher {teacher_path} and student {student_path}" if teacher_path or student_path
               else "teacher and student")
        lines = [f"{who} cannot be distilled together (they must share token ids, chat template and "
                 f"image-token layout):"]
        lines += [f"  [{check}] {detail}" for check, detail in self.failures]
        super().__init__("\n".join(lines))


@dataclass(frozen=True)
class SharedVocab:
    size: int  # logits of both models are sliced to [..., :size]
    token_ids: int  # ids 0..token_ids-1 are tokens of both tokenizers; the rows past them are padding
    teacher_rows: int  # model config vocab_size (embedding rows) of each
    student_rows: int
    note: str  # one line for the log: what was sliced and why, or "same vocabulary size"


def check_compatible(teacher_processor, student_processor, teacher_config, student_config,
                     teacher_path: str, student_path: str, chat_template: str | None = None) -> SharedVocab:
    """Run every check, report all failures at once (one fix-and-retry round), return the shared vocab."""
    checks = [
        lambda: check_token_ids(teacher_processor, student_processor),
        lambda: check_chat_template(teacher_processor, student_processor, chat_template),
        lambda: check_image_placeholder(teacher_processor, student_processor, teacher_config, student_config),
        lambda: check_image_layout(teacher_processor, student_processor, teacher_config, student_config),
    ]
    failures: list[tuple[str, str]] = []
    for check in checks:
        try:
            check()
        except IncompatibleModelsError as err:
            failures += err.failures
    shared = None
    try:
        shared = check_vocab_rows(teacher_processor, student_processor, teacher_config, student_config)
    except IncompatibleModelsError as err:
        failures += err.failures
    if failures:
        raise IncompatibleModelsError(failures, teacher_path, student_path)
    return shared


# --- 1. token ids ---------------------------------------------------------------------------------------

def _tokenizer(processor_or_tokenizer):
    return getattr(processor_or_tokenizer, "tokenizer", processor_or_tokenizer)


def _id_to_token(tokenizer) -> dict[int, str]:
    return {i: t for t, i in tokenizer.get_vocab().items()}


def _num_ids(tokenizer, id_to_token: dict[int, str]) -> int:
    """Ids the tokenizer can emit: ``len`` normally, more if an added token sits past it."""
    return max(len(tokenizer), max(id_to_token) + 1)


def _image_token_id(processor) -> int | None:
    if getattr(processor, "image_token_id", None) is not None:
        return processor.image_token_id
    token = getattr(processor, "image_token", None)
    return None if token is None else _tokenizer(processor).convert_tokens_to_ids(token)


def check_token_ids(teacher_processor, student_processor) -> None:
    """Every id both tokenizers define must be the same token, and the special tokens the pipeline uses
    (image, pad, bos, eos) the same ids: data is tokenised once and fed to both models. Ids past the
    shorter tokenizer are not compared; ``check_vocab_rows`` bounds them and notes them for the log."""
    tok_t, tok_s = _tokenizer(teacher_processor), _tokenizer(student_processor)
    inv_t, inv_s = _id_to_token(tok_t), _id_to_token(tok_s)
    shared = min(_num_ids(tok_t, inv_t), _num_ids(tok_s, inv_s))
    differ = [i for i in range(shared) if inv_t.get(i) != inv_s.get(i)]
    failures = []
    if differ:
        shown = ", ".join(f"id {i}: teacher {inv_t.get(i)!r} / student {inv_s.get(i)!r}"
                          for i in differ[:SHOW])
        failures.append(("token ids", f"{len(differ)} of the {shared} shared ids map to different tokens; "
                                      f"first: {shown}"))
    specials = {
        "image": (_image_token_id(teacher_processor), _image_token_id(student_processor)),
        "pad": (tok_t.pad_token_id, tok_s.pad_token_id),
        "bos": (tok_t.bos_token_id, tok_s.bos_token_id),
        "eos": (tok_t.eos_token_id, tok_s.eos_token_id),
    }
    bad = [f"{name} token id teacher {t} ({inv_t.get(t)!r}) / student {s} ({inv_s.get(s)!r})"
           for name, (t, s) in specials.items() if t != s]
    if bad:
        failures.append(("special tokens", "; ".join(bad)))
    if failures:
        raise IncompatibleModelsError(failures)


# --- 2. chat template and image placeholder -------------------------------------------------------------

def _first_difference(a: str, b: str) -> str:
    """The first differing line of two templates, cut around the first differing character."""
    la, lb = a.splitlines(), b.splitlines()
    for n in range(max(len(la), len(lb))):
        x = la[n] if n < len(la) else None
        y = lb[n] if n < len(lb) else None
        if x is None or y is None:
            ended = "teacher" if x is None else "student"
            return f"first differing line {n + 1}: the {ended} template has ended"
        if x != y:
            col = next((i for i, (u, v) in enumerate(zip(x, y)) if u != v), min(len(x), len(y)))
            start = max(0, col - 40)
            where = f"line {n + 1}" + (f", from column {start + 1}" if start else "")
            x, y = x[start:start + 100], y[start:start + 100]
            return f"first differing {where}: teacher {x!r} / student {y!r}"
    return "they differ only in line endings or a trailing newline"


def check_chat_template(teacher_processor, student_processor, chat_template: str | None = None) -> None:
    """Both models must read the same rendered prompt. A recipe template (``data.chat_template``) is used
    for both, so then there is nothing to compare; otherwise the processors' own templates must be equal."""
    if chat_template is not None:
        load_chat_template(chat_template)  # a wrong name / path fails here, before any model work
        return
    tpl_t = getattr(teacher_processor, "chat_template", None)
    tpl_s = getattr(student_processor, "chat_template", None)
    if tpl_t is None or tpl_s is None:
        missing = " and ".join(n for n, t in (("teacher", tpl_t), ("student", tpl_s)) if t is None)
        raise IncompatibleModelsError([("chat template", f"the {missing} processor has no chat template; "
                                         "set data.chat_template to a shipped name or a .jinja path")])
    if tpl_t != tpl_s:
        raise IncompatibleModelsError([("chat template", f"the processors' chat templates differ "
                                         f"({_first_difference(tpl_t, tpl_s)}); "
                                         "set data.chat_template to use one template for both")])


def check_image_placeholder(teacher_processor, student_processor, teacher_config, student_config) -> None:
    """Same placeholder string and image-token id everywhere: the processor expands the string into that id
    and each model scatters its image features into the positions holding ``config.image_token_id``."""
    token_t = getattr(teacher_processor, "image_token", None)
    token_s = getattr(student_processor, "image_token", None)
    bad = []
    if token_t != token_s:
        bad.append(f"processor image_token teacher {token_t!r} / student {token_s!r}")
    if teacher_config.image_token_id != student_config.image_token_id:
        bad.append(f"config image_token_id teacher {teacher_config.image_token_id} / "
                   f"student {student_config.image_token_id}")
    for name, proc, token, cfg in (("teacher", teacher_processor, token_t, teacher_config),
                                   ("student", student_processor, token_s, student_config)):
        pid = _image_token_id(proc)
        if pid != cfg.image_token_id:
            bad.append(f"{name} processor expands {token!r} to id {pid} but its config image_token_id is "
                       f"{cfg.image_token_id}")
    if bad:
        raise IncompatibleModelsError([("image placeholder", "; ".join(bad))])


# --- 3. image-token layout ------------------------------------------------------------------------------

def probe_image() -> Image.Image:
    """A fixed random RGB image whose size matches no model, so resizing and cropping are exercised."""
    width, height = PROBE_SIZE
    pixels = np.random.default_rng(0).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def _settings_diff(ip_t, ip_s) -> str:
    d_t, d_s = ip_t.to_dict(), ip_s.to_dict()
    keys = [k for k in sorted(set(d_t) | set(d_s)) if not k.startswith("_") and d_t.get(k) != d_s.get(k)]
    if type(ip_t) is not type(ip_s):
        keys.insert(0, "class")
        d_t["class"], d_s["class"] = type(ip_t).__name__, type(ip_s).__name__
    return "; ".join(f"{k} teacher {d_t.get(k)!r} / student {d_s.get(k)!r}" for k in keys[:SHOW])


def check_image_layout(teacher_processor, student_processor, teacher_config, student_config) -> None:
    """One image must give both models the same pixel values and the same number of image tokens, and the
    configs must pick the same vision features: the data pipeline preprocesses each image once."""
    ip_t, ip_s = teacher_processor.image_processor, student_processor.image_processor
    image = probe_image()
    pv_t = ip_t(images=[image], return_tensors="pt")["pixel_values"]
    pv_s = ip_s(images=[image], return_tensors="pt")["pixel_values"]
    bad = []
    settings = _settings_diff(ip_t, ip_s)
    hint = f" (image processor settings: {settings})" if settings else ""
    if pv_t.shape != pv_s.shape:
        bad.append(f"pixel_values of a {PROBE_SIZE[0]}x{PROBE_SIZE[1]} probe image have shape teacher "
                   f"{tuple(pv_t.shape)} / student {tuple(pv_s.shape)}{hint}")
    elif not torch.allclose(pv_t.double(), pv_s.double(), rtol=0.0, atol=1e-6):
        diff = (pv_t.double() - pv_s.double()).abs().max().item()
        bad.append(f"pixel_values of a {PROBE_SIZE[0]}x{PROBE_SIZE[1]} probe image differ (same shape "
                   f"{tuple(pv_t.shape)}, max abs difference {diff:.3g}){hint}")
    n_t, n_s = num_image_tokens(teacher_processor), num_image_tokens(student_processor)
    if n_t != n_s:
        bad.append(f"image tokens per image teacher {n_t} / student {n_s}")
    for name in LAYOUT_FIELDS:
        v_t, v_s = getattr(teacher_config, name, None), getattr(student_config, name, None)
        if v_t != v_s:
            bad.append(f"config {name} teacher {v_t!r} / student {v_s!r}")
    if bad:
        raise IncompatibleModelsError([("image layout", "; ".join(bad))])


# --- 4. vocabulary rows ---------------------------------------------------------------------------------

def check_vocab_rows(teacher_processor, student_processor, teacher_config, student_config) -> SharedVocab:
    """Logits are compared on the rows both models have. Rows past a tokenizer's ids are padding (e.g.
    Qwen2.5-7B 152,064 vs 0.5B 151,936, all ids < 151,665), so slicing them off is harmless; cutting off
    a real token is not."""
    rows_t = teacher_config.get_text_config().vocab_size
    rows_s = student_config.get_text_config().vocab_size
    size = min(rows_t, rows_s)
    tok_t, tok_s = _tokenizer(teacher_processor), _tokenizer(student_processor)
    inv_t, inv_s = _id_to_token(tok_t), _id_to_token(tok_s)
    n_t, n_s = _num_ids(tok_t, inv_t), _num_ids(tok_s, inv_s)
    over: dict[str, list[str]] = {}  # message -> tokenizers it applies to (often both: say it once)
    for name, inv, n in (("teacher", inv_t, n_t), ("student", inv_s, n_s)):
        if n > size:
            cut = ", ".join(f"{i} {inv.get(i)!r}" for i in range(size, min(n, size + SHOW)))
            over.setdefault(f"{n} ids but the shared vocab rows are {size} (teacher {rows_t}, student "
                            f"{rows_s}): real tokens would be cut off, first: {cut}", []).append(name)
    if over:
        detail = "; ".join(f"the {' and '.join(names)} tokenizer{'s' if len(names) > 1 else ''} "
                           f"ha{'ve' if len(names) > 1 else 's'} {msg}" for msg, names in over.items())
        raise IncompatibleModelsError([("vocab rows", detail)])
    n_ids = max(n_t, n_s)
    if rows_t == rows_s:
        note = "same vocabulary size"
    else:
        note = (f"vocab rows differ (teacher {rows_t}, student {rows_s}): logits sliced to the shared "
                f"{size}; all {n_ids} tokenizer ids are below it")
    if n_t != n_s:
        longer = "teacher" if n_t > n_s else "student"
        note += f"; ids {min(n_t, n_s)}..{n_ids - 1} exist only in the {longer} tokenizer"
    return SharedVocab(size=size, token_ids=min(n_t, n_s), teacher_rows=rows_t, student_rows=rows_s, note=note)
