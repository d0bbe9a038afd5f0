"""Safe arithmetic for agents: ``calculate("2 * (3 + 4) ** 2")``.

The expression is parsed with :func:`ast.parse` and evaluated by walking a whitelist
of node types; nothing is ever passed to ``eval``/``exec``. Resource bombs are
refused *before* they are computed: the input length, the AST size and depth, the
exponent of integer powers and the bit length of every integer result are capped.

Every failure raises :class:`CalculatorError` with a short message the model can act
on ("division by zero", "unknown name 'x'", "use ** for powers", ...).
"""

from __future__ import annotations

import ast
import math
from collections.abc import Callable
from typing import Any

from nimbus.exceptions import ToolError

__all__ = [
    "MAX_DEPTH",
    "MAX_EXPONENT",
    "MAX_EXPRESSION_LENGTH",
    "MAX_INT_BITS",
    "MAX_NODES",
    "CalculatorError",
    "calculate",
]

Number = int | float

MAX_EXPRESSION_LENGTH = 500
"""Longest accepted expression, in characters."""
MAX_NODES = 500
"""Most AST nodes (operators included) an expression may have: about 160 terms."""
MAX_DEPTH = 200
"""Deepest AST nesting accepted (bounds the recursion of the evaluator)."""
MAX_EXPONENT = 1000
"""Largest ``|exponent|`` accepted for an integer power."""
MAX_INT_BITS = 10_000
"""Largest integer result accepted, in bits (about 3,000 decimal digits)."""


class CalculatorError(ToolError, ValueError):
    """The expression is invalid, unsupported, too large, or mathematically undefined."""


def _round(x: Number, ndigits: Number | None = None) -> Number:
    if ndigits is None:
        return round(x)
    if not isinstance(ndigits, int):
        raise CalculatorError("round(): the number of digits must be an integer")
    return round(x, ndigits)


def _log(x: Number, base: Number | None = None) -> float:
    return math.log(x) if base is None else math.log(x, base)


def _minmax(fn: Callable[..., Any], name: str) -> Callable[..., Number]:
    def inner(*args: Number) -> Number:
        if not args:
            raise CalculatorError(f"{name}() needs at least one argument")
        result: Number = fn(args)
        return result

    return inner


# name -> (callable, min args, max args)
_FUNCTIONS: dict[str, tuple[Callable[..., Number], int, int]] = {
    "sqrt": (math.sqrt, 1, 1),
    "abs": (abs, 1, 1),
    "round": (_round, 1, 2),
    "min": (_minmax(min, "min"), 1, 50),
    "max": (_minmax(max, "max"), 1, 50),
    "floor": (math.floor, 1, 1),
    "ceil": (math.ceil, 1, 1),
    "log": (_log, 1, 2),
    "log10": (math.log10, 1, 1),
    "exp": (math.exp, 1, 1),
    "sin": (math.sin, 1, 1),
    "cos": (math.cos, 1, 1),
    "tan": (math.tan, 1, 1),
}
_CONSTANTS: dict[str, float] = {"pi": math.pi, "e": math.e}

_UNSUPPORTED: dict[type[ast.AST], str] = {
    ast.Attribute: "attribute access",
    ast.Subscript: "subscripts/indexing",
    ast.Lambda: "lambda",
    ast.ListComp: "comprehension",
    ast.SetComp: "comprehension",
    ast.DictComp: "comprehension",
    ast.GeneratorExp: "comprehension",
    ast.Compare: "comparisons",
    ast.BoolOp: "boolean operators (and/or)",
    ast.IfExp: "conditional expressions",
    ast.NamedExpr: "assignment expressions (:=)",
    ast.List: "lists",
    ast.Tuple: "tuples",
    ast.Set: "sets",
    ast.Dict: "dicts",
    ast.JoinedStr: "strings",
    ast.Starred: "starred arguments",
    ast.Await: "await",
    ast.Yield: "yield",
    ast.YieldFrom: "yield",
}

_BINOP_NAMES: dict[type[ast.operator], str] = {
    ast.BitAnd: "&",
    ast.BitOr: "|",
    ast.LShift: "<<",
    ast.RShift: ">>",
    ast.MatMult: "@",
}


def calculate(expression: str) -> int | float:
    """Evaluate an arithmetic expression safely and return its value.

    Supports int and float literals, unary ``+``/``-``, binary ``+ - * / // % **``,
    parentheses, the functions ``sqrt abs round min max floor ceil log log10 exp sin
    cos tan`` and the constants ``pi`` and ``e``.

    The result is an ``int`` when it comes from integer operations only (an exact
    integer division such as ``6 / 3`` also gives ``int``), otherwise a ``float``.

    Raises:
        CalculatorError: on a syntax error, an unsupported construct, an unknown name,
            division by zero, a math domain error, or a result/exponent/input that is
            too large.
    """
    if not isinstance(expression, str):
        raise CalculatorError("the expression must be a string")
    text = expression.strip()
    if not text:
        raise CalculatorError("empty expression")
    if len(text) > MAX_EXPRESSION_LENGTH:
        raise CalculatorError(
            f"expression too long ({len(text)} characters; the limit is {MAX_EXPRESSION_LENGTH})"
        )
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError as exc:
        hint = "; use ** for powers" if "^" in text else ""
        raise CalculatorError(f"syntax error: {exc.msg}{hint}") from None
    except (ValueError, RecursionError, MemoryError):
        raise CalculatorError("expression could not be parsed") from None
    _check_size(tree)
    result = _eval(tree.body)
    if isinstance(result, float) and not math.isfinite(result):
        raise CalculatorError("result is not a finite number (overflow)")
    return result


def _check_size(tree: ast.AST) -> None:
    """Refuse trees that have too many nodes or are nested too deeply (iteratively)."""
    count = 0
    stack: list[tuple[ast.AST, int]] = [(tree, 0)]
    while stack:
        node, depth = stack.pop()
        count += 1
        if count > MAX_NODES:
            raise CalculatorError(f"expression too complex (more than {MAX_NODES} elements)")
        if depth > MAX_DEPTH:
            raise CalculatorError(f"expression nested too deeply (more than {MAX_DEPTH} levels)")
        stack.extend((child, depth + 1) for child in ast.iter_child_nodes(node))


def _eval(node: ast.expr) -> Number:
    if isinstance(node, ast.Constant):
        return _constant(node.value)
    if isinstance(node, ast.Name):
        return _name(node.id)
    if isinstance(node, ast.UnaryOp):
        operand = _eval(node.operand)
        if isinstance(node.op, ast.USub):
            return -operand
        if isinstance(node.op, ast.UAdd):
            return +operand
        op = "not" if isinstance(node.op, ast.Not) else "~"
        raise CalculatorError(f"unsupported syntax: operator '{op}'")
    if isinstance(node, ast.BinOp):
        if isinstance(node.op, ast.BitXor):
            raise CalculatorError("'^' is not a power operator; use ** for powers")
        if type(node.op) in _BINOP_NAMES:
            raise CalculatorError(f"unsupported syntax: operator '{_BINOP_NAMES[type(node.op)]}'")
        return _binop(node.op, _eval(node.left), _eval(node.right))
    if isinstance(node, ast.Call):
        return _call(node)
    what = _UNSUPPORTED.get(type(node), type(node).__name__)
    raise CalculatorError(f"unsupported syntax: {what}")


def _constant(value: object) -> Number:
    if isinstance(value, bool):
        raise CalculatorError("unsupported syntax: booleans")
    if isinstance(value, int | float):
        return _checked(value)
    if isinstance(value, str | bytes):
        raise CalculatorError("unsupported syntax: strings")
    if isinstance(value, complex):
        raise CalculatorError("unsupported syntax: complex numbers")
    raise CalculatorError(f"unsupported syntax: constant {value!r}")


def _name(name: str) -> Number:
    if name in _CONSTANTS:
        return _CONSTANTS[name]
    if name in _FUNCTIONS:
        raise CalculatorError(f"'{name}' is a function; call it like {name}(x)")
    raise CalculatorError(f"unknown name '{name}'")


def _call(node: ast.Call) -> Number:
    if not isinstance(node.func, ast.Name):
        if isinstance(node.func, ast.Attribute):
            raise CalculatorError("unsupported syntax: attribute access")
        raise CalculatorError("unsupported syntax: only named functions can be called")
    name = node.func.id
    if name in _CONSTANTS:
        raise CalculatorError(f"'{name}' is a constant, not a function")
    if name not in _FUNCTIONS:
        allowed = ", ".join(sorted(_FUNCTIONS))
        raise CalculatorError(f"unknown function '{name}' (allowed: {allowed})")
    if node.keywords:
        raise CalculatorError(f"{name}(): keyword arguments are not supported")
    fn, lo, hi = _FUNCTIONS[name]
    if not lo <= len(node.args) <= hi:
        expected = str(lo) if lo == hi else f"{lo} to {hi}"
        raise CalculatorError(f"{name}() takes {expected} argument(s), got {len(node.args)}")
    args = [_eval(arg) for arg in node.args]
    try:
        return _checked(fn(*args))
    except CalculatorError:
        raise
    except ZeroDivisionError:
        raise CalculatorError(f"{name}(): division by zero") from None
    except OverflowError:
        raise CalculatorError(f"{name}(): number too large for floating point") from None
    except (ValueError, TypeError):
        raise CalculatorError(f"{name}(): math domain error (argument out of range)") from None


def _binop(op: ast.operator, left: Number, right: Number) -> Number:
    try:
        if isinstance(op, ast.Add):
            result: Number = left + right
        elif isinstance(op, ast.Sub):
            result = left - right
        elif isinstance(op, ast.Mult):
            result = left * right
        elif isinstance(op, ast.Div):
            if isinstance(left, int) and isinstance(right, int) and right and not left % right:
                result = left // right  # exact: keep it an int
            else:
                result = left / right
        elif isinstance(op, ast.FloorDiv):
            result = left // right
        elif isinstance(op, ast.Mod):
            result = left % right
        elif isinstance(op, ast.Pow):
            result = _power(left, right)
        else:  # pragma: no cover - every other operator is refused by _eval
            raise CalculatorError(f"unsupported syntax: {type(op).__name__}")
    except ZeroDivisionError:
        raise CalculatorError("division by zero") from None
    except OverflowError:
        raise CalculatorError("result too large") from None
    return _checked(result)


def _power(base: Number, exponent: Number) -> Number:
    if isinstance(base, int) and isinstance(exponent, int):
        if abs(exponent) > MAX_EXPONENT:
            raise CalculatorError(f"exponent too large (|exponent| must be <= {MAX_EXPONENT})")
        # Estimate the size of the result before computing it.
        if exponent > 0 and abs(base) > 1 and math.log2(abs(base)) * exponent > MAX_INT_BITS:
            raise CalculatorError(f"result too large (more than {MAX_INT_BITS} bits)")
    result: Any = base**exponent
    if isinstance(result, complex):
        raise CalculatorError("math domain error: fractional power of a negative number")
    return _checked(result)


def _checked(value: Number) -> Number:
    if isinstance(value, int) and value.bit_length() > MAX_INT_BITS:
        raise CalculatorError(f"result too large (more than {MAX_INT_BITS} bits)")
    if isinstance(value, float) and not math.isfinite(value):
        raise CalculatorError("result is not a finite number (overflow)")
    return value
