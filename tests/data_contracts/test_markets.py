import pytest

from data_contracts.markets import is_valid_market, parse_markets, task_index, task_map, validate_market


@pytest.mark.parametrize("code", ["us", "de", "jp", "pt-br", "zh-hant", "fil"])
def test_valid_codes(code):
    assert validate_market(code) == code


@pytest.mark.parametrize("code", ["../etc", "US ", "", "x", "US", "us/../x", "a-b", None, 7, "toolong"])
def test_invalid_codes_are_named(code):
    assert not is_valid_market(code)
    with pytest.raises(ValueError, match="invalid market code"):
        validate_market(code)


def test_task_map_is_sorted_and_stable():
    assert task_map(["us", "de", "jp", "de"]) == {"de": 0, "jp": 1, "us": 2}


def test_unknown_market_error_names_known_ones():
    with pytest.raises(KeyError, match=r"unknown market 'fr'.*\['de', 'us'\]"):
        task_index(task_map(["us", "de"]), "fr")


def test_parse_markets():
    assert parse_markets("us, gb,us") == ["us", "gb"]
    with pytest.raises(ValueError):
        parse_markets("us,../etc")
    with pytest.raises(ValueError, match="no market codes"):
        parse_markets(" , ")
