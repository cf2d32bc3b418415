import json
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from vlm_assets import prompts as P
from vlm_assets.captions import (
    CORE_NAME_TERMS, DISPLAY_NAMES, FORBIDDEN_TERMS, Candle, ChartContext, OfflineParaphraser, anatomy_caption,
    named_caption, names_a_pattern,
)
from vlm_assets.labeling import CORE_PATTERNS, NEUTRAL, REQUIRED_TREND, ZERO_SHOT_PATTERNS

REPO = Path(__file__).resolve().parents[1]
DECLINE = re.compile(r"\b(decline|downtrend|fell|drop)\b")
RISE = re.compile(r"\b(rise|uptrend|rose|rally)\b")


@pytest.fixture(scope="module")
def library():
    return P.load_prompt_library()


@pytest.fixture
def raw():
    return json.loads(P.LIBRARY_PATH.read_text())


@pytest.fixture(scope="module")
def cases():
    return P.regression_cases()


def _write(tmp_path: Path, document: dict, name: str = "library.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(document, indent=2))
    return path


def _rehashed(document: dict) -> dict:
    content = {k: document[k] for k in ("classes", "paraphrases")}
    return {**document, "sha256": P.library_sha256(content)}


# ---- the packaged library ------------------------------------------------------------------------------------

def test_packaged_library_loads_and_is_well_formed(library):
    assert library.class_names == CORE_PATTERNS + ZERO_SHOT_PATTERNS + (NEUTRAL,)
    assert library.core == CORE_PATTERNS and library.zero_shot == ZERO_SHOT_PATTERNS
    assert library.kinds[NEUTRAL] == "neutral"
    assert re.fullmatch(r"\d+\.\d+\.\d+\+[0-9a-f]{12}", library.tag)
    for name, prompts in library.classes.items():
        assert 6 <= len(prompts) <= 12, name
    assert set(library.paraphrases) == set(CORE_PATTERNS)
    for name, texts in library.paraphrases.items():
        assert 4 <= len(texts) <= 6, name
    assert P.parse_prompt_library(json.loads(library.to_json())) == library
    assert library.to_json() == P.LIBRARY_PATH.read_bytes()  # the file is in canonical form


def test_every_class_has_names_and_anatomy(library):
    for name, prompts in library.classes.items():
        if name == NEUTRAL:
            named = [p for p in prompts if "no" in p.split() and "pattern" in p]
        else:
            names = DISPLAY_NAMES.get(name, (name.replace("_", " "),))
            named = [p for p in prompts if any(n in p for n in names)]
        anatomy = [p for p in prompts if not names_a_pattern(p) and "pattern" not in p]
        assert len(named) >= 2, (name, named)
        assert len(anatomy) >= 3, (name, anatomy)


def test_zero_shot_names_appear_only_in_zero_shot_prompts(library):
    for name, prompts in library.classes.items():
        hits = [p for p in prompts if any(term in p.lower() for term in FORBIDDEN_TERMS)]
        if library.kinds[name] == "zero_shot":
            assert hits, name
        else:
            assert not hits, (name, hits)
    for texts in library.paraphrases.values():
        assert not [t for t in texts if any(term in t.lower() for term in FORBIDDEN_TERMS)]


def test_trend_context_follows_the_rules(library):
    """Prompts of trend patterns speak only of the required trend; trend-free classes cover both directions evenly."""
    for name, prompts in library.classes.items():
        falls = sum(bool(DECLINE.search(p)) for p in prompts)
        rises = sum(bool(RISE.search(p)) for p in prompts)
        required = REQUIRED_TREND.get(name, 0)
        if required == -1:
            assert rises == 0 and falls >= len(prompts) // 2, name
        elif required == 1:
            assert falls == 0 and rises >= len(prompts) // 2, name
        else:
            assert falls == rises, (name, falls, rises)


def test_with_paraphrases_swaps_only_core_prompts(library):
    derived = library.with_paraphrases()
    for name in library.class_names:
        expected = library.paraphrases[name] if name in CORE_PATTERNS else library.classes[name]
        assert derived.classes[name] == expected
    assert derived.version == library.version and derived.tag != library.tag


# ---- validation ----------------------------------------------------------------------------------------------

def _set(path: tuple, value):
    def edit(doc):
        target = doc
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
    return edit


def _append(path: tuple, value):
    def edit(doc):
        target = doc
        for key in path:
            target = target[key]
        target.append(value(doc) if callable(value) else value)
    return edit


def _delete(path: tuple):
    def edit(doc):
        target = doc
        for key in path[:-1]:
            target = target[key]
        del target[path[-1]]
    return edit


VALIDATION_ERRORS = {
    "missing_field": (_delete(("paraphrases",)), r"top level: missing fields \['paraphrases'\]"),
    "bad_version": (_set(("version",), "v1"), r"version: must be a 'MAJOR.MINOR.PATCH'"),
    "missing_class": (_delete(("classes", "doji")), r"classes: missing classes \['doji'\]"),
    "extra_class": (_set(("classes", "harami"), {"kind": "core", "prompts": ["harami"]}),
                    r"classes: .*unknown classes \['harami'\]"),
    "wrong_kind": (_set(("classes", "hammer", "kind"), "zero_shot"), r"classes\.hammer\.kind: expected 'core'"),
    "zero_shot_kind": (_set(("classes", "shooting_star", "kind"), "core"),
                       r"classes\.shooting_star\.kind: expected 'zero_shot'"),
    "empty_prompts": (_set(("classes", "doji", "prompts"), []), r"classes\.doji\.prompts: is empty"),
    "non_string": (_set(("classes", "doji", "prompts"), ["doji", 42]), r"classes\.doji\.prompts\[1\]: must be a string"),
    "blank": (_set(("classes", "doji", "prompts"), ["doji", "  "]), r"classes\.doji\.prompts\[1\]: is blank"),
    "duplicate": (_append(("classes", "doji", "prompts"), lambda d: d["classes"]["doji"]["prompts"][0].upper()),
                  r"classes\.doji\.prompts\[\d+\]: duplicate prompt"),
    "cross_class_duplicate": (_append(("classes", "neutral", "prompts"), lambda d: d["classes"]["doji"]["prompts"][0]),
                              r"classes\.neutral\.prompts\[\d+\]: duplicates classes\.doji\.prompts\[0\]"),
    "zero_shot_name_in_core": (_append(("classes", "hammer", "prompts"), "looks like a hanging man"),
                               r"classes\.hammer\.prompts\[\d+\]: names the held-out zero-shot term"),
    "zero_shot_name_in_neutral": (_append(("classes", "neutral", "prompts"), "not a dragonfly"),
                                  r"classes\.neutral\.prompts\[\d+\]: names the held-out zero-shot term 'dragonfly'"),
    "paraphrase_own_name": (_append(("paraphrases", "doji"), "a tiny doji cross"),
                            r"paraphrases\.doji\[\d+\]: contains the display name 'doji'"),
    "paraphrase_other_name": (_append(("paraphrases", "hammer"), "small body like an inside bar"),
                              r"paraphrases\.hammer\[\d+\]: contains the display name 'inside bar'"),
    "paraphrase_zero_shot_name": (_append(("paraphrases", "hammer"), "the gravestone of the selloff"),
                                  r"paraphrases\.hammer\[\d+\]: names the held-out zero-shot term 'gravestone'"),
    "paraphrase_repeats_prompt": (_append(("paraphrases", "hammer"), lambda d: next(
        p for p in d["classes"]["hammer"]["prompts"] if not names_a_pattern(p))),
                                  r"paraphrases\.hammer\[\d+\]: repeats classes\.hammer\.prompts"),
    "paraphrase_non_core": (_set(("paraphrases", "shooting_star"), ["a tall wick on top after a rally"]),
                            r"paraphrases: only core patterns have paraphrases, got \['shooting_star'\]"),
    "paraphrase_missing": (_delete(("paraphrases", "inside_bar")), r"paraphrases: missing core patterns \['inside_bar'\]"),
    "paraphrase_empty": (_set(("paraphrases", "inside_bar"), []), r"paraphrases\.inside_bar: is empty"),
}


@pytest.mark.parametrize("case", sorted(VALIDATION_ERRORS))
def test_validation_errors_name_the_field(tmp_path, raw, case):
    edit, message = VALIDATION_ERRORS[case]
    edit(raw)
    path = _write(tmp_path, _rehashed(raw) if "sha256" in raw and "classes" in raw and "paraphrases" in raw else raw)
    with pytest.raises(ValueError, match=message) as error:
        P.load_prompt_library(path)
    assert str(path) in str(error.value)


def test_invalid_json_is_a_value_error(tmp_path):
    path = tmp_path / "library.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        P.load_prompt_library(path)


def test_edit_without_bump_fails_and_bump_fixes_it(tmp_path, raw):
    packaged = P.LIBRARY_PATH.read_bytes()
    raw["classes"]["doji"]["prompts"].append("a candle whose open and close almost coincide")
    path = _write(tmp_path, raw)
    with pytest.raises(ValueError, match=r"sha256: the library changed without a version bump.*prompts bump"):
        P.load_prompt_library(path)

    bumped = P.bump_version(path)
    assert bumped.version == "1.0.1" and P.load_prompt_library(path) == bumped
    assert bumped.sha256 != raw["sha256"] and path.read_bytes() == bumped.to_json()
    assert P.bump_version(path, "minor").version == "1.1.0"
    assert P.bump_version(path, "major").version == "2.0.0"
    with pytest.raises(ValueError, match="part must be one of"):
        P.bump_version(path, "build")
    assert P.LIBRARY_PATH.read_bytes() == packaged


def test_bump_refuses_an_invalid_library(tmp_path, raw):
    raw["classes"]["hammer"]["prompts"].append("a shooting star")
    path = _write(tmp_path, raw)
    before = path.read_bytes()
    with pytest.raises(ValueError, match=r"classes\.hammer\.prompts\[\d+\]: names the held-out zero-shot term"):
        P.bump_version(path)
    assert path.read_bytes() == before


# ---- paraphrases are held out from the caption grammar -------------------------------------------------------

def _random_context(rng: np.random.Generator) -> ChartContext:
    candles = []
    for _ in range(int(rng.integers(1, 4))):
        upper, body_share, lower = rng.dirichlet((1.0, 1.0, 1.0))
        size = float(rng.uniform(0.2, 2.5))
        body = body_share * size
        candles.append(Candle(direction=0 if body < 0.1 else int(rng.choice((-1, 1))), body=body, range=size,
                              upper=float(upper), lower=float(lower), body_center=float(lower + body_share / 2),
                              gap=float(rng.normal(0, 0.1))))
    patterns = tuple(sorted(rng.choice(CORE_PATTERNS, size=int(rng.integers(0, 3)), replace=False)))
    return ChartContext(
        timeframe=str(rng.choice(["1m", "5m", "15m", "1h", "1d"])), trend=float(rng.uniform(-5, 5)),
        volatility_ratio=float(rng.uniform(0.5, 1.6)), candles=tuple(candles),
        inside_previous=bool(rng.random() < 0.3), engulfs_previous_range=bool(rng.random() < 0.3),
        body_covers_previous=bool(rng.random() < 0.3), patterns=patterns,
        zero_shot_patterns=tuple(rng.choice(ZERO_SHOT_PATTERNS, size=int(rng.integers(0, 2)), replace=False)),
    )


@pytest.fixture(scope="module")
def grammar_captions():
    """A few thousand captions from the grammar and the offline paraphraser, over random contexts."""
    rng = np.random.default_rng(2024)
    paraphraser = OfflineParaphraser()
    out = []
    for _ in range(1500):
        ctx = _random_context(rng)
        texts = [anatomy_caption(ctx, rng, 1.5), named_caption(ctx, rng, bool(rng.random() < 0.5), 1.5)]
        texts = [t for t in texts if t]
        out += texts + paraphraser.variants(texts[0], 2, rng)
    return [t.lower() for t in out]


def test_paraphrases_contain_no_display_name(library):
    for name, texts in library.paraphrases.items():
        for text in texts:
            assert not any(n in text.lower() for names in DISPLAY_NAMES.values() for n in names), (name, text)


def test_paraphrases_are_not_caption_grammar_output(library, grammar_captions):
    assert len(grammar_captions) > 4000
    corpus = "\n".join(grammar_captions)
    for name, texts in library.paraphrases.items():
        for text in texts:
            lowered = text.lower()
            assert lowered not in corpus, (name, text)
            assert not [c for c in grammar_captions if c in lowered], (name, text)


def test_paraphrases_never_name_a_pattern_term(library):
    """Stricter than validation: not even the name fragments ("engulfing", "star") of the caption grammar."""
    for name, texts in library.paraphrases.items():
        assert not [t for t in texts if any(re.search(rf"\b{re.escape(term)}\b", t.lower()) for term in CORE_NAME_TERMS)]


# ---- ensembles -----------------------------------------------------------------------------------------------

def test_class_text_embeddings_are_normalized_prompt_means(library):
    def encode(texts):  # deterministic, deliberately unnormalized
        return np.stack([np.random.default_rng(sum(map(ord, t))).normal(size=8) * 3 for t in texts])

    embeddings = P.class_text_embeddings(library, encode)
    assert embeddings.shape == (len(library.class_names), 8)
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0)
    doji = encode(list(library.classes["doji"]))
    doji /= np.linalg.norm(doji, axis=1, keepdims=True)
    mean = doji.mean(axis=0)
    np.testing.assert_allclose(embeddings[library.class_names.index("doji")], mean / np.linalg.norm(mean))
    with pytest.raises(ValueError, match="embeddings for"):
        P.class_text_embeddings(library, lambda texts: np.ones((3, 8)))


# ---- the regression suite ------------------------------------------------------------------------------------

def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def test_regression_cases_are_deterministic_and_cover_every_class(cases):
    again = P.regression_cases()
    assert [(c.id, c.png, c.text) for c in cases] == [(c.id, c.png, c.text) for c in again]
    assert {c.pattern for c in cases} == set(P.CLASS_NAMES)
    assert {c.expected_top for c in cases if c.required} == set(P.CLASS_NAMES)
    for case in cases:
        assert _png_size(case.png) == (224, 224)
        assert case.expected_top in case.fired, (case.id, case.fired)
        # a label the rule engine also gives the chart is a right answer too: never a query class to beat
        assert not set(case.fired) & set(case.query_classes) - {case.expected_top}, (case.id, case.fired)
        assert not names_a_pattern(case.text), case.text


def test_packaged_suite_records_the_packaged_library(library):
    P.check_suite_matches(library, P.load_regression_suite())


def test_check_suite_matches_raises_on_a_stale_suite(library):
    suite = P.load_regression_suite()
    for stale in ({**suite, "library_sha256": "0" * 64}, {**suite, "library_version": "0.9.9"}):
        with pytest.raises(ValueError, match=r"last verified against prompt library .*verify-suite"):
            P.check_suite_matches(library, stale)


def test_suite_validation_names_the_field(tmp_path):
    suite = P.load_regression_suite()
    suite["cases"][0]["expected_top"] = "hanging_man"
    path = tmp_path / "suite.json"
    path.write_text(json.dumps(suite))
    with pytest.raises(ValueError, match=r"cases\[0\]\.expected_top"):
        P.load_regression_suite(path)


def test_text_regression_passes_every_required_case(library, encoder):
    results = P.text_regression(library, encoder.encode)
    assert list(results.columns) == ["id", "pattern", "expected_top", "top", "ranked", "margin", "passed", "required"]
    assert len(results) == len(P.load_regression_suite()["cases"])
    failing = results[results["required"] & ~results["passed"]]
    assert failing.empty, failing.drop(columns=["ranked"]).to_string()
    assert (results["passed"] == (results["margin"] > 0)).all()  # no case here lists an expected_order


def test_expected_order_is_a_partial_order(library, encoder):
    case = {"id": "hammer", "pattern": "hammer", "seed": 302, "expected_top": "hammer",
            "query_classes": ["hammer", "hanging_man", "dragonfly_doji", "neutral"]}
    suite = {"library_version": library.version, "library_sha256": library.sha256, "cases": [case]}
    ranked = P.text_regression(library, encoder.encode, suite)["ranked"].iloc[0]
    assert ranked[0] == "hammer"
    in_order = {**case, "expected_order": [ranked[1], ranked[3]]}
    reversed_ = {**case, "expected_order": [ranked[3], ranked[1]]}
    result = P.text_regression(library, encoder.encode, {**suite, "cases": [in_order, {**reversed_, "id": "rev"}]})
    assert result["passed"].tolist() == [True, False]


def test_image_regression_ranks_like_text_regression_for_a_text_image_encoder(library, encoder, cases):
    text_of = {c.png: c.text for c in cases}
    images = P.image_regression(library, lambda pngs: encoder.encode([text_of[p] for p in pngs]), encoder.encode)
    pd.testing.assert_frame_equal(images, P.text_regression(library, encoder.encode))


def test_a_library_edit_forces_re_verifying_the_suite(tmp_path, encoder):
    library_path, suite_path = tmp_path / "library.json", tmp_path / "suite.json"
    shutil.copy(P.LIBRARY_PATH, library_path)
    shutil.copy(P.SUITE_PATH, suite_path)
    bumped = P.bump_version(library_path)
    with pytest.raises(ValueError, match="verify-suite"):
        P.check_suite_matches(bumped, P.load_regression_suite(suite_path))
    results = P.verify_suite(library_path, suite_path, encode=encoder.encode)
    assert results.loc[results["required"], "passed"].all()
    P.check_suite_matches(bumped, P.load_regression_suite(suite_path))

    # A library that breaks required cases is not recorded.
    raw = json.loads(library_path.read_text())
    raw["classes"]["hammer"]["prompts"] = ["hammer", "a hammer candle", "a long red bar", "a tall candle",
                                           "an ordinary bar", "a candle in a quiet market"]
    library_path.write_text(json.dumps(raw))
    broken = P.bump_version(library_path)
    before = suite_path.read_bytes()
    results = P.verify_suite(library_path, suite_path, encode=encoder.encode)
    assert not results.loc[results["required"], "passed"].all()
    assert suite_path.read_bytes() == before
    with pytest.raises(ValueError, match="verify-suite"):
        P.check_suite_matches(broken, P.load_regression_suite(suite_path))


# ---- command line and imports --------------------------------------------------------------------------------

def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vlm_assets.prompts", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=120)


def test_cli_check(tmp_path, raw):
    assert _cli("check").returncode == 0
    copy = tmp_path / "library.json"
    shutil.copy(P.LIBRARY_PATH, copy)
    ok = _cli("check", "--path", str(copy))
    assert ok.returncode == 0, ok.stderr
    assert "ok: prompt library" in ok.stdout

    raw["classes"]["doji"]["prompts"][0] = "doji cross"
    broken = _write(tmp_path, raw, "broken.json")
    failed = _cli("check", "--path", str(broken))
    assert failed.returncode != 0
    assert "changed without a version bump" in failed.stderr and "prompts bump" in failed.stderr

    assert _cli("bump", "--path", str(broken), "--part", "minor").returncode == 0
    stale = _cli("check", "--path", str(broken))
    assert stale.returncode != 0 and "verify-suite" in stale.stderr


def test_import_needs_no_heavy_frameworks():
    code = ("import sys, vlm_assets.prompts; "
            "bad = [m for m in ('torch', 'dagster', 'bentoml', 'transformers') if m in sys.modules]; "
            "assert not bad, bad")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
