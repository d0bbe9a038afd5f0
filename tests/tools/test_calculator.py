"""Tests for nimbus.adapters.tools.calculator: results, precedence, functions, every refusal."""

from __future__ import annotations

import math
import time

import pytest

from nimbus.adapters.tools.calculator import (
    MAX_EXPRESSION_LENGTH,
    CalculatorError,
    calculate,
)
from nimbus.exceptions import ToolError


@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        ("1 + 2", 3),
        ("7 - 10", -3),
        ("6 * 7", 42),
        ("7 / 2", 3.5),
        ("6 / 3", 2),
        ("7 // 2", 3),
        ("-7 // 2", -4),
        ("7 % 3", 1),
        ("-7 % 3", 2),
        ("2 ** 10", 1024),
        ("2 ** -1", 0.5),
        ("1.5 * 2", 3.0),
        ("0.1 + 0.2", 0.1 + 0.2),
        ("1e3", 1000.0),
        ("1_000 + 1", 1001),
        ("0x10 + 0b11", 19),
        ("+5", 5),
        ("--5", 5),
        ("-(-(3))", 3),
        ("  42  ", 42),
        ("9 ** 999 // 9 ** 998", 9),
        ("(((((1)))))", 1),
        ("abs(" * 80 + "-1" + ")" * 80, 1),
        ("-" * 150 + "1", 1),
        ("+".join(["1"] * 150), 150),
    ],
)
def test_arithmetic(expression: str, expected: float) -> None:
    result = calculate(expression)
    assert result == expected
    assert type(result) is type(expected)


@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        ("2 + 3 * 4", 14),
        ("(2 + 3) * 4", 20),
        ("2 * 3 ** 2", 18),
        ("-2 ** 2", -4),
        ("(-2) ** 2", 4),
        ("2 ** 3 ** 2", 512),
        ("10 - 4 - 3", 3),
        ("100 / 10 / 5", 2),
        ("2 + 10 % 4 * 3", 8),
        ("((1 + 2) * (3 + 4)) // 5", 4),
    ],
)
def test_precedence(expression: str, expected: float) -> None:
    assert calculate(expression) == expected


@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        ("sqrt(16)", 4.0),
        ("sqrt(2)", math.sqrt(2)),
        ("abs(-3)", 3),
        ("abs(-2.5)", 2.5),
        ("round(2.567, 2)", 2.57),
        ("round(2.5)", 2),
        ("round(3.7)", 4),
        ("min(3, 1, 2)", 1),
        ("max(3, 1.5, 2)", 3),
        ("floor(2.7)", 2),
        ("ceil(2.1)", 3),
        ("floor(-2.5)", -3),
        ("log(e)", 1.0),
        ("log(8, 2)", 3.0),
        ("log10(1000)", 3.0),
        ("exp(0)", 1.0),
        ("sin(0)", 0.0),
        ("cos(0)", 1.0),
        ("tan(0)", 0.0),
        ("pi", math.pi),
        ("e", math.e),
        ("2 * pi * 3", 2 * math.pi * 3),
        ("sqrt(3 ** 2 + 4 ** 2)", 5.0),
        ("max(min(5, 10), 2) + abs(-1)", 6),
    ],
)
def test_functions_and_constants(expression: str, expected: float) -> None:
    assert calculate(expression) == pytest.approx(expected)


def test_integer_results_are_ints() -> None:
    assert isinstance(calculate("2 ** 100"), int)
    assert calculate("2 ** 100") == 2**100
    assert isinstance(calculate("floor(2.5)"), int)
    assert isinstance(calculate("sqrt(4)"), float)


@pytest.mark.parametrize(
    ("expression", "message"),
    [
        # names, attributes, calls
        ("x", "unknown name 'x'"),
        ("x + 1", "unknown name 'x'"),
        ("__builtins__", "unknown name '__builtins__'"),
        ("__import__('os')", "unknown function '__import__'"),
        ("__import__('os').system('ls')", "attribute access"),
        ("os.system('ls')", "attribute access"),
        ("math.pi", "attribute access"),
        ("(1).real", "attribute access"),
        ("open('/etc/passwd')", "unknown function 'open'"),
        ("eval('1')", "unknown function 'eval'"),
        ("exec('1')", "unknown function 'exec'"),
        ("pow(2, 3)", "unknown function 'pow'"),
        ("pi(2)", "'pi' is a constant"),
        ("sqrt", "'sqrt' is a function"),
        ("sqrt(x=4)", "keyword arguments"),
        ("sqrt(1, 2)", "sqrt() takes 1 argument"),
        ("min()", "min() takes 1 to 50"),
        ("(lambda: 1)()", "only named functions"),
        ("sqrt(*[4])", "starred"),
        # other syntax
        ("lambda: 1", "lambda"),
        ("[x for x in range(3)]", "comprehension"),
        ("(x for x in range(3))", "comprehension"),
        ("{x: 1 for x in range(3)}", "comprehension"),
        ("'abc'", "strings"),
        ("'a' * 10", "strings"),
        ("b'abc'", "strings"),
        ("f'{1}'", "strings"),
        ("1j", "complex numbers"),
        ("True + 1", "booleans"),
        ("None", "constant None"),
        ("[1, 2]", "lists"),
        ("(1, 2)", "tuples"),
        ("{1: 2}", "dicts"),
        ("1 < 2", "comparisons"),
        ("1 and 2", "boolean operators"),
        ("1 if 1 else 2", "conditional"),
        ("(y := 3)", "assignment expressions"),
        ("[1][0]", "subscripts"),
        ("not 1", "operator 'not'"),
        ("~1", "operator '~'"),
        ("1 & 2", "operator '&'"),
        ("1 << 2", "operator '<<'"),
        ("2 ^ 3", "use ** for powers"),
        ("2 ^", "use ** for powers"),
        ("1 +", "syntax error"),
        ("x = 1", "syntax error"),
        ("import os", "syntax error"),
        ("", "empty expression"),
        ("   ", "empty expression"),
        # arithmetic errors
        ("1 / 0", "division by zero"),
        ("1 // 0", "division by zero"),
        ("1 % 0", "division by zero"),
        ("1.0 / 0.0", "division by zero"),
        ("0 ** -1", "division by zero"),
        ("sqrt(-1)", "math domain error"),
        ("log(0)", "math domain error"),
        ("log(-1)", "math domain error"),
        ("(-8) ** (1 / 3)", "math domain error"),
        ("round(2.5, 1.5)", "must be an integer"),
        # resource bombs
        ("2 ** 100000", "exponent too large"),
        ("9 ** 9 ** 9", "exponent too large"),
        ("10 ** -5000", "exponent too large"),
        ("(10 ** 999) ** 999", "result too large"),
        ("(2 ** 1000) ** 10 * (2 ** 1000) ** 10", "result too large"),
        ("10.0 ** 400", "result too large"),
        ("exp(1000)", "exp(): number too large"),
        ("1e999", "not a finite number"),
        ("1e308 * 10", "not a finite number"),
        ("10 ** 400 / 3", "result too large"),
        ("-" * 210 + "1", "nested too deeply"),
        ("+".join(["1"] * 200), "too complex"),
        ("1" * (MAX_EXPRESSION_LENGTH + 1), "expression too long"),
    ],
)
def test_rejections(expression: str, message: str) -> None:
    with pytest.raises(CalculatorError) as info:
        calculate(expression)
    assert message in str(info.value)


def test_error_is_value_error_and_tool_error() -> None:
    with pytest.raises(ValueError, match="division by zero"):
        calculate("1/0")
    with pytest.raises(ToolError):
        calculate("nope")


def test_non_string_rejected() -> None:
    with pytest.raises(CalculatorError, match="must be a string"):
        calculate(123)  # type: ignore[arg-type]


def test_bombs_are_refused_quickly() -> None:
    start = time.perf_counter()
    for expression in ["9 ** 9 ** 9 ** 9", "(2 ** 999) ** 999 ** 999", "2 ** 1000 ** 1000"]:
        with pytest.raises(CalculatorError):
            calculate(expression)
    assert time.perf_counter() - start < 1.0
