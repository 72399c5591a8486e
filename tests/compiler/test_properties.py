"""Properties, with Hypothesis, against the real registry.

- Random expression trees pretty-print (``unparse``) to text that parses back to the same text, and that
  text, its normalised form, and a re-spelling (sums reordered, factors swapped, parentheses and spaces
  added) all compile to the same plan hash — or to the same error code.
- Random text of any kind only ever gives a plan or a ``CompileError``.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from workers.compiler import CompileError, MergePlan
from workers.compiler import ast as A
from workers.compiler.errors import Span
from workers.compiler.parser import parse

pytestmark = pytest.mark.filterwarnings("ignore:Generating overly large repr")
Compile = Callable[..., MergePlan]
NO_SPAN = Span(0, 0)
REFS = [
    ("code", None),
    ("code", "1"),
    ("code", "v2"),
    ("code", "latest"),
    ("math", None),
    ("toxic", None),
    ("acme/code-lora", None),
    ("attn", None),
    ("half", None),
    ("code_copy", None),
]
NUMBERS = [0.5, 2, 0.25, 3, 1.5, 0.1, 10, 0.001, 0.7, 0.3, 1, 4]
SETTINGS = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

# -- random trees -----------------------------------------------------------------------------------------------


def ref(item: tuple[str, str | None]) -> A.Node:
    name, version = item
    return A.Ref(name, version, quoted=not A.BARE_NAME.match(name), span=NO_SPAN)


def num(value: float) -> A.Number:
    return A.Number(value, NO_SPAN)


def text(value: str) -> A.Ref:
    return A.Ref(value, None, quoted=True, span=NO_SPAN)


def call(name: str, *args: A.Node, **kwargs: A.Node) -> A.Call:
    keywords = tuple(A.Keyword(k, v, NO_SPAN) for k, v in kwargs.items())
    return A.Call(name, args, keywords, NO_SPAN, NO_SPAN)


leaves = st.sampled_from(REFS).map(ref) | st.just(A.BaseModelRef(None, NO_SPAN))
numbers = st.sampled_from(NUMBERS).map(num)
densities = st.sampled_from([0.1, 0.3, 0.5, 1]).map(num)


def extend(children: st.SearchStrategy[A.Node]) -> st.SearchStrategy[A.Node]:
    signs = st.sampled_from(["+", "-"])
    pairs = st.lists(st.tuples(signs, children), min_size=1, max_size=4)
    return st.one_of(
        st.builds(lambda first, rest: A.Sum((("+", first), *rest), NO_SPAN), children, pairs),
        st.builds(lambda n, c: A.Product((("*", n), ("*", c)), NO_SPAN), numbers, children),
        st.builds(lambda c, n: A.Product((("*", c), ("/", n)), NO_SPAN), children, numbers),
        st.builds(lambda c: A.Neg(c, NO_SPAN), children),
        st.builds(lambda xs, d: call("ties", *xs, density=d), st.lists(children, min_size=1, max_size=3), densities),
        st.builds(
            lambda xs, d, s: call("dare", *xs, density=d, seed=num(s)),
            st.lists(children, min_size=1, max_size=3),
            densities,
            st.integers(0, 3),
        ),
        st.builds(lambda x, d: call("magnitude_prune", x, density=d), children, densities),
        st.builds(lambda x, r: call("svd", x, rank=num(r)), children, st.integers(1, 6)),
        st.builds(lambda a, b, t: call("lerp", a, b, num(t)), children, children, st.sampled_from([0, 0.25, 0.5, 1])),
        st.builds(
            lambda x, layers: call("select", x, layers=text(layers)), children, st.sampled_from(["0", "1", "0-1"])
        ),
        st.builds(lambda x, m: call("select", x, modules=text(m)), children, st.sampled_from(["q_proj", "mlp.*"])),
        st.builds(
            lambda x, others: call("orth", x, against=A.Tuple(tuple(others), NO_SPAN)),
            children,
            st.lists(children, min_size=1, max_size=2),
        ),
    )


trees = st.recursive(leaves, extend, max_leaves=8)


def respell(node: A.Node, rng: st.DataObject) -> A.Node:
    """The same expression written differently: sums reordered, factors swapped, parentheses added."""
    if isinstance(node, A.Sum):
        items = [(op, respell(item, rng)) for op, item in node.items]
        order = rng.draw(st.permutations(range(len(items))))
        shuffled = [items[i] for i in order]
        first_op, first = shuffled[0]
        head = first if first_op == "+" else A.Neg(first, NO_SPAN)
        return A.Sum((("+", head), *shuffled[1:]), NO_SPAN)
    if isinstance(node, A.Product):
        items = [(op, respell(item, rng)) for op, item in node.items]
        if len(items) == 2 and items[1][0] == "*" and rng.draw(st.booleans()):
            items = [("*", items[1][1]), ("*", items[0][1])]
        return A.Product(tuple(items), NO_SPAN)
    if isinstance(node, A.Neg):
        return A.Neg(respell(node.operand, rng), NO_SPAN)
    if isinstance(node, A.Call):
        args = tuple(respell(a, rng) for a in node.args)
        kwargs = tuple(A.Keyword(k.name, respell(k.value, rng), NO_SPAN) for k in node.kwargs)
        if node.name in ("ties", "dare"):
            args = tuple(args[i] for i in rng.draw(st.permutations(range(len(args)))))
        return A.Call(node.name, args, kwargs, NO_SPAN, NO_SPAN)
    if isinstance(node, A.Tuple):
        return A.Tuple(tuple(respell(i, rng) for i in node.items), NO_SPAN)
    return node


def outcome(compile_: Compile, source: str) -> str:
    """The plan hash, or ``error:<code>``."""
    try:
        return compile_(source).hash()
    except CompileError as error:
        return f"error:{error.code}"


@SETTINGS
@given(tree=trees, rng=st.data())
def test_pretty_print_parse_and_respelling_keep_the_hash(compile_: Compile, tree: A.Node, rng: st.DataObject) -> None:
    source = A.unparse(tree)
    assert A.unparse(parse(source)) == source
    first = outcome(compile_, source)
    assert outcome(compile_, f" ( {source} ) ") == first
    respelled = A.unparse(respell(tree, rng))
    second = outcome(compile_, respelled)
    if first.startswith("error:") or second.startswith("error:"):
        # The same mistakes are found, though a reordered expression may meet another one first.
        assert first.startswith("error:") and second.startswith("error:"), (source, respelled, first, second)
        return
    assert second == first, (source, respelled)
    plan = compile_(source)
    assert compile_(plan.normalized).hash() == first, (source, plan.normalized)


@SETTINGS
@given(tree=trees)
def test_normalized_is_a_fixed_point(compile_: Compile, tree: A.Node) -> None:
    try:
        plan = compile_(A.unparse(tree))
    except CompileError:
        assume(False)
        return
    again = compile_(plan.normalized)
    assert again.normalized == plan.normalized
    assert again.hash() == plan.hash()


# -- fuzzing ------------------------------------------------------------------------------------------------------

TOKENS = [
    "code", "math", "toxic", '"acme/code-lora"', "'x y'", "base", "ties", "dare", "dare_ties", "svd", "lerp",
    "select", "orth", "magnitude_prune", "density", "rank", "energy", "seed", "layers", "modules", "against",
    "majority", "true", "0", "1", "0.5", "1e3", ".5", "0x1F", "50%", "1e999", "99999999999999999999999",
    "+", "-", "*", "/", "(", ")", ",", "=", "@", "@2", "@latest", "@v1", '"0-1"', '"q_proj"', " ", "\n", "[", "%",
]  # fmt: skip


def check_only_plan_or_compile_error(compile_: Compile, source: str) -> None:
    try:
        plan = compile_(source)
    except CompileError as error:
        assert error.code and error.message
        assert 0 <= error.span.start <= max(len(source), error.span.start)
        assert error.render().startswith(f"error[{error.code}]")
    else:
        assert isinstance(plan, MergePlan)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(source=st.text(max_size=80))
def test_random_text_gives_a_plan_or_a_compile_error(compile_: Compile, source: str) -> None:
    check_only_plan_or_compile_error(compile_, source)


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(parts=st.lists(st.sampled_from(TOKENS), max_size=30))
def test_random_token_soup_gives_a_plan_or_a_compile_error(compile_: Compile, parts: list[str]) -> None:
    check_only_plan_or_compile_error(compile_, "".join(parts))
