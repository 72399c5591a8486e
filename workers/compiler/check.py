"""Type checking: AST → typed expression (:class:`~workers.compiler.texpr.Linear`).

Values are numbers or adapters. The checker folds constants, enforces the operator rules (a number times
an adapter, never adapter·adapter or number+adapter), binds call arguments against the function table
(arity, keywords, types, bounds) and expands ``lerp``. Names are pinned through the
:class:`~workers.compiler.resolve.Resolver`. Recursion is bounded by the AST's depth, which the parser
limits (sums and products are n-ary).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from workers.compiler import ast
from workers.compiler.errors import CompileError, Span, did_you_mean
from workers.compiler.functions import FUNCTIONS, FunctionSpec, Param, function_names
from workers.compiler.resolve import Resolver
from workers.compiler.selectors import SelectorError, format_layers, format_modules, parse_layers, parse_modules
from workers.compiler.texpr import Apply, ArgValue, Linear, LinearBuilder, all_finite, linear_sum

Scalar = int | float
Value = Scalar | Linear
_MAX_INT = 2**64
_TRUE = {"true", "True", "TRUE", "yes"}
_FALSE = {"false", "False", "FALSE", "no"}
_ADD_HINT = "scale the adapter instead, e.g. 0.5*code"


class Checker:
    """Evaluates an AST into a typed expression; one instance per compilation."""

    def __init__(self, resolver: Resolver) -> None:
        self._resolver = resolver

    def check(self, node: ast.Node) -> Linear:
        """The adapter the whole expression denotes (a number is a type error)."""
        value = self.value(node)
        if not isinstance(value, Linear):
            raise CompileError(
                "type_error", "the expression is a number; it must be an adapter, e.g. 0.5*code", node.span
            )
        return value

    # -- values --------------------------------------------------------------------------------------------
    def value(self, node: ast.Node) -> Value:
        if isinstance(node, ast.Number):
            return node.value
        if isinstance(node, ast.Ref):
            return Linear.of(self._resolver.leaf(node))
        if isinstance(node, ast.BaseModelRef):
            if node.model is not None:
                self._resolver.pin_base(node.model, node.span)
            return Linear()
        if isinstance(node, ast.Neg):
            inner = self.value(node.operand)
            return inner.scaled(-1.0) if isinstance(inner, Linear) else _arith("-", 0, inner, node.span)
        if isinstance(node, ast.Sum):
            return self._sum(node)
        if isinstance(node, ast.Product):
            return self._product(node)
        if isinstance(node, ast.Call):
            return self._call(node)
        raise CompileError(
            "type_error", "a tuple is only allowed as an argument, as in orth(code, against=(math, toxic))", node.span
        )

    def _sum(self, node: ast.Sum) -> Value:
        values = [(op, item, self.value(item)) for op, item in node.items]
        adapters = [v for _op, _item, v in values if isinstance(v, Linear)]
        if not adapters:
            total: Scalar = 0
            for op, item, v in values:
                assert not isinstance(v, Linear)
                total = _arith(op, total, v, item.span)
            return total
        if len(adapters) != len(values):
            op, culprit = next((op, item) for op, item, v in values if not isinstance(v, Linear))
            verb = "subtract" if op == "-" else "add"
            raise CompileError("type_error", f"cannot {verb} a number and an adapter; {_ADD_HINT}", culprit.span)
        builder = LinearBuilder()
        for op, _item, v in values:
            assert isinstance(v, Linear)
            builder.add(v, 1.0 if op == "+" else -1.0)
        if not builder.finite:
            raise CompileError("bad_number", "this sum overflows; use smaller numbers", node.span)
        return builder.build()

    def _product(self, node: ast.Product) -> Value:
        acc = self.value(node.items[0][1])
        for op, item in node.items[1:]:
            right = self.value(item)
            if op == "*":
                if isinstance(acc, Linear) and isinstance(right, Linear):
                    raise CompileError(
                        "type_error",
                        "cannot multiply two adapters; multiply an adapter by a number, e.g. 0.5*code",
                        item.span,
                    )
                if isinstance(acc, Linear) or isinstance(right, Linear):
                    adapter, factor = (acc, right) if isinstance(acc, Linear) else (right, acc)
                    assert isinstance(adapter, Linear) and not isinstance(factor, Linear)
                    acc = _scaled(adapter, float(factor), node.span)
                else:
                    acc = _arith("*", acc, right, node.span)
                continue
            if isinstance(right, Linear):
                raise CompileError("type_error", "cannot divide by an adapter; divide by a number", item.span)
            if right == 0:
                raise CompileError("division_by_zero", "division by zero", item.span)
            if isinstance(acc, Linear):
                acc = _scaled(acc, 1.0 / right, node.span)
            else:
                acc = _arith("/", acc, right, node.span)
        return acc

    # -- calls ---------------------------------------------------------------------------------------------
    def _call(self, node: ast.Call) -> Linear:
        spec = FUNCTIONS.get(node.name)
        if spec is None:
            raise CompileError(
                "unknown_function",
                f"unknown function {node.name!r}{did_you_mean(node.name, function_names())}; "
                f"the functions are {', '.join(function_names())} (`graft functions` describes them)",
                node.name_span,
            )
        if node.positional_after_keyword is not None:
            raise CompileError(
                "syntax", "a positional argument cannot follow a keyword argument", node.positional_after_keyword
            )
        inputs, given = _bind(spec, node)
        input_values = [self._adapter(spec, spec.variadic, item) for item in inputs]
        _check_required(spec, node, given)
        args: list[tuple[str, ArgValue]] = []
        for param in spec.params:
            if param.name in given:
                arg_node = given[param.name]
                args.append((param.name, self._argument(spec, param, arg_node)))
            else:
                args.append((param.name, _default(param)))
        return _apply(spec, input_values, args)

    def _argument(self, spec: FunctionSpec, param: Param, node: ast.Node) -> ArgValue:
        if param.type == "adapter":
            return self._adapter(spec, param, node)
        if param.type == "adapters":
            items = node.items if isinstance(node, ast.Tuple) else (node,)
            if not items:
                raise CompileError("bad_value", f"{param.name}=() is empty; give at least one adapter", node.span)
            return tuple(self._adapter(spec, param, item) for item in items)
        if param.type == "str":
            return _string(spec, param, node)
        if param.type == "bool":
            return _flag(spec, param, node)
        return self._number(spec, param, node)

    def _adapter(self, spec: FunctionSpec, param: Param | None, node: ast.Node) -> Linear:
        value = self.value(node)
        if not isinstance(value, Linear):
            what = f"{param.name} of {spec.name}" if param is not None and param.name != "inputs" else spec.name
            hint = " (give other arguments by keyword, e.g. density=0.5)" if spec.variadic is not None else ""
            raise CompileError("type_error", f"{what} takes an adapter here, not a number{hint}", node.span)
        return value

    def _number(self, spec: FunctionSpec, param: Param, node: ast.Node) -> Scalar:
        if isinstance(node, ast.Ref) and node.quoted and node.version is None:
            raise CompileError("type_error", f"{param.name} must be a number, not a string", node.span)
        if isinstance(node, ast.Tuple):
            raise CompileError("type_error", f"{param.name} must be a number, not a tuple", node.span)
        value = self.value(node)
        if isinstance(value, Linear):
            raise CompileError("type_error", f"{param.name} must be a number, not an adapter", node.span)
        if param.type == "int":
            if isinstance(value, float) and not value.is_integer():
                raise CompileError("type_error", f"{param.name} must be a whole number; got {value:g}", node.span)
            value = int(value)
        else:
            value = float(value)
        if not param.in_bounds(value):
            raise CompileError(
                "out_of_bounds",
                f"{param.name} of {spec.name} must be {_bounds_phrase(param)}; got {value:g}",
                node.span,
            )
        return value


# -- binding ---------------------------------------------------------------------------------------------------


def _bind(spec: FunctionSpec, node: ast.Call) -> tuple[Sequence[ast.Node], dict[str, ast.Node]]:
    """Match arguments to parameters: (variadic inputs, parameter name → argument node)."""
    given: dict[str, ast.Node] = {}
    inputs: Sequence[ast.Node] = ()
    if spec.variadic is not None:
        inputs = node.args
        if len(inputs) < spec.min_inputs:
            raise CompileError(
                "arity",
                f"{spec.name} needs at least {spec.min_inputs} adapter(s) as positional arguments, e.g. {spec.example}",
                node.span,
            )
    else:
        if len(node.args) > len(spec.params):
            names = ", ".join(spec.param_names)
            raise CompileError(
                "arity",
                f"{spec.name} takes at most {len(spec.params)} positional argument(s) ({names}); got {len(node.args)}",
                node.args[len(spec.params)].span,
            )
        for param, arg in zip(spec.params, node.args, strict=False):
            given[param.name] = arg
    for keyword in node.kwargs:
        if spec.param(keyword.name) is None:
            options = ", ".join(spec.param_names)
            raise CompileError(
                "unknown_keyword",
                f"{spec.name} has no parameter {keyword.name!r}{did_you_mean(keyword.name, spec.param_names)}; "
                f"its parameters are {options}",
                keyword.span,
            )
        if keyword.name in given:
            raise CompileError("duplicate_argument", f"{keyword.name} is given more than once", keyword.span)
        given[keyword.name] = keyword.value
    return inputs, given


def _check_required(spec: FunctionSpec, node: ast.Call, given: dict[str, ast.Node]) -> None:
    """Every required parameter is given, one of ``requires_one_of`` is, and not two ``exclusive`` ones."""
    for param in spec.params:
        if param.required and param.name not in given:
            raise CompileError(
                "missing_argument",
                f"{spec.name} is missing {param.name} ({param.describe()}); e.g. {spec.example}",
                node.span,
            )
    if spec.requires_one_of and not any(name in given for name in spec.requires_one_of):
        options = " or ".join(f"{name}=" for name in spec.requires_one_of)
        raise CompileError("missing_argument", f"{spec.name} needs {options}; e.g. {spec.example}", node.span)
    present = [name for name in spec.exclusive if name in given]
    if len(present) > 1:
        raise CompileError(
            "conflicting_arguments",
            f"give {spec.name} either {' or '.join(f'{n}=' for n in spec.exclusive)}, not both",
            _keyword_span(node, present[1]),
        )


def _keyword_span(node: ast.Call, name: str) -> Span:
    return next((k.span for k in node.kwargs if k.name == name), node.span)


def _default(param: Param) -> ArgValue:
    value = param.default
    assert value is None or isinstance(value, bool | int | float | str)
    return value


def _string(spec: FunctionSpec, param: Param, node: ast.Node) -> str:
    if not (isinstance(node, ast.Ref) and node.quoted and node.version is None):
        example = param.choices[0] if param.choices else "0-15" if param.name == "layers" else "q_proj|v_proj"
        raise CompileError(
            "type_error", f'{param.name} must be a quoted string, e.g. {param.name}="{example}"', node.span
        )
    text = node.name
    if param.choices and text not in param.choices:
        options = " or ".join(f'"{c}"' for c in param.choices)
        raise CompileError(
            "bad_value",
            f"{param.name} of {spec.name} must be {options}; got {text!r}{did_you_mean(text, param.choices)}",
            node.span,
        )
    try:
        if spec.kind == "select" and param.name == "layers":
            return format_layers(parse_layers(text))
        if spec.kind == "select" and param.name == "modules":
            return format_modules(parse_modules(text))
    except SelectorError as exc:
        raise CompileError("bad_value", str(exc), node.span) from None
    return text


def _flag(spec: FunctionSpec, param: Param, node: ast.Node) -> bool:
    if isinstance(node, ast.Ref) and not node.quoted and node.version is None:
        if node.name in _TRUE:
            return True
        if node.name in _FALSE:
            return False
    if isinstance(node, ast.Number) and node.value in (0, 1):
        return bool(node.value)
    raise CompileError("type_error", f"{param.name} of {spec.name} must be true or false", node.span)


def _bounds_phrase(param: Param) -> str:
    bounds = param.bounds_text()
    return f"in {bounds}" if bounds.startswith(("(", "[")) else bounds


# -- building the typed call -----------------------------------------------------------------------------------


def _apply(spec: FunctionSpec, inputs: list[Linear], args: list[tuple[str, ArgValue]]) -> Linear:
    """The typed value of a call, simplified where a zero argument decides it."""
    if spec.kind == "lerp":
        values = dict(args)
        a, b, t = values["a"], values["b"], values["t"]
        assert isinstance(a, Linear) and isinstance(b, Linear) and isinstance(t, float | int)
        return linear_sum([(1.0 - t, a), (float(t), b)])
    if spec.variadic is not None:
        inputs = [value for value in inputs if not value.is_zero]
        if not inputs:
            return Linear()
        if spec.commutative:
            inputs.sort(key=_identity)
    simplified: list[tuple[str, ArgValue]] = []
    for name, value in args:
        param = spec.param(name)
        assert param is not None
        if isinstance(value, Linear) and value.is_zero and param.zero_absorbs:
            return Linear()
        if isinstance(value, tuple):
            kept = sorted((v for v in value if not v.is_zero), key=_identity)
            if not kept and param.empty_is_identity:
                first = next(v for _n, v in args if isinstance(v, Linear))
                return first
            value = tuple(kept)
        simplified.append((name, value))
    return Linear.of(Apply(spec, tuple(inputs), tuple(simplified)))


def _identity(value: Linear) -> tuple[tuple[str, ...], str]:
    """Sort key for commutative inputs: what they are made of first, then their coefficients."""
    return tuple(atom.text for _c, atom in value.terms), value.text


# -- scalar arithmetic -----------------------------------------------------------------------------------------


def _arith(op: str, left: Scalar, right: Scalar, span: Span) -> Scalar:
    """``left op right`` on numbers; ints stay exact while small, overflow is a clear error."""
    try:
        if op == "+":
            result: Scalar = left + right
        elif op == "-":
            result = left - right
        elif op == "*":
            result = left * right
        else:
            if right == 0:
                raise CompileError("division_by_zero", "division by zero", span)
            result = left / right
        if isinstance(result, int) and abs(result) > _MAX_INT:
            result = float(result)
    except OverflowError:
        result = math.inf
    if isinstance(result, float) and not math.isfinite(result):
        raise CompileError("bad_number", "this arithmetic overflows; use smaller numbers", span)
    return result


def _scaled(value: Linear, factor: float, span: Span) -> Linear:
    if not math.isfinite(factor):
        raise CompileError("bad_number", "this factor overflows; use smaller numbers", span)
    scaled = value.scaled(factor)
    if not all_finite(scaled):
        raise CompileError("bad_number", "this product overflows; use smaller numbers", span)
    if any(c == 0.0 for c in scaled.coefficients()):  # underflow
        return Linear(tuple((c, a) for c, a in scaled.terms if c != 0.0))
    return scaled
