import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import numpy as np
import pandas as pd
import pytest

from vlm_assets.captions import (
    FORBIDDEN_TERMS, CaptionConfig, OfflineParaphraser, OpenAICompatibleAugmenter, build_pairs, contains_forbidden,
    dedupe_by_embedding, describe_window, names_a_pattern,
)
from vlm_assets.labeling import ALL_PATTERNS, CORE_PATTERNS, ZERO_SHOT_PATTERNS, label_bars
from vlm_assets.market.synthetic import SyntheticMarketConfig, generate_market


@pytest.fixture(scope="module")
def windows():
    """(window_id, bars, label tail, timeframe) for bars ending on every pattern and on neutral bars."""
    market = generate_market(SyntheticMarketConfig(symbols=("AAA",), trading_days=40, plants_per_timeframe=80))
    out = []
    for tf in ("1m", "5m", "15m"):
        bars = market.bars[("AAA", tf)]
        labels = label_bars(bars)
        for name in (*ALL_PATTERNS, "neutral"):
            for pos in np.flatnonzero(labels[name].to_numpy())[:4]:
                if pos >= 60:
                    out.append((f"AAA-{tf}-{pos}", bars.iloc[pos - 59: pos + 1], labels.iloc[pos - 2: pos + 1], tf))
    return out


def test_no_caption_names_a_held_out_pattern(windows, encoder):
    pairs, stats = build_pairs(windows, CaptionConfig(augmented_per_window=3), encoder, OfflineParaphraser())
    assert stats["windows"] == len(windows) and len(pairs) >= len(windows)
    assert not pairs["caption"].map(contains_forbidden).any()
    anatomy = pairs[pairs["detail"] == "anatomy"]
    assert len(anatomy) >= len(windows)
    assert not anatomy["caption"].map(names_a_pattern).any()


def test_named_captions_name_exactly_the_core_patterns(windows):
    rng = np.random.default_rng(0)
    from vlm_assets.captions import DISPLAY_NAMES, named_caption

    seen_zero_shot_only = False
    for _, bars, tail, tf in windows:
        ctx = describe_window(bars, tail, tf)
        text = named_caption(ctx, rng, with_trend=True, trend_threshold=1.5)
        if text is None:
            assert not ctx.patterns and ctx.zero_shot_patterns
            seen_zero_shot_only = True
            continue
        for pattern in CORE_PATTERNS:
            named = any(name in text for name in DISPLAY_NAMES[pattern])
            # "inverted hammer" contains "hammer": only check that every present pattern is named.
            if pattern in ctx.patterns:
                assert named, (pattern, text)
        if not ctx.patterns:
            assert "no" in text and "pattern" in text
    assert seen_zero_shot_only


def test_captions_are_deterministic_and_tiers_are_assigned(windows, encoder):
    a, _ = build_pairs(windows, CaptionConfig(), encoder, OfflineParaphraser())
    b, _ = build_pairs(windows, CaptionConfig(), encoder, OfflineParaphraser())
    pd.testing.assert_frame_equal(a, b)
    assert set(a["tier"]) <= {"rule_high", "rule_medium", "augmented"}
    assert set(a.loc[a["source"] == "template", "tier"]) <= {"rule_high", "rule_medium"}
    assert (a.loc[a["source"] == "offline", "tier"] == "augmented").all()
    assert set(a["detail"]) == {"name", "name_trend", "anatomy"}


def test_trend_words_follow_the_rule_engine(windows):
    rng = np.random.default_rng(0)
    from vlm_assets.captions import anatomy_caption

    for _, bars, tail, tf in windows:
        ctx = describe_window(bars, tail, tf)
        if "hammer" in ctx.patterns or "hanging_man" in ctx.zero_shot_patterns:
            text = anatomy_caption(ctx, rng, trend_threshold=1.5)
            falling = any(w in text for w in ("decline", "drop", "downtrend", "fell"))
            rising = any(w in text for w in ("rally", "rise", "uptrend", "rose"))
            assert falling if "hammer" in ctx.patterns else rising, text


def test_dedupe_keeps_drafts_and_drops_near_copies():
    vectors = np.array([[1, 0, 0], [0, 1, 0], [0.999, 0.04, 0], [0, 0, 1]], dtype=float)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    assert dedupe_by_embedding(vectors, 0.95, keep_first=2) == [0, 1, 3]
    assert dedupe_by_embedding(vectors, 0.9999, keep_first=0) == [0, 1, 2, 3]


class _ChatHandler(BaseHTTPRequestHandler):
    replies: list = []
    calls = 0

    def do_POST(self):
        type(self).calls += 1
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        assert body["messages"][0]["role"] == "user"
        status, content = self.replies.pop(0) if self.replies else (500, "down")
        payload = json.dumps({"choices": [{"message": {"content": content}}]}).encode() if status == 200 else b"error"
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


@pytest.fixture
def chat_server():
    server = HTTPServer(("127.0.0.1", 0), _ChatHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    _ChatHandler.calls, _ChatHandler.replies = 0, []
    yield f"http://127.0.0.1:{server.server_address[1]}/v1", _ChatHandler
    server.shutdown()


def test_llm_augmenter_parses_answers_and_survives_failures(chat_server):
    url, handler = chat_server
    handler.replies = [(200, "1. a candle with a tiny body\n2) a bar whose open equals its close\n- third\n")]
    augmenter = OpenAICompatibleAugmenter(base_url=url, model="any", max_failures=2, timeout=5)
    rng = np.random.default_rng(0)
    assert augmenter.variants("a candle with almost no body", 2, rng) == ["a candle with a tiny body", "a bar whose open equals its close"]
    assert augmenter.variants("x", 2, rng) == []  # HTTP 500: no variants, no exception
    assert augmenter.variants("x", 2, rng) == []
    calls = handler.calls
    assert augmenter.variants("x", 2, rng) == []  # circuit open: the endpoint is not called again
    assert handler.calls == calls == 3


def test_llm_augmenter_unreachable_endpoint_and_leaking_answers(windows, encoder, chat_server):
    dead = OpenAICompatibleAugmenter(base_url="http://127.0.0.1:9/v1", model="m", timeout=1)
    assert dead.variants("x", 2, np.random.default_rng(0)) == []
    url, handler = chat_server
    handler.replies = [(200, "looks like a shooting star\nan ordinary candle")] * len(windows)
    pairs, stats = build_pairs(windows[:10], CaptionConfig(), encoder, OpenAICompatibleAugmenter(base_url=url, model="m"))
    assert stats["variants_rejected_terms"] >= 10  # every "shooting star" variant was refused
    assert not pairs["caption"].map(contains_forbidden).any()
    assert all(p.replace("_", " ") in FORBIDDEN_TERMS for p in ZERO_SHOT_PATTERNS)
