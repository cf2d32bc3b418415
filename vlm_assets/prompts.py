"""The versioned prompt library: class prompt ensembles for zero-shot classification, held-out paraphrases, and the
prompt regression suite.

`prompt_library.json` holds, per class (the core patterns, the zero-shot patterns and neutral), an ensemble of
prompts: the name in several phrasings plus anatomy descriptions in the caption grammar's vocabulary. The zero-shot
patterns are recognised through their anatomy prompts, since training captions never name them. `paraphrases` are
held-out trader wordings of the core patterns, used only to measure robustness to phrasing.

The file records its version and the sha256 of its content; an edit without `python -m vlm_assets.prompts bump`
fails to load. `prompt_regression.json` records the library version it was last verified against, so an edit also
forces `python -m vlm_assets.prompts verify-suite`. See docs/prompts.md.

Imports only numpy, pandas and project modules: the model code passes its own text / image encoders in.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd

from vlm_assets.captions import DISPLAY_NAMES, FORBIDDEN_TERMS, anatomy_caption, describe_window
from vlm_assets.labeling import (
    ALL_PATTERNS, CORE_PATTERNS, NEUTRAL, REQUIRED_TREND, ZERO_SHOT_PATTERNS, RuleParams, label_bars,
)
from vlm_assets.market.templates import pattern_candles
from vlm_assets.rendering import DEFAULT_STYLE, render_png
from vlm_assets.storage import atomic_write
from vlm_assets.versioning import content_hash, stable_json

LIBRARY_PATH = Path(__file__).with_name("prompt_library.json")
SUITE_PATH = Path(__file__).with_name("prompt_regression.json")
CLASS_NAMES: tuple[str, ...] = CORE_PATTERNS + ZERO_SHOT_PATTERNS + (NEUTRAL,)
CLASS_KINDS: dict[str, str] = {
    **{p: "core" for p in CORE_PATTERNS}, **{p: "zero_shot" for p in ZERO_SHOT_PATTERNS}, NEUTRAL: "neutral",
}
VERSION_PARTS = ("major", "minor", "patch")
_LIBRARY_FIELDS = ("classes", "paraphrases", "sha256", "version")
_VERSION_RE = re.compile(r"^(\d+)\.(\d+)\.(\d+)$")
_BUMP_HINT = ("run `python -m vlm_assets.prompts bump` (`--part minor` for new or reworded prompts, `--part major` "
              "for a new class set), then `python -m vlm_assets.prompts verify-suite`")

Encode = Callable[[list[str]], np.ndarray]


# ---- the library -------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PromptLibrary:
    """A validated prompt library; `classes` and `kinds` are in CLASS_NAMES order."""

    version: str
    sha256: str
    classes: dict[str, tuple[str, ...]]
    kinds: dict[str, str]
    paraphrases: dict[str, tuple[str, ...]]

    @property
    def class_names(self) -> tuple[str, ...]:
        return tuple(self.classes)

    @property
    def core(self) -> tuple[str, ...]:
        return tuple(c for c in self.classes if self.kinds[c] == "core")

    @property
    def zero_shot(self) -> tuple[str, ...]:
        return tuple(c for c in self.classes if self.kinds[c] == "zero_shot")

    @property
    def tag(self) -> str:
        return f"{self.version}+{self.sha256[:12]}"

    def content(self) -> dict:
        """Everything the sha256 covers (all but `version` and `sha256`)."""
        return {
            "classes": {c: {"kind": self.kinds[c], "prompts": list(p)} for c, p in self.classes.items()},
            "paraphrases": {c: list(p) for c, p in self.paraphrases.items()},
        }

    def to_json(self) -> bytes:
        """Stable bytes: keys sorted, except that classes and paraphrases keep the CLASS_NAMES order."""
        document = {**self.content(), "sha256": self.sha256, "version": self.version}
        return (json.dumps(document, indent=2, ensure_ascii=False) + "\n").encode("utf-8")

    def with_paraphrases(self) -> PromptLibrary:
        """The core classes prompted only by their held-out paraphrases (zero-shot and neutral unchanged).

        Same version; the sha256 is that of the derived content, so its `tag` tells it apart from the library."""
        classes = {c: self.paraphrases[c] if self.kinds[c] == "core" else p for c, p in self.classes.items()}
        derived = replace(self, classes=classes)
        return replace(derived, sha256=library_sha256(derived.content()))


def library_sha256(content: dict) -> str:
    return content_hash(stable_json(content), length=64)


def _fail(field: str, problem: str) -> None:
    raise ValueError(f"prompt library: {field}: {problem}")


def _normalized(text: str) -> str:
    return " ".join(text.lower().split())


def _texts(field: str, value) -> tuple[str, ...]:
    """A non-empty list of distinct non-blank strings."""
    if not isinstance(value, list):
        _fail(field, f"must be a list of strings, got {type(value).__name__}")
    if not value:
        _fail(field, "is empty: every entry needs at least one prompt")
    seen: dict[str, int] = {}
    for i, text in enumerate(value):
        if not isinstance(text, str):
            _fail(f"{field}[{i}]", f"must be a string, got {type(text).__name__} {text!r}")
        if not text.strip():
            _fail(f"{field}[{i}]", "is blank")
        key = _normalized(text)
        if key in seen:
            _fail(f"{field}[{i}]", f"duplicate prompt {text!r} (same as {field}[{seen[key]}])")
        seen[key] = i
    return tuple(value)


def _forbidden_term(text: str) -> str | None:
    lowered = text.lower()
    return next((term for term in FORBIDDEN_TERMS if term in lowered), None)


def _display_name(text: str) -> str | None:
    lowered = text.lower()
    return next((n for p in CORE_PATTERNS for n in DISPLAY_NAMES[p] if n in lowered), None)


def _validated(data) -> PromptLibrary:
    """Every check but the hash (bump_version needs exactly that)."""
    if not isinstance(data, dict):
        raise ValueError(f"prompt library: the top level must be a JSON object, got {type(data).__name__}")
    missing = [k for k in _LIBRARY_FIELDS if k not in data]
    extra = sorted(set(data) - set(_LIBRARY_FIELDS))
    if missing or extra:
        _fail("top level", f"missing fields {missing}, unknown fields {extra} (expected exactly {list(_LIBRARY_FIELDS)})")
    version, sha256 = data["version"], data["sha256"]
    if not isinstance(version, str) or not _VERSION_RE.match(version):
        _fail("version", f"must be a 'MAJOR.MINOR.PATCH' string, got {version!r}")
    if not isinstance(sha256, str) or not re.fullmatch(r"[0-9a-f]{64}", sha256):
        _fail("sha256", f"must be 64 lowercase hex digits, got {sha256!r}")

    raw_classes = data["classes"]
    if not isinstance(raw_classes, dict):
        _fail("classes", f"must be an object, got {type(raw_classes).__name__}")
    missing = [c for c in CLASS_NAMES if c not in raw_classes]
    extra = sorted(set(raw_classes) - set(CLASS_NAMES))
    if missing or extra:
        _fail("classes", f"missing classes {missing}, unknown classes {extra} (expected exactly {list(CLASS_NAMES)})")
    classes: dict[str, tuple[str, ...]] = {}
    owner: dict[str, str] = {}  # normalized prompt -> the field that holds it
    for name in CLASS_NAMES:
        entry = raw_classes[name]
        if not isinstance(entry, dict) or set(entry) != {"kind", "prompts"}:
            _fail(f"classes.{name}", f"must be an object with exactly the fields 'kind' and 'prompts', got {entry!r}")
        if entry["kind"] != CLASS_KINDS[name]:
            _fail(f"classes.{name}.kind", f"expected {CLASS_KINDS[name]!r}, got {entry['kind']!r}")
        prompts = _texts(f"classes.{name}.prompts", entry["prompts"])
        for i, text in enumerate(prompts):
            field = f"classes.{name}.prompts[{i}]"
            # Core and neutral prompts can reach training-side text; held-out names must stay out of it.
            term = _forbidden_term(text) if CLASS_KINDS[name] != "zero_shot" else None
            if term:
                _fail(field, f"names the held-out zero-shot term {term!r}: {text!r}")
            if _normalized(text) in owner:
                _fail(field, f"duplicates {owner[_normalized(text)]}: {text!r}")
            owner[_normalized(text)] = field
        classes[name] = prompts

    raw_paraphrases = data["paraphrases"]
    if not isinstance(raw_paraphrases, dict):
        _fail("paraphrases", f"must be an object, got {type(raw_paraphrases).__name__}")
    not_core = sorted(set(raw_paraphrases) - set(CORE_PATTERNS))
    if not_core:
        _fail("paraphrases", f"only core patterns have paraphrases, got {not_core}")
    missing = [c for c in CORE_PATTERNS if c not in raw_paraphrases]
    if missing:
        _fail("paraphrases", f"missing core patterns {missing}")
    paraphrases: dict[str, tuple[str, ...]] = {}
    for name in CORE_PATTERNS:
        texts = _texts(f"paraphrases.{name}", raw_paraphrases[name])
        for i, text in enumerate(texts):
            field = f"paraphrases.{name}[{i}]"
            # Held out for robustness: a paraphrase that names a pattern or repeats a prompt measures nothing.
            name_found = _display_name(text)
            if name_found:
                _fail(field, f"contains the display name {name_found!r}: {text!r}")
            term = _forbidden_term(text)
            if term:
                _fail(field, f"names the held-out zero-shot term {term!r}: {text!r}")
            if _normalized(text) in owner:
                _fail(field, f"repeats {owner[_normalized(text)]}: {text!r}")
            owner[_normalized(text)] = field
        paraphrases[name] = texts
    return PromptLibrary(version=version, sha256=sha256, classes=classes, kinds=dict(CLASS_KINDS),
                         paraphrases=paraphrases)


def parse_prompt_library(data: dict) -> PromptLibrary:
    """Validate a library document; ValueError naming the offending field."""
    library = _validated(data)
    actual = library_sha256(library.content())
    if actual != library.sha256:
        _fail("sha256", f"the library changed without a version bump (version {library.version} records "
                        f"{library.sha256[:12]}..., the content hashes to {actual[:12]}...): {_BUMP_HINT}")
    return library


def _read_json(path: Path):
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"not valid JSON: {error}") from None


def load_prompt_library(path: str | Path | None = None) -> PromptLibrary:
    """The packaged library by default."""
    path = Path(path) if path is not None else LIBRARY_PATH
    try:
        return parse_prompt_library(_read_json(path))
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None


def bump_version(path: str | Path | None = None, part: str = "patch") -> PromptLibrary:
    """Re-hash the library at `path` (default: the packaged one), bump `part` of its version, write it atomically."""
    if part not in VERSION_PARTS:
        raise ValueError(f"part must be one of {VERSION_PARTS}, got {part!r}")
    path = Path(path) if path is not None else LIBRARY_PATH
    try:
        library = _validated(_read_json(path))
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None
    numbers = [int(x) for x in _VERSION_RE.match(library.version).groups()]
    level = VERSION_PARTS.index(part)
    numbers = numbers[:level] + [numbers[level] + 1] + [0] * (2 - level)
    bumped = replace(library, version=".".join(map(str, numbers)), sha256=library_sha256(library.content()))
    atomic_write(path, bumped.to_json())
    return bumped


def class_text_embeddings(library: PromptLibrary, encode: Encode) -> np.ndarray:
    """(n_classes, d) in `library.class_names` order: per class the re-normalized mean of its normalized prompt
    embeddings (the prompt ensemble). `encode` is any list[str] -> (n, d) callable, e.g. a model's text tower."""
    texts = [t for prompts in library.classes.values() for t in prompts]
    embeddings = _unit(np.asarray(encode(texts), dtype=np.float64))
    if embeddings.shape[0] != len(texts):
        raise ValueError(f"encode returned {embeddings.shape[0]} embeddings for {len(texts)} prompts")
    bounds = np.cumsum([0] + [len(p) for p in library.classes.values()])
    return _unit(np.stack([embeddings[a:b].mean(axis=0) for a, b in zip(bounds[:-1], bounds[1:])]))


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


# ---- the regression suite ----------------------------------------------------------------------------------

LEAD_BARS = 56  # bars before the pattern: a window length inside the dataset's 50..120
CASE_TIMEFRAME = "15m"
_CASE_FIELDS = ("id", "pattern", "seed", "query_classes", "expected_top", "expected_order", "required")
# Neutral case candles (offsets from the previous close, in avg ranges): two ordinary white candles, the second
# above the first, so nothing can fire (not inside, outside, engulfing, a star or any hammer shape).
_NEUTRAL_OFFSETS = ((0.0, 0.65, -0.15, 0.5), (0.5, 1.1, 0.35, 0.95))


@dataclass(frozen=True)
class RegressionCase:
    """One suite case with its deterministic chart, the chart's PNG and its anatomy caption."""

    id: str
    pattern: str  # the template drawn at the end of the chart (or "neutral")
    seed: int
    query_classes: tuple[str, ...]
    expected_top: str
    expected_order: tuple[str, ...]  # a partial order the ranking must respect (may be empty)
    required: bool
    bars: pd.DataFrame
    fired: tuple[str, ...]  # what the rule engine labels the last bar ("neutral" when nothing fires)
    text: str  # the caption grammar's anatomy caption of the chart
    png: bytes  # 224x224, DEFAULT_STYLE


def load_regression_suite(path: str | Path | None = None) -> dict:
    """The packaged suite by default; ValueError naming the offending field."""
    path = Path(path) if path is not None else SUITE_PATH
    try:
        suite = _read_json(path)
        _validate_suite(suite)
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None
    return suite


def _validate_suite(suite) -> None:
    def fail(field: str, problem: str) -> None:
        raise ValueError(f"regression suite: {field}: {problem}")

    if not isinstance(suite, dict) or set(suite) != {"library_version", "library_sha256", "cases"}:
        fail("top level", "expected exactly the fields 'library_version', 'library_sha256', 'cases'")
    if not isinstance(suite["cases"], list) or not suite["cases"]:
        fail("cases", "must be a non-empty list")
    ids = set()
    for i, case in enumerate(suite["cases"]):
        field = f"cases[{i}]"
        if not isinstance(case, dict) or not set(_CASE_FIELDS[:5]) <= set(case) <= set(_CASE_FIELDS):
            fail(field, f"needs the fields {list(_CASE_FIELDS[:5])} and may have {list(_CASE_FIELDS[5:])}")
        if case["id"] in ids:
            fail(f"{field}.id", f"duplicate id {case['id']!r}")
        ids.add(case["id"])
        if case["pattern"] not in ALL_PATTERNS + (NEUTRAL,):
            fail(f"{field}.pattern", f"unknown pattern {case['pattern']!r}")
        if not isinstance(case["seed"], int):
            fail(f"{field}.seed", f"must be an integer, got {case['seed']!r}")
        query = case["query_classes"]
        if not isinstance(query, list) or len(query) < 2 or not set(query) <= set(CLASS_NAMES) \
                or len(set(query)) != len(query):
            fail(f"{field}.query_classes", f"must be at least two distinct classes of {list(CLASS_NAMES)}, got {query!r}")
        if case["expected_top"] not in query:
            fail(f"{field}.expected_top", f"{case['expected_top']!r} is not among the query classes")
        order = case.get("expected_order", [])
        if not isinstance(order, list) or not set(order) <= set(query):
            fail(f"{field}.expected_order", f"must list query classes, got {order!r}")
        if not isinstance(case.get("required", True), bool):
            fail(f"{field}.required", f"must be true or false, got {case['required']!r}")


def check_suite_matches(library: PromptLibrary, suite: dict) -> None:
    """ValueError unless the suite was last verified against exactly this library version and content."""
    recorded = f"{suite.get('library_version')}+{str(suite.get('library_sha256'))[:12]}"
    if suite.get("library_version") != library.version or suite.get("library_sha256") != library.sha256:
        raise ValueError(
            f"the prompt regression suite was last verified against prompt library {recorded}, but the library is "
            f"now {library.tag}: run `python -m vlm_assets.prompts verify-suite` to re-run and record it")


def case_bars(pattern: str, seed: int) -> pd.DataFrame:
    """A deterministic chart: LEAD_BARS bars trending as REQUIRED_TREND[pattern] asks (sideways for none), then the
    pattern's template candles (or the neutral candles). OHLCV with a 15-minute index."""
    rng = np.random.default_rng(seed)
    direction = REQUIRED_TREND.get(pattern, 0)
    if direction:
        # A random walk with drift; the drift decides whether the caption says "a decline" or "a sharp decline".
        closes = 100.0 + np.cumsum(direction * rng.uniform(0.15, 0.35) + rng.normal(0.0, 0.25, LEAD_BARS))
    else:
        closes = 100.0 + rng.normal(0.0, 0.3, LEAD_BARS)  # noise around a level: reliably no trend either way
    opens = np.concatenate([[100.0], closes[:-1]])  # intraday: every bar opens at the previous close
    highs = np.maximum(opens, closes) + rng.uniform(0.05, 0.3, LEAD_BARS)
    lows = np.minimum(opens, closes) - rng.uniform(0.05, 0.3, LEAD_BARS)
    lead = np.column_stack([opens, highs, lows, closes])
    avg_range = float(np.mean(highs[-10:] - lows[-10:]))  # what the rule engine will measure
    if pattern == NEUTRAL:
        tail = closes[-1] + avg_range * np.array(_NEUTRAL_OFFSETS)
    else:
        tail = pattern_candles(pattern, rng, prev_close=float(closes[-1]), avg_range=avg_range)
    ohlc = np.vstack([lead, tail])
    frame = pd.DataFrame(ohlc, columns=["open", "high", "low", "close"],
                         index=pd.date_range("2024-01-02 09:30", periods=len(ohlc), freq="15min"))
    frame["volume"] = rng.integers(500, 1500, len(ohlc)).astype(float)
    return frame


def regression_cases(suite: dict | None = None) -> list[RegressionCase]:
    """Per case of `suite` (default: the packaged one): its chart, PNG, anatomy caption and expectations."""
    if suite is None:
        suite = load_regression_suite()
    else:
        _validate_suite(suite)
    params = RuleParams()
    cases = []
    for case in suite["cases"]:
        bars = case_bars(case["pattern"], case["seed"])
        labels = label_bars(bars, params)
        last = labels.iloc[-1]
        fired = tuple(p for p in ALL_PATTERNS if last[p]) or ((NEUTRAL,) if last[NEUTRAL] else ())
        ctx = describe_window(bars, labels.iloc[-3:], CASE_TIMEFRAME)
        text = anatomy_caption(ctx, np.random.default_rng([case["seed"], 1]), params.trend_threshold)
        cases.append(RegressionCase(
            id=case["id"], pattern=case["pattern"], seed=case["seed"], query_classes=tuple(case["query_classes"]),
            expected_top=case["expected_top"], expected_order=tuple(case.get("expected_order", ())),
            required=case.get("required", True), bars=bars, fired=fired, text=text,
            png=render_png(bars, DEFAULT_STYLE, 224, 224),
        ))
    return cases


def _rank(library: PromptLibrary, cases: Sequence[RegressionCase], case_embeddings: np.ndarray,
          class_embeddings: np.ndarray) -> pd.DataFrame:
    position = {c: i for i, c in enumerate(library.class_names)}
    similarity = _unit(np.asarray(case_embeddings, dtype=np.float64)) @ class_embeddings.T
    rows = []
    for case, sims in zip(cases, similarity):
        scores = {c: float(sims[position[c]]) for c in case.query_classes}
        ranked = tuple(sorted(scores, key=lambda c: -scores[c]))
        # A partial order holds when its classes appear in the ranking in the listed order.
        ordered = [ranked.index(c) for c in case.expected_order] == sorted(ranked.index(c) for c in case.expected_order)
        best_other = max(s for c, s in scores.items() if c != case.expected_top)
        rows.append({
            "id": case.id, "pattern": case.pattern, "expected_top": case.expected_top, "top": ranked[0],
            "ranked": ranked, "margin": scores[case.expected_top] - best_other,
            "passed": ranked[0] == case.expected_top and ordered, "required": case.required,
        })
    return pd.DataFrame(rows, columns=["id", "pattern", "expected_top", "top", "ranked", "margin", "passed",
                                       "required"])


def text_regression(library: PromptLibrary, encode: Encode, suite: dict | None = None) -> pd.DataFrame:
    """Rank each case's query classes by cosine between its anatomy caption and the class prompt ensembles.

    One row per case: id, pattern, expected_top, top, ranked (classes, best first), margin (expected class minus
    the best other), passed, required."""
    cases = regression_cases(suite)
    return _rank(library, cases, np.asarray(encode([c.text for c in cases])), class_text_embeddings(library, encode))


def image_regression(library: PromptLibrary, encode_images: Callable[[list[bytes]], np.ndarray],
                     encode_texts: Encode, suite: dict | None = None) -> pd.DataFrame:
    """text_regression's columns, ranking by each case's rendered PNG against the class prompt ensembles."""
    cases = regression_cases(suite)
    return _rank(library, cases, np.asarray(encode_images([c.png for c in cases])),
                 class_text_embeddings(library, encode_texts))


def _suite_json(suite: dict) -> bytes:
    """One case per line: readable diffs when cases are added or re-recorded."""
    cases = ",\n".join("    " + json.dumps(case) for case in suite["cases"])
    return (f'{{\n  "library_version": {json.dumps(suite["library_version"])},\n'
            f'  "library_sha256": {json.dumps(suite["library_sha256"])},\n'
            f'  "cases": [\n{cases}\n  ]\n}}\n').encode("utf-8")


def verify_suite(library_path: str | Path | None = None, suite_path: str | Path | None = None,
                 encode: Encode | None = None) -> pd.DataFrame:
    """Run the text regression (default encoder: the offline MiniLM) and, when every required case passes, record
    the library version and sha256 in the suite file. Returns the results either way."""
    library = load_prompt_library(library_path)
    suite_path = Path(suite_path) if suite_path is not None else SUITE_PATH
    suite = load_regression_suite(suite_path)
    if encode is None:
        from vlm_assets.text_encoder import MiniLMEncoder  # torch: only when a check actually needs the encoder

        encode = MiniLMEncoder().encode
    results = text_regression(library, encode, suite)
    if results.loc[results["required"], "passed"].all():
        atomic_write(suite_path, _suite_json({**suite, "library_version": library.version,
                                              "library_sha256": library.sha256}))
    return results


# ---- command line ------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vlm_assets.prompts", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser("check", help="validate the library and that the regression suite records it")
    bump = commands.add_parser("bump", help="re-hash the library after an edit and bump its version")
    verify = commands.add_parser("verify-suite", help="run the text regression (MiniLM) and record the library in "
                                                      "the suite when every required case passes")
    for command in (check, bump, verify):
        command.add_argument("--path", type=Path, default=LIBRARY_PATH, help="prompt library JSON")
    for command in (check, verify):
        command.add_argument("--suite", type=Path, default=SUITE_PATH, help="regression suite JSON")
    bump.add_argument("--part", choices=VERSION_PARTS, default="patch")
    args = parser.parse_args(argv)
    try:
        if args.command == "check":
            library = load_prompt_library(args.path)
            check_suite_matches(library, load_regression_suite(args.suite))
            print(f"ok: prompt library {library.tag} ({len(library.classes)} classes, "
                  f"{sum(map(len, library.classes.values()))} prompts); the regression suite records it")
        elif args.command == "bump":
            library = bump_version(args.path, args.part)
            print(f"prompt library bumped to {library.tag}; now run `python -m vlm_assets.prompts verify-suite`")
        else:
            results = verify_suite(args.path, args.suite)
            with pd.option_context("display.width", 200, "display.max_colwidth", 80):
                print(results.drop(columns=["ranked"]).to_string(index=False))
            required = results[results["required"]]
            print(f"{int(results['passed'].sum())}/{len(results)} cases pass "
                  f"({int(required['passed'].sum())}/{len(required)} required)")
            if not required["passed"].all():
                print("error: required cases fail; the suite was not re-recorded", file=sys.stderr)
                return 1
            print(f"recorded prompt library {load_prompt_library(args.path).tag} in {args.suite}")
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
