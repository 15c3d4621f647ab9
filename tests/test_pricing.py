"""The price table: built-in prices, config overrides, families, arithmetic.

Unit tests of llmgw.PriceTable (imported as a module).  DESIGN.md: prices in
USD per million tokens (input, cached input, output, cache write) with the
date they were last checked; a second tier for long prompts; the config's
`prices` adds or overrides entries; versioned model names fall back to their
family; a model with no price has a null cost, never zero.
"""

import datetime
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))))
import llmgw  # noqa: E402


def usage(input=0, cached=0, cache_write=0, output=0, reasoning=0):
    u = llmgw.Usage()
    u.input, u.cached, u.cache_write = input, cached, cache_write
    u.output, u.reasoning = output, reasoning
    return u


def formula(prices, input=0, cached=0, cache_write=0, output=0):
    """DESIGN.md's cost formula for one (input, cached, output, write)."""
    p_in, p_cached, p_out, p_write = prices
    total = input * p_in + output * p_out
    if cached:
        total += cached * p_cached
    if cache_write:
        total += cache_write * p_write
    return total / 1e6


@pytest.fixture(scope="module")
def table():
    return llmgw.PriceTable()


# ---------------------------------------------------------------------------
# the built-in table
# ---------------------------------------------------------------------------

def test_every_builtin_price_is_four_non_negative_numbers_per_million():
    assert llmgw.BUILTIN_PRICES
    for model, entry in llmgw.BUILTIN_PRICES.items():
        assert len(entry) == 4, model
        price_in, cached, price_out, write = entry
        for value in (price_in, price_out):
            assert isinstance(value, (int, float)) and value >= 0, model
        for value in (cached, write):
            assert value is None or (isinstance(value, (int, float))
                                     and value >= 0), model
        # per million tokens: no model costs $1000 per million input tokens
        assert price_in < 1000 and price_out < 1000, model


def test_the_table_says_when_it_was_last_checked():
    checked = datetime.datetime.strptime(llmgw.PRICES_CHECKED, "%Y-%m-%d")
    assert checked.year >= 2024


# name prefixes of each provider DESIGN.md names for the built-in table
PROVIDER_PREFIXES = {
    "openai": ("gpt-", "o1", "o3", "o4", "text-embedding-"),
    "anthropic": ("claude-",),
    "gemini": ("gemini-",),
    "mistral": ("mistral-", "codestral", "ministral-", "magistral-",
                "pixtral-", "open-mistral-"),
    "deepseek": ("deepseek-",),
    "groq": ("llama-", "meta-llama/", "openai/gpt-oss-", "qwen/",
             "moonshotai/"),
}


@pytest.mark.parametrize("provider", sorted(PROVIDER_PREFIXES))
def test_models_of_each_provider_are_priced(table, provider):
    models = [m for m in llmgw.BUILTIN_PRICES
              if m.startswith(PROVIDER_PREFIXES[provider])]

    assert models, "no built-in price for any %s model" % provider
    for model in models:
        assert table.cost(model, usage(input=1000, output=1000)) > 0, model


def test_anthropic_models_have_cache_write_prices_above_their_input_price():
    for model, (price_in, cached, _, write) in llmgw.BUILTIN_PRICES.items():
        if model.startswith("claude-"):
            assert write is not None and write > price_in, model
            assert cached is not None and cached < price_in, model


# ---------------------------------------------------------------------------
# model names
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("model, entry", [
    ("gpt-4o", "gpt-4o"),
    ("gpt-4o-2024-08-06", "gpt-4o"),
    ("gpt-4o-mini-2024-07-18", "gpt-4o-mini"),
    ("gpt-4.1-nano-2025-04-14", "gpt-4.1-nano"),
    ("o3-mini-2025-01-31", "o3-mini"),
    ("claude-sonnet-4-5-20250929", "claude-sonnet-4-5"),
    ("claude-sonnet-4-5-latest", "claude-sonnet-4-5"),
])
def test_versioned_model_names_fall_back_to_their_family(table, model,
                                                         entry):
    assert table.lookup(model) == entry


@pytest.mark.parametrize("suffix", ["-2025-04-14", "-20250929", "-latest"])
def test_every_builtin_model_with_a_version_suffix_finds_its_own_price(
        table, suffix):
    wrong = {}
    for model in llmgw.BUILTIN_PRICES:
        found = table.lookup(model + suffix)
        if found != model:
            wrong[model + suffix] = found

    assert wrong == {}


def test_a_dated_name_costs_the_same_as_its_family(table):
    u = usage(input=60, cached=40, output=30)
    assert table.cost("gpt-4o-2024-08-06", u) == table.cost("gpt-4o", u)
    assert table.cost("gpt-4o-mini-2024-07-18", u) == \
        table.cost("gpt-4o-mini", u)
    assert table.cost("gpt-4o-mini-2024-07-18", u) != table.cost("gpt-4o", u)


@pytest.mark.parametrize("model", [
    "totally-unknown-model", "llama3.1:8b", "gpt", "claude", "", None])
def test_an_unknown_model_has_no_price_and_a_null_cost(table, model):
    assert table.lookup(model) is None
    assert table.cost(model, usage(input=100, output=100)) is None
    assert table.cost(model, usage()) is None


# ---------------------------------------------------------------------------
# arithmetic
# ---------------------------------------------------------------------------

def test_openai_cost_bills_each_token_once_at_its_own_price(table):
    # prompt 100 of which 40 cached; completion 30 of which 10 reasoning
    u = usage(input=60, cached=40, output=30, reasoning=10)
    expected = formula(llmgw.BUILTIN_PRICES["gpt-4o"], input=60, cached=40,
                       output=30)

    assert table.cost("gpt-4o", u) == pytest.approx(expected)


def test_reasoning_tokens_add_nothing_beyond_the_output_they_are_part_of(
        table):
    with_reasoning = usage(input=60, cached=40, output=30, reasoning=10)
    without = usage(input=60, cached=40, output=30)

    assert table.cost("o3", with_reasoning) == table.cost("o3", without)


def test_anthropic_cost_bills_cache_reads_and_writes_at_their_prices(table):
    u = usage(input=50, cached=200, cache_write=100, output=20)
    expected = formula(llmgw.BUILTIN_PRICES["claude-sonnet-4-5"], input=50,
                       cached=200, cache_write=100, output=20)

    assert table.cost("claude-sonnet-4-5", u) == pytest.approx(expected)
    # cached tokens are cheaper than input, cache writes dearer
    assert table.cost("claude-sonnet-4-5", usage(cached=1000)) < \
        table.cost("claude-sonnet-4-5", usage(input=1000)) < \
        table.cost("claude-sonnet-4-5", usage(cache_write=1000))


def test_a_million_tokens_cost_the_listed_price(table):
    price_in, _, price_out, _ = llmgw.BUILTIN_PRICES["gpt-4o-mini"]

    assert table.cost("gpt-4o-mini", usage(input=10 ** 6)) == \
        pytest.approx(price_in)
    assert table.cost("gpt-4o-mini", usage(output=10 ** 6)) == \
        pytest.approx(price_out)


def test_zero_tokens_of_a_priced_model_cost_zero(table):
    assert table.cost("gpt-4o", usage()) == 0


# ---------------------------------------------------------------------------
# long prompts
# ---------------------------------------------------------------------------

def test_some_models_charge_more_above_a_long_prompt_threshold():
    assert llmgw.LONG_PROMPT_PRICES
    for model, tier in llmgw.LONG_PROMPT_PRICES.items():
        assert model in llmgw.BUILTIN_PRICES, model
        threshold, price_in, _, price_out, _ = tier
        base_in, _, base_out, _ = llmgw.BUILTIN_PRICES[model]
        assert threshold > 0
        assert price_in > base_in and price_out >= base_out, model


@pytest.mark.parametrize("model", sorted(llmgw.LONG_PROMPT_PRICES))
def test_a_long_prompt_is_billed_entirely_at_the_higher_tier(table, model):
    threshold, *tier = llmgw.LONG_PROMPT_PRICES[model]
    base = llmgw.BUILTIN_PRICES[model]

    short = usage(input=threshold, output=1000)
    long = usage(input=threshold + 1, output=1000)

    assert table.cost(model, short) == pytest.approx(
        formula(base, input=threshold, output=1000))
    assert table.cost(model, long) == pytest.approx(
        formula(tier, input=threshold + 1, output=1000))


def test_cached_and_cache_write_tokens_count_toward_a_long_prompt(table):
    model = "claude-sonnet-4-5"
    threshold, *tier = llmgw.LONG_PROMPT_PRICES[model]
    u = usage(input=threshold // 2, cached=threshold // 4,
              cache_write=threshold // 4 + 10, output=100)

    assert table.cost(model, u) == pytest.approx(formula(
        tier, input=u.input, cached=u.cached, cache_write=u.cache_write,
        output=100))


def test_a_dated_name_of_a_long_prompt_model_gets_the_higher_tier(table):
    threshold, *tier = llmgw.LONG_PROMPT_PRICES["claude-sonnet-4-5"]
    u = usage(input=threshold + 5000, output=10)

    assert table.cost("claude-sonnet-4-5-20250929", u) == pytest.approx(
        formula(tier, input=threshold + 5000, output=10))


# ---------------------------------------------------------------------------
# config overrides
# ---------------------------------------------------------------------------

def test_the_config_adds_a_model_with_its_prices():
    table = llmgw.PriceTable({"my-finetune": {
        "input": 3.0, "output": 12.0, "cached_input": 1.5}})
    u = usage(input=1000, cached=2000, output=500)

    assert table.lookup("my-finetune") == "my-finetune"
    assert table.cost("my-finetune", u) == pytest.approx(
        (1000 * 3.0 + 2000 * 1.5 + 500 * 12.0) / 1e6)


def test_the_config_overrides_a_builtin_price_and_its_dated_names():
    table = llmgw.PriceTable({"gpt-4o": {"input": 1.0, "output": 2.0,
                                         "cached_input": 0.5}})
    u = usage(input=100, cached=50, output=10)
    expected = (100 * 1.0 + 50 * 0.5 + 10 * 2.0) / 1e6

    assert table.cost("gpt-4o", u) == pytest.approx(expected)
    assert table.cost("gpt-4o-2024-08-06", u) == pytest.approx(expected)
    # other models keep their built-in prices
    assert table.cost("gpt-4o-mini", u) == pytest.approx(
        formula(llmgw.BUILTIN_PRICES["gpt-4o-mini"], input=100, cached=50,
                output=10))


def test_an_overridden_model_keeps_the_config_price_for_long_prompts():
    table = llmgw.PriceTable({"claude-sonnet-4-5": {
        "input": 1.0, "output": 2.0, "cached_input": 0.1,
        "cache_write": 1.5}})
    u = usage(input=500000, output=1000)

    assert table.cost("claude-sonnet-4-5", u) == pytest.approx(
        (500000 * 1.0 + 1000 * 2.0) / 1e6)


def test_the_config_does_not_change_the_builtin_table_of_other_instances():
    llmgw.PriceTable({"gpt-4o": {"input": 99.0, "output": 99.0}})
    fresh = llmgw.PriceTable()

    assert fresh.cost("gpt-4o", usage(input=10 ** 6)) == pytest.approx(
        llmgw.BUILTIN_PRICES["gpt-4o"][0])
