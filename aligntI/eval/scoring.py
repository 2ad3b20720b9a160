"""Answer normalisation, answer extraction and the scorers of the six LLaVA-1.5 benchmarks, plus the score table.

Each scorer reproduces the script behind the numbers LLaVA-1.5-style papers report; its docstring names the
script. Generated text is stripped of surrounding whitespace first, as LLaVA's generation scripts
(``model_vqa_loader.py``, ``model_vqa_science.py``, ``model_vqa_mmbench.py``) strip what they write.
All accuracies in ``metrics`` are percentages (0-100); MME's are its own points (0-2000 perception).
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field

from aligntI.eval.benchmarks import (
    BENCHMARKS,
    MMBENCH_CIRCULAR_MOD,
    MME_COGNITION,
    MME_PERCEPTION,
    POPE_SPLITS,
    SQA_OPTIONS,
    TEXTVQA_N_ANSWERS,
    TITLES,
    BenchItem,
)


@dataclass
class BenchScore:
    """``score`` is the number a paper's table reports; everything else is in ``metrics``."""

    name: str
    score: float
    metrics: dict
    n: int
    per_sample: dict[str, dict] = field(default_factory=dict)

    @property
    def title(self) -> str:
        return TITLES.get(self.name, self.name)

    def to_json(self) -> dict:
        return {"name": self.name, "title": self.title, "score": self.score, "n": self.n,
                "metrics": self.metrics, "per_sample": self.per_sample}


# ------------------------------------------------------------------------- EvalAI answer normalisation (VQA)

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


# ------------------------------------------------------------------------------------ answer extraction


def parse_gqa_answer(text: str) -> str:
    """LLaVA's ``scripts/convert_gqa_for_eval.py``: trailing periods stripped, lowercased."""
    return text.strip().rstrip(".").lower()


_SQA_ANSWER_IS = re.compile(r"The answer is ([A-Z]).")


def parse_sqa_letter(text: str, n_choices: int = len(SQA_OPTIONS)) -> str | None:
    """LLaVA-1.5's ``llava/eval/eval_science_qa.py``: the text is one option letter, or starts with a letter
    and ``". "``, or holds exactly one ``The answer is X.``; the letter must be one of the question's
    choices. Anything else (``"B."`` alone too) is ``None`` and counts wrong."""
    t = text.strip()
    if t in SQA_OPTIONS:
        letter = t
    elif len(t) >= 3 and t[0] in SQA_OPTIONS and t[1:3] == ". ":
        letter = t[0]
    else:
        found = _SQA_ANSWER_IS.findall(t)
        letter = found[0] if len(found) == 1 else None
    return letter if letter in SQA_OPTIONS[:n_choices] else None


def parse_pope_answer(text: str) -> str:
    """LLaVA's ``llava/eval/eval_pope.py``: keep the text before the first period, delete commas, split on
    spaces; the words ``No``, ``no`` or ``not`` make it "no", anything else is "yes" (case-sensitive, as
    there: ``NO`` reads as yes)."""
    t = text.strip()
    if "." in t:
        t = t.split(".")[0]
    words = t.replace(",", "").split(" ")
    return "no" if ("No" in words or "not" in words or "no" in words) else "yes"


def parse_mme_answer(text: str) -> str:
    """MME's ``eval_tool/calculation.py`` (``parse_pred_ans``, used by LLaVA's ``scripts/v1_5/eval/mme.sh``):
    lowercased, exactly "yes"/"no", else "yes" if the first 4 characters contain it, else "no" likewise, else
    "other" (counted wrong)."""
    t = text.strip().lower()
    if t in ("yes", "no"):
        return t
    head = t[:4]
    if "yes" in head:
        return "yes"
    if "no" in head:
        return "no"
    return "other"


_MMB_SEPARATORS = ".()[],:;!*#{}"


def extract_option_letter(text: str, options: dict[str, str]) -> str | None:
    """Option letter of a multiple-choice answer: VLMEvalKit's ``can_infer`` (``vlmeval/utils/
    matching_util.py``), the rule-based step of MMBench's official evaluation, without its ChatGPT fallback.

    First ``can_infer_option``: ``.()[],:;!*#{}`` become spaces and the answer is the one option letter that
    stands as a word (``"B"``, ``"B."``, ``"(B) dog"``); none or several -> ``can_infer_text``: the one option
    whose text occurs (case-insensitively) in the answer, the answer being at most twice as long as all
    options together. Else ``None`` (counted wrong).
    """
    spaced = text
    for c in _MMB_SEPARATORS:
        spaced = spaced.replace(c, " ")
    words = spaced.split()
    hits = [letter for letter in options if letter in words]
    if len(hits) == 1:
        return hits[0]
    low = text.lower()
    if len(low) > 2 * sum(len(str(v)) for v in options.values()):
        return None
    cands = [letter for letter, option in options.items() if str(option).lower() in low]
    return cands[0] if len(cands) == 1 else None


# --------------------------------------------------------------------------------------------- scorers


def _pct(num: float, den: float) -> float:
    return 100.0 * num / den if den else 0.0


def _bad(name: str, item: BenchItem, message: str) -> ValueError:
    return ValueError(f"{name}: sample {item.id!r}: {message}")


def _per_category(pairs: list[tuple[str, float]]) -> dict[str, float]:
    groups: dict[str, list[float]] = defaultdict(list)
    for cat, value in pairs:
        groups[cat].append(value)
    return {cat: _pct(sum(v), len(v)) for cat, v in sorted(groups.items())}


def _score_gqa(items: list[BenchItem], preds: dict[str, str]) -> BenchScore:
    """GQA testdev-balanced accuracy: LLaVA's ``scripts/convert_gqa_for_eval.py`` (strip trailing periods,
    lowercase) then GQA's ``eval.py`` (exact match with the answer; GQA's answers are lowercase, the
    reference is lowercased here too)."""
    per, cats = {}, []
    for it in items:
        if not isinstance(it.reference, str):
            raise _bad("gqa", it, f"reference must be a string, got {it.reference!r}")
        parsed = parse_gqa_answer(preds[it.id])
        ok = parsed == it.reference.strip().lower()
        per[it.id] = {"parsed": parsed, "correct": ok}
        cats.append((it.category, ok))
    correct = sum(ok for _, ok in cats)
    acc = _pct(correct, len(items))
    return BenchScore("gqa", acc, {"accuracy": acc, "correct": correct, "per_category": _per_category(cats)},
                      len(items), per)


def _score_sqa_img(items: list[BenchItem], preds: dict[str, str]) -> BenchScore:
    """ScienceQA IMG-Accuracy: LLaVA-1.5's ``llava/eval/eval_science_qa.py`` (see :func:`parse_sqa_letter`;
    an answer that is not one of the question's option letters counts wrong)."""
    per, cats, unparsed = {}, [], 0
    for it in items:
        n_choices = int(it.meta.get("n_choices", len(SQA_OPTIONS)))
        if it.reference not in SQA_OPTIONS[:n_choices]:
            raise _bad("sqa_img", it, f"reference must be an option letter among {n_choices}, got {it.reference!r}")
        parsed = parse_sqa_letter(preds[it.id], n_choices)
        unparsed += parsed is None
        ok = parsed == it.reference
        per[it.id] = {"parsed": parsed, "correct": ok}
        cats.append((it.category, ok))
    correct = sum(ok for _, ok in cats)
    acc = _pct(correct, len(items))
    return BenchScore("sqa_img", acc, {"accuracy": acc, "correct": correct, "unparsed": unparsed,
                                       "per_category": _per_category(cats)}, len(items), per)


def _score_textvqa(items: list[BenchItem], preds: dict[str, str]) -> BenchScore:
    """TextVQA val accuracy: LLaVA's ``llava/eval/eval_textvqa.py`` with ``TextVQAAccuracyEvaluator`` of
    ``m4c_evaluator.py`` (EvalAI normalisation, ten-answer leave-one-out soft score)."""
    per, total = {}, 0.0
    for it in items:
        ref = it.reference
        if not isinstance(ref, list) or len(ref) != TEXTVQA_N_ANSWERS:
            raise _bad("textvqa", it, f"reference must be {TEXTVQA_N_ANSWERS} answers, got {ref!r}")
        parsed = normalize_vqa_answer(preds[it.id])
        score = vqa_answer_scores(ref).get(parsed, 0.0)
        per[it.id] = {"parsed": parsed, "score": score}
        total += score
    acc = _pct(total, len(items))
    return BenchScore("textvqa", acc, {"accuracy": acc}, len(items), per)


def _split_order(names) -> list[str]:
    return [s for s in POPE_SPLITS if s in names] + sorted(set(names) - set(POPE_SPLITS))


def _score_pope(items: list[BenchItem], preds: dict[str, str]) -> BenchScore:
    """POPE: LLaVA's ``llava/eval/eval_pope.py`` per split (see :func:`parse_pope_answer`; "yes" is the
    positive class), reported as the mean F1 over the splits present. A split with no "yes" prediction has
    precision 0 (eval_pope.py would divide by zero)."""
    per: dict[str, dict] = {}
    by_split: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for it in items:
        if it.reference not in ("yes", "no"):
            raise _bad("pope", it, f"reference must be 'yes' or 'no', got {it.reference!r}")
        parsed = parse_pope_answer(preds[it.id])
        per[it.id] = {"parsed": parsed, "correct": parsed == it.reference}
        by_split[it.category].append((parsed, it.reference))
    splits = {}
    for split in _split_order(by_split):
        pairs = by_split[split]
        tp = sum(p == "yes" and r == "yes" for p, r in pairs)
        fp = sum(p == "yes" and r == "no" for p, r in pairs)
        tn = sum(p == "no" and r == "no" for p, r in pairs)
        fn = sum(p == "no" and r == "yes" for p, r in pairs)
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / (tp + fn) if tp + fn else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        splits[split] = {"f1": 100 * f1, "accuracy": _pct(tp + tn, len(pairs)), "precision": 100 * precision,
                         "recall": 100 * recall, "yes_ratio": _pct(tp + fp, len(pairs)),
                         "tp": tp, "fp": fp, "tn": tn, "fn": fn, "n": len(pairs)}
    f1 = sum(s["f1"] for s in splits.values()) / len(splits)
    acc = sum(s["accuracy"] for s in splits.values()) / len(splits)
    return BenchScore("pope", f1, {"f1": f1, "accuracy": acc, "splits": splits}, len(items), per)


def _score_mme(items: list[BenchItem], preds: dict[str, str]) -> BenchScore:
    """MME: MME's ``eval_tool/calculation.py`` as LLaVA's ``scripts/v1_5/eval/mme.sh`` runs it. Per
    category, acc = right answers / questions and acc+ = images with every question right / images (an image
    is asked twice); its score is (acc + acc+) x 100. Perception is the sum over its 10 categories (max
    2000), cognition over its 4 (max 800); the reported number is perception / 20."""
    per: dict[str, dict] = {}
    by_cat: dict[str, dict[str, list[bool]]] = defaultdict(lambda: defaultdict(list))
    other = 0
    for it in items:
        if it.reference not in ("yes", "no"):
            raise _bad("mme", it, f"reference must be 'yes' or 'no', got {it.reference!r}")
        parsed = parse_mme_answer(preds[it.id])
        other += parsed == "other"
        ok = parsed == it.reference
        per[it.id] = {"parsed": parsed, "correct": ok}
        by_cat[it.category][str(it.meta.get("image_key", it.image))].append(ok)
    categories, unpaired = {}, 0
    for cat in sorted(by_cat):
        images = by_cat[cat]
        answers = [ok for oks in images.values() for ok in oks]
        unpaired += sum(len(oks) != 2 for oks in images.values())
        acc, acc_plus = _pct(sum(answers), len(answers)), _pct(sum(all(oks) for oks in images.values()),
                                                              len(images))
        categories[cat] = {"score": acc + acc_plus, "acc": acc, "acc_plus": acc_plus, "n": len(answers),
                           "images": len(images)}
    perception = sum(categories[c]["score"] for c in MME_PERCEPTION if c in categories)
    cognition = sum(categories[c]["score"] for c in MME_COGNITION if c in categories)
    metrics = {"perception": perception, "cognition": cognition, "perception_div_20": perception / 20,
               "categories": categories,
               "missing_perception": [c for c in MME_PERCEPTION if c not in categories],
               "missing_cognition": [c for c in MME_COGNITION if c not in categories],
               "unknown_categories": sorted(set(categories) - set(MME_PERCEPTION) - set(MME_COGNITION)),
               "other_answers": other, "unpaired_images": unpaired}
    return BenchScore("mme", perception / 20, metrics, len(items), per)


def _score_mmbench(items: list[BenchItem], preds: dict[str, str]) -> BenchScore:
    """MMBench dev accuracy. Letters are read with :func:`extract_option_letter`. When the file holds the
    rotated copies (index >= 1,000,000) the score is CircularEval as in MMBench / VLMEvalKit: rows are
    grouped by ``index % 1,000,000`` and a question counts only if every row of its group is right; else
    plain accuracy. ``vanilla_accuracy`` is over the original rows (index < 1,000,000)."""
    per: dict[str, dict] = {}
    groups: dict[int, list[bool]] = defaultdict(list)
    group_cats: dict[int, tuple[str, str | None]] = {}
    main, circular, unparsed = [], False, 0
    for it in items:
        options = it.meta.get("options") or {}
        if it.reference not in options:
            raise _bad("mmbench", it, f"reference must be one of the options {list(options)}, got {it.reference!r}")
        index = int(it.meta.get("index", it.id))
        group = int(it.meta.get("group", index % MMBENCH_CIRCULAR_MOD))
        circular |= index >= MMBENCH_CIRCULAR_MOD
        parsed = extract_option_letter(preds[it.id], options)
        unparsed += parsed is None
        ok = parsed == it.reference
        per[it.id] = {"parsed": parsed, "correct": ok, "group": group}
        groups[group].append(ok)
        group_cats.setdefault(group, (it.category, it.meta.get("l2_category")))
        if index < MMBENCH_CIRCULAR_MOD:
            main.append(ok)
    rows = main or [ok for oks in groups.values() for ok in oks]
    vanilla = _pct(sum(rows), len(rows))
    circular_acc = _pct(sum(all(oks) for oks in groups.values()), len(groups)) if circular else None
    if circular:
        unit = [(group_cats[g], all(oks)) for g, oks in groups.items()]
    else:
        unit = [((it.category, it.meta.get("l2_category")), per[it.id]["correct"]) for it in items]
    score = circular_acc if circular else vanilla
    metrics = {"accuracy": score, "circular": circular, "circular_accuracy": circular_acc,
               "vanilla_accuracy": vanilla, "groups": len(groups), "unparsed": unparsed,
               "per_category": _per_category([(c[0], ok) for c, ok in unit]),
               "per_l2_category": _per_category([(c[1], ok) for c, ok in unit if c[1] is not None])}
    return BenchScore("mmbench", score, metrics, len(items), per)


_SCORERS = {"gqa": _score_gqa, "sqa_img": _score_sqa_img, "textvqa": _score_textvqa, "pope": _score_pope,
            "mme": _score_mme, "mmbench": _score_mmbench}


def score_benchmark(name: str, items: list[BenchItem], predictions: dict[str, str]) -> BenchScore:
    """Score generated answers (``predictions``: item id -> text) with the benchmark's convention."""
    if name not in _SCORERS:
        raise ValueError(f"unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)}")
    if not items:
        raise ValueError(f"{name}: no samples to score")
    seen = set()
    for it in items:
        if it.id in seen:
            raise ValueError(f"{name}: sample id {it.id!r} appears twice")
        seen.add(it.id)
    missing = [it.id for it in items if it.id not in predictions]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ValueError(f"{name}: no prediction for sample {missing[0]!r}{more}")
    for it in items:
        if not isinstance(predictions[it.id], str):
            raise ValueError(f"{name}: prediction for sample {it.id!r} is not text: {predictions[it.id]!r}")
    return _SCORERS[name](items, predictions)


# ------------------------------------------------------------------------------------------- score table


def score_table(scores: dict[str, BenchScore]) -> dict:
    """``{"benchmarks": {name: paper number}, "average": mean of the six or None, "missing": [names]}``.

    The average (MME as perception / 20) is given only when all six benchmarks are present."""
    for name, s in scores.items():
        if name not in BENCHMARKS:
            raise ValueError(f"unknown benchmark {name!r} in the scores; known: {', '.join(BENCHMARKS)}")
        if s.name != name:
            raise ValueError(f"scores[{name!r}] holds the score of {s.name!r}")
    present = {name: scores[name].score for name in BENCHMARKS if name in scores}
    missing = [name for name in BENCHMARKS if name not in scores]
    average = sum(present.values()) / len(BENCHMARKS) if not missing else None
    return {"benchmarks": present, "average": average, "missing": missing}


def _detail(s: BenchScore) -> str:
    m = s.metrics
    try:
        if s.name == "gqa":
            return f"GQA: {s.score:.2f}% exact match (n={s.n})"
        if s.name == "sqa_img":
            return f"SQA-IMG: {s.score:.2f}% accuracy (n={s.n}, {m['unparsed']} not an option letter)"
        if s.name == "textvqa":
            return f"TextVQA: {s.score:.2f}% VQA soft accuracy (n={s.n})"
        if s.name == "pope":
            splits = ", ".join(f"{k} {v['f1']:.2f}" for k, v in m["splits"].items())
            return f"POPE: F1 {splits}; mean {s.score:.2f}, accuracy {m['accuracy']:.2f}% (n={s.n})"
        if s.name == "mme":
            missing = f"; missing: {', '.join(m['missing_perception'])}" if m.get("missing_perception") else ""
            return (f"MME: perception {m['perception']:.1f} / 2000 (/20 = {s.score:.2f}), cognition "
                    f"{m['cognition']:.1f} / 800 (n={s.n}{missing})")
        if s.name == "mmbench":
            if m["circular"]:
                return (f"MMB-dev: {s.score:.2f}% CircularEval over {m['groups']} questions (vanilla "
                        f"{m['vanilla_accuracy']:.2f}%, n={s.n} rows)")
            return f"MMB-dev: {s.score:.2f}% accuracy, no rotated copies in the file (n={s.n})"
    except (KeyError, TypeError, AttributeError):
        pass  # a hand-made score without the usual metrics: the short form below
    return f"{s.title}: {s.score:.2f} (n={s.n})"


def format_markdown(scores: dict[str, BenchScore], model: str) -> str:
    """One table (TITLES in BENCHMARKS order, then Avg) with a row for ``model``, and a detail list."""
    table = score_table(scores)
    header = ["Model"] + [TITLES[name] for name in BENCHMARKS] + ["Avg"]
    cells = [model.replace("|", "\\|")]
    cells += [f"{table['benchmarks'][name]:.1f}" if name in table["benchmarks"] else "–" for name in BENCHMARKS]
    cells.append(f"{table['average']:.1f}" if table["average"] is not None else "–")
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|",
             "| " + " | ".join(cells) + " |", ""]
    if table["missing"]:
        lines.append("Avg needs all six benchmarks; missing: "
                     + ", ".join(TITLES[name] for name in table["missing"]) + ".")
    else:
        lines.append("Avg is the mean of the six numbers (MME as perception / 20).")
    lines.append("")
    lines += [f"- {_detail(scores[name])}" for name in BENCHMARKS if name in scores]
    return "\n".join(lines) + "\n"
