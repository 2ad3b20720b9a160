"""TextVQA val with OCR tokens in the prompt: EvalAI's answer normalisation and the ten-answer soft score."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from aligntI.data.records import DataError
from aligntI.eval.benchmarks.common import (
    SHORT_ANSWER_PROMPT,
    BenchItem,
    Benchmark,
    BenchScore,
    bad_sample,
    category_of,
    fail,
    image_path,
    inline_reference,
    need_annotations,
    numbered,
    pct,
    question_text,
    read_json,
    user_turn,
    with_suffix,
)

OCR_PREFIX = "Reference OCR token:"  # LLaVA writes "Reference OCR token: tok1, tok2, ..." as its own line
TEXTVQA_N_ANSWERS = 10


# EvalAIAnswerProcessor's tables (LLaVA's llava/eval/m4c_evaluator.py, from MMF's processors.py). Keys with
# capitals can never match (the text is lowercased first); they are kept so the table is the same.
_CONTRACTIONS = dict(pair.split(" ") for pair in """
aint ain't|arent aren't|cant can't|couldve could've|couldnt couldn't|couldn'tve couldn't've
couldnt've couldn't've|didnt didn't|doesnt doesn't|dont don't|hadnt hadn't|hadnt've hadn't've
hadn'tve hadn't've|hasnt hasn't|havent haven't|hed he'd|hed've he'd've|he'dve he'd've|hes he's|howd how'd
howll how'll|hows how's|Id've I'd've|I'dve I'd've|Im I'm|Ive I've|isnt isn't|itd it'd|itd've it'd've
it'dve it'd've|itll it'll|let's let's|maam ma'am|mightnt mightn't|mightnt've mightn't've
mightn'tve mightn't've|mightve might've|mustnt mustn't|mustve must've|neednt needn't|notve not've
oclock o'clock|oughtnt oughtn't|ow's'at 'ow's'at|'ows'at 'ow's'at|'ow'sat 'ow's'at|shant shan't
shed've she'd've|she'dve she'd've|she's she's|shouldve should've|shouldnt shouldn't
shouldnt've shouldn't've|shouldn'tve shouldn't've|somebody'd somebodyd|somebodyd've somebody'd've
somebody'dve somebody'd've|somebodyll somebody'll|somebodys somebody's|someoned someone'd
someoned've someone'd've|someone'dve someone'd've|someonell someone'll|someones someone's
somethingd something'd|somethingd've something'd've|something'dve something'd've|somethingll something'll
thats that's|thered there'd|thered've there'd've|there'dve there'd've|therere there're|theres there's
theyd they'd|theyd've they'd've|they'dve they'd've|theyll they'll|theyre they're|theyve they've
twas 'twas|wasnt wasn't|wed've we'd've|we'dve we'd've|weve we've|werent weren't|whatll what'll
whatre what're|whats what's|whatve what've|whens when's|whered where'd|wheres where's|whereve where've
whod who'd|whod've who'd've|who'dve who'd've|wholl who'll|whos who's|whove who've|whyll why'll
whyre why're|whys why's|wont won't|wouldve would've|wouldnt wouldn't|wouldnt've wouldn't've
wouldn'tve wouldn't've|yall y'all|yall'll y'all'll|y'allll y'all'll|yall'd've y'all'd've
y'alld've y'all'd've|y'all'dve y'all'd've|youd you'd|youd've you'd've|you'dve you'd've|youll you'll
youre you're|youve you've""".replace("\n", "|").strip("|").split("|"))
_NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                 "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = frozenset(("a", "an", "the"))
_VQA_PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`",
                    ",", "?", "!")
_DIGIT_COMMA = re.compile(r"(?<=\d),+(?=\d)")
# The original pattern is r"(?!<=\d)(\.)(?!\d)": its first group is a look-ahead (not a look-behind) that
# always holds in front of a period, so it removes every period not followed by a digit. It is applied with
# re.UNICODE passed where ``count`` goes, so at most 32 periods are removed; kept.
_LONE_PERIOD = re.compile(r"\.(?!\d)")
_PERIOD_SUB_COUNT = 32


def normalize_vqa_answer(text: str) -> str:
    """EvalAI's answer processing (``EvalAIAnswerProcessor`` in LLaVA's ``llava/eval/m4c_evaluator.py``).

    1. lowercase; delete ``,`` and ``?`` (so ``1,000`` becomes ``1000``); ``'s`` becomes `` 's``;
    2. newlines/tabs to spaces;
    3. each punctuation mark is deleted when it touches a space anywhere in the text (``"yes - no"``) or a
       comma sits between digits, else replaced by a space (``e-mail`` -> ``e mail``);
    4. periods not followed by a digit are deleted (``3.5`` stays);
    5. per word: number words to digits (``two`` -> ``2``, ``none`` -> ``0``), articles dropped, missing
       apostrophes restored (``dont`` -> ``don't``).
    """
    s = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    s = s.replace("\n", " ").replace("\t", " ").strip()
    glued = _DIGIT_COMMA.search(s) is not None
    out = s
    for p in _VQA_PUNCTUATION:
        out = out.replace(p, "" if (glued or p + " " in s or " " + p in s) else " ")
    out = _LONE_PERIOD.sub("", out, count=_PERIOD_SUB_COUNT)
    words = []
    for word in out.lower().split():
        word = _NUMBER_WORDS.get(word, word)
        if word not in _ARTICLES:
            words.append(_CONTRACTIONS.get(word, word))
    return " ".join(words)


def vqa_answer_scores(answers: list[str]) -> dict[str, float]:
    """Soft score of every distinct (normalised) human answer: ``TextVQAAccuracyEvaluator`` of LLaVA's
    ``m4c_evaluator.py``. For each of the 10 humans left out in turn, an answer scores
    ``min(1, matches among the other 9 / 3)``; its score is the mean over the 10."""
    normed = [normalize_vqa_answer(a) for a in answers]
    scores = {}
    for candidate in set(normed):
        total = 0.0
        for left_out in range(len(normed)):
            matches = sum(1 for j, a in enumerate(normed) if j != left_out and a == candidate)
            total += min(1.0, matches / 3)
        scores[candidate] = total / len(normed)
    return scores


def vqa_soft_score(prediction: str, answers: list[str]) -> float:
    return vqa_answer_scores(answers).get(normalize_vqa_answer(prediction), 0.0)


def _textvqa_question(text: str) -> str:
    """The question line of a LLaVA TextVQA prompt (``eval_textvqa.py``'s prompt_processor), lowercased."""
    for line in text.split("\n"):
        line = line.strip()
        if line and not line.startswith(OCR_PREFIX) and line != SHORT_ANSWER_PROMPT:
            return line.lower()
    return ""


def _textvqa_prompt(text: str, ocr_tokens: Any) -> str:
    if OCR_PREFIX in text or not isinstance(ocr_tokens, list):
        return with_suffix(text, SHORT_ANSWER_PROMPT)  # kept byte for byte (an empty OCR line ends in a space)
    body = text.rstrip()
    if body.endswith(SHORT_ANSWER_PROMPT):
        body = body[: -len(SHORT_ANSWER_PROMPT)].rstrip()
    return f"{body}\n{OCR_PREFIX} {', '.join(str(t) for t in ocr_tokens)}\n{SHORT_ANSWER_PROMPT}"


def read_questions(data: Path, images: Path | None, annotations: Path | None, max_samples: int | None):
    """TextVQA val with OCR tokens in the prompt, as LLaVA-1.5 runs it (``llava_textvqa_val_v051_ocr.jsonl``
    through ``model_vqa_loader.py``, scored by ``eval_textvqa.py``).

    LLaVA's file uses the image id as ``question_id`` and finds the annotation by (image id, lowercased
    question); that is the first lookup here, then (image file stem, question), then the TextVQA question id.
    A prompt without a ``Reference OCR token:`` line gets one (``", "``-joined tokens, before the suffix) when
    the record or the annotation has ``ocr_tokens``, as LLaVA's file has it.
    """
    by_pair: dict | None = None
    by_qid: dict | None = None
    items = []
    for rec, sid in numbered(data, max_samples):
        qid = rec["question_id"]
        text = question_text(rec, data, sid)
        image = image_path(rec, images, data, sid)
        ref, where = inline_reference(rec), data
        ocr = rec.get("ocr_tokens")
        meta: dict[str, Any] = {"question_id": qid}
        if ref is None:
            path = need_annotations(annotations, data, sid, "TextVQA_0.5.1_val.json")
            if by_pair is None:
                blob = read_json(path)
                entries = blob.get("data") if isinstance(blob, dict) else blob
                if not isinstance(entries, list):
                    raise DataError(path, "expected TextVQA's {'data': [...]} annotations")
                by_pair, by_qid = {}, {}
                for e in entries:
                    if isinstance(e, dict) and isinstance(e.get("question"), str):
                        by_pair[(str(e.get("image_id")), e["question"].strip().lower())] = e
                        by_qid[str(e.get("question_id"))] = e
            question = _textvqa_question(text)
            entry = (by_pair.get((str(qid), question)) or by_pair.get((Path(rec["image"]).stem, question)))
            if entry is None:
                entry = by_qid.get(str(qid))
                if entry is not None and entry["question"].strip().lower() != question:
                    raise fail(path, sid, f"question id {qid} is {entry['question']!r} in the annotations "
                                           f"but {question!r} in {data}")
            if entry is None:
                raise fail(path, sid, f"no annotation for image {qid!r} / question {question!r} (from {data})")
            ref, where = entry.get("answers"), path
            if ocr is None:
                ocr = entry.get("ocr_tokens")
            meta["textvqa_question_id"] = entry.get("question_id")
        if (not isinstance(ref, list) or len(ref) != TEXTVQA_N_ANSWERS
                or not all(isinstance(a, str) for a in ref)):
            raise fail(where, sid, f"TextVQA reference must be a list of {TEXTVQA_N_ANSWERS} answer strings, "
                                    f"got {ref!r}")
        items.append(BenchItem(id=sid, question=user_turn(_textvqa_prompt(text, ocr), True), image=image,
                               reference=list(ref), category=category_of(rec), meta=meta))
    return items


def score_answers(items: list[BenchItem], preds: dict[str, str]) -> BenchScore:
    """TextVQA val accuracy: LLaVA's ``llava/eval/eval_textvqa.py`` with ``TextVQAAccuracyEvaluator`` of
    ``m4c_evaluator.py`` (EvalAI normalisation, ten-answer leave-one-out soft score)."""
    per, total = {}, 0.0
    for it in items:
        ref = it.reference
        if not isinstance(ref, list) or len(ref) != TEXTVQA_N_ANSWERS:
            raise bad_sample("textvqa", it, f"reference must be {TEXTVQA_N_ANSWERS} answers, got {ref!r}")
        parsed = normalize_vqa_answer(preds[it.id])
        score = vqa_answer_scores(ref).get(parsed, 0.0)
        per[it.id] = {"parsed": parsed, "score": score}
        total += score
    acc = pct(total, len(items))
    return BenchScore("textvqa", acc, {"accuracy": acc}, len(items), per)


def detail(s: BenchScore) -> str:
    return f"TextVQA: {s.score:.2f}% VQA soft accuracy (n={s.n})"


BENCHMARK = Benchmark("textvqa", "TextVQA", read_questions, score_answers, detail)
