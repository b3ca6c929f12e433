"""TuCo per token as colour: the HTML page (also in a real headless browser), the terminal and notebooks."""

from __future__ import annotations

import html
import io
import re

import pytest
import torch
from helpers.browser import render
from helpers.models import family_config, lora_model
from transformers import AutoModelForCausalLM

import tuco_peft
from tuco_peft.demo.build import build_tokenizer
from tuco_peft.errors import InputError
from tuco_peft.views import (
    ScoredText,
    ScoredToken,
    TokenReport,
    print_tokens,
    render_html,
    texts_from_decomposition,
    texts_from_generation,
    token_texts,
    write_html,
)
from tuco_peft.views.colours import css, tuco_rgb

_PROMPTS = ["the old mill by the water", "how can I help you today? tell me"]


@pytest.fixture(scope="module")
def model_and_tokenizer():
    tokenizer = build_tokenizer(_PROMPTS * 5 + ["a small model reads a short prompt"] * 5, vocab_size=200)
    config = family_config("llama")
    config.vocab_size = len(tokenizer)
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    return lora_model(base), tokenizer


@pytest.fixture(scope="module")
def batch(model_and_tokenizer):
    """The prompts, left-padded, and their decomposition at every position."""
    model, tokenizer = model_and_tokenizer
    tokenizer.padding_side = "left"
    encoded = tokenizer(_PROMPTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        decomposition = tuco_peft.decompose(model, encoded["input_ids"], encoded["attention_mask"], positions="all")
    return encoded["input_ids"], encoded["attention_mask"], decomposition


def test_texts_from_decomposition_keep_every_token_and_its_numbers(model_and_tokenizer, batch):
    _, tokenizer = model_and_tokenizer
    input_ids, attention_mask, decomposition = batch
    texts = texts_from_decomposition(decomposition, input_ids, attention_mask, tokenizer, titles=["a", "b"])
    ptc_norm, ftc_norm = decomposition.layer_norms()
    for row, (text, prompt) in enumerate(zip(texts, _PROMPTS)):
        assert text.title == "ab"[row]
        assert "".join(token.text for token in text.tokens) == prompt
        real = attention_mask[row].nonzero().flatten().tolist()
        assert len(text.tokens) == len(real)
        for token, position in zip(text.tokens, real):
            assert token.tuco == pytest.approx(float(decomposition.tuco[row, position]))
            assert token.ptc_l1 == pytest.approx(ptc_norm[row, :, position].tolist())
            assert token.ftc_l1 == pytest.approx(ftc_norm[row, :, position].tolist())
        assert text.headline() == ("TuCo at the last token", pytest.approx(float(decomposition.tuco[row, -1])))
    # Without the mask, padding is read from the rows decompose zeroed; without ids, positions label the tokens.
    unmasked = texts_from_decomposition(decomposition, input_ids, None, tokenizer)
    assert [len(t.tokens) for t in unmasked] == [len(t.tokens) for t in texts]
    bare = texts_from_decomposition(decomposition)
    assert [token.text for token in bare[0].tokens][-1] == f"[{input_ids.shape[1] - 1}]"


def test_token_texts_give_a_split_character_to_the_token_that_completes_it(model_and_tokenizer):
    _, tokenizer = model_and_tokenizer
    ids = tokenizer("the mill é")["input_ids"]
    assert tokenizer.decode(ids[-2:]) == "é"  # two byte tokens
    assert token_texts(tokenizer, ids)[-2:] == ["", "é"]
    cut = ids[:-1] + ids[-2:-1] + ids[-2:-1]  # a generation stopped mid-character: shown as decode shows it
    assert "".join(token_texts(tokenizer, cut)) == tokenizer.decode(cut)


def test_last_position_scores_only_the_last_token(model_and_tokenizer, batch):
    model, tokenizer = model_and_tokenizer
    input_ids, attention_mask, _ = batch
    with torch.no_grad():
        last = tuco_peft.decompose(model, input_ids, attention_mask)
    texts = texts_from_decomposition(last, input_ids, attention_mask, tokenizer)
    for row, text in enumerate(texts):
        scored = [token for token in text.tokens if token.tuco is not None]
        assert len(scored) == 1 and scored[0] is text.tokens[-1]
        assert scored[0].tuco == pytest.approx(float(last.tuco[row]))
        assert text.profile() == (scored[0].ptc_l1, scored[0].ftc_l1)


def _spans(page: str) -> list[tuple[str, str]]:
    """(style, text) of every scored token span."""
    pattern = r'<span class="tuco-tok[^"]*" data-text="\d+" data-token="\d+" style="([^"]*)"[^>]*>(.*?)</span>'
    found = re.findall(pattern, page)
    return [(style, html.unescape(text)) for style, text in found]


def test_page_colours_every_scored_token_and_is_self_contained(model_and_tokenizer, batch, tmp_path):
    _, tokenizer = model_and_tokenizer
    input_ids, attention_mask, decomposition = batch
    texts = texts_from_decomposition(decomposition, input_ids, attention_mask, tokenizer)
    page = write_html(texts, tmp_path / "report.html").read_text(encoding="utf-8")
    tokens = [token for text in texts for token in text.tokens]
    assert [text for _, text in _spans(page)] == [token.text for token in tokens]
    for (style, _), token in zip(_spans(page), tokens):
        assert f"background: {css(tuco_rgb(token.tuco))}" in style
    assert "<svg" in page and "‖FTC_l‖₁" in page  # the per-block profile
    assert "TuCo at the last token" in page  # the summary
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)  # nothing loaded from a network


def test_page_escapes_what_it_shows(tmp_path):
    hostile = ScoredText(
        "<b>title</b>",
        (
            ScoredToken("<script>alert(1)</script>", 0.2, (1.0,), (0.5,)),
            ScoredToken(' & "quoted" ', 0.9, (1.0,), (2.0,)),
            ScoredToken("</script><img src=x onerror=alert(2)>"),
        ),
        note="<i>note</i>",
    )
    page = render_html([hostile], title="<title>")
    assert "<script>alert" not in page and "<img" not in page and "<b>title" not in page and "<i>note" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "&amp; &quot;quoted&quot;" in page
    assert page.count("</script>") == 2  # the data block and the script: nothing in the data closes them


def _texts(count: int) -> list[ScoredText]:
    return [ScoredText(f"prompt {i}", (ScoredToken("a", 0.5, (1.0,), (1.0,)),)) for i in range(count)]


def test_the_summary_counts_one_text_or_several_texts():
    one, two = render_html(_texts(1)), render_html(_texts(2))
    assert "<p>1 text.</p>" in one and "1 texts" not in one
    assert "<p>2 texts; over their values below: mean 0.500, min 0.500, max 0.500.</p>" in two


def test_a_long_per_text_table_is_folded_so_the_texts_come_first():
    short, long = render_html(_texts(3)), render_html(_texts(40))
    assert "<details>" not in short and "<td>prompt 2</td>" in short
    assert "<details><summary>the 40 texts, one row each</summary><table>" in long and "<td>prompt 39</td>" in long


def test_write_html_refuses_a_missing_folder(tmp_path):
    with pytest.raises(InputError, match="does not exist") as error:
        write_html([], tmp_path / "missing" / "report.html")
    assert "\n" not in str(error.value)


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _example() -> ScoredText:
    return ScoredText("t", (ScoredToken("prompt "), ScoredToken("new", 0.8, generated=True)))


def test_terminal_plain_when_piped_or_no_color(monkeypatch):
    monkeypatch.delenv("NO_COLOR", raising=False)
    piped = io.StringIO()
    print_tokens(_example(), piped)
    assert piped.getvalue() == "prompt new\n"
    monkeypatch.setenv("NO_COLOR", "1")
    terminal = _Terminal()
    print_tokens(_example(), terminal)
    assert terminal.getvalue() == "prompt new\n"


def test_terminal_colours_tokens_by_tuco(monkeypatch):
    monkeypatch.delenv("NO_COLOR", raising=False)
    # Forced colour first: rich caches a style's escape codes for the colour system it first met.
    for stream, colour in ((io.StringIO(), True), (_Terminal(), None)):
        print_tokens(_example(), stream, colour=colour)
        out = stream.getvalue()
        assert "prompt " in out and "new" in out and "\x1b[" in out
        if colour:  # forced: 24-bit colour, the exact background of TuCo 0.8
            assert "48;2;{};{};{}".format(*tuco_rgb(0.8)) in out


def test_notebook_views(model_and_tokenizer, batch):
    model, tokenizer = model_and_tokenizer
    input_ids, attention_mask, decomposition = batch
    fragment = decomposition._repr_html_()
    assert fragment.startswith('<div class="tuco-view"') and "<html" not in fragment
    assert f"[{input_ids.shape[1] - 1}]" in fragment
    report = decomposition.view(tokenizer, input_ids, attention_mask)
    assert isinstance(report, TokenReport)
    assert [text for _, text in _spans(report._repr_html_())][-3:] == [t.text for t in report.texts[-1].tokens[-3:]]

    prompt = tokenizer(["how can I help"], return_tensors="pt")
    generation = tuco_peft.generate(model, prompt["input_ids"], max_new_tokens=3, do_sample=False)
    texts = texts_from_generation(generation, tokenizer)
    new = [token for token in texts[0].tokens if token.generated]
    assert len(new) == 3 and [t.tuco for t in new] == pytest.approx(generation.tuco[0].tolist())
    assert "".join(t.text for t in texts[0].tokens) == tokenizer.decode(generation.sequences[0])
    shown = generation.view(tokenizer)._repr_html_()
    assert "per-block norms are not recorded" in shown and "tuco-new" in shown
    assert "[" in generation._repr_html_()


def test_page_renders_in_a_headless_browser(model_and_tokenizer, batch, tmp_path):
    _, tokenizer = model_and_tokenizer
    input_ids, attention_mask, decomposition = batch
    texts = texts_from_decomposition(decomposition, input_ids, attention_mask, tokenizer)
    page = write_html(texts, tmp_path / "report.html")
    screenshot = tmp_path / "report.png"
    dom = render(page, screenshot, tmp_path / "profile", "1000,1200")
    rendered = _spans(dom)
    tokens = [token for text in texts for token in text.tokens]
    assert [text for _, text in rendered] == [token.text for token in tokens]
    for (style, _), token in zip(rendered, tokens):
        assert css(tuco_rgb(token.tuco)) in style
    # The script ran: every text's last token is picked and its per-block table drawn.
    assert len(re.findall(r'class="[^"]*tuco-picked', dom)) == len(texts)
    assert dom.count("<tbody><tr><th>block</th>") == len(texts)
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
