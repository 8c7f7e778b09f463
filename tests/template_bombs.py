"""The template bombs of tests/test_hostile_templates.py: (id, text body, variables, error).

Each error is the part of the message that names what was refused and the
limit's config key, with the default budget (1 s, 1,000,000 bytes).
"""

from __future__ import annotations

from typing import Any

__all__ = ["BOMBS", "RECURSION", "SLOW", "SLOW_BOMBS"]

SIZE = "(template_max_output_bytes is 1000000)"
LARGER = "larger than 1000000 characters (template_max_output_bytes)"
SLOW = "rendering took longer than"
DOUBLING = (
    "{% set ns = namespace(s='x', l=[1], n=3, a=[1], b=[1], t=(1,)) %}{% for i in range(64) %}"
)
END = "{% endfor %}"
TUPLES = DOUBLING + "{% set ns.t = (ns.t, ns.t) %}" + END
LISTS = DOUBLING + "{% set ns.a = [ns.a, ns.a] %}{% set ns.b = [ns.b, ns.b] %}" + END

BOMBS: list[tuple[str, str, dict[str, Any], str]] = [
    # (id, text body, variables, what the error must say)
    (
        "ljust",
        "{{ 'x'.ljust(800000000) }}",
        {},
        f"'ljust' would build a string of 800000000 characters {SIZE}",
    ),
    ("rjust", "{{ 'x'.rjust(800000000) }}", {}, "'rjust' would build a string of 800000000"),
    ("center", "{{ 'x'.center(800000000) }}", {}, "'center' would build a string of 800000000"),
    ("zfill", "{{ '1'.zfill(800000000) }}", {}, "'zfill' would build a string of 800000000"),
    ("expandtabs", "{{ t.expandtabs(800000000) }}", {"t": "\t"}, "'expandtabs' would build"),
    (
        "translate",
        "{{ t.translate({120: 'y' * 100000}) }}",
        {"t": "x" * 1000},
        "'translate' would build",
    ),
    ("str.replace", "{{ ('x' * 1000).replace('x', 'y' * 10000) }}", {}, "'replace' would build"),
    ("str.join", "{{ ('y' * 100000).join(['x'] * 100) }}", {}, "'join' would build"),
    ("format", "{{ '{:>800000000}'.format('x') }}", {}, "'format' would build a string of"),
    ("format nested width", "{{ '{:{w}}'.format('x', w=800000000) }}", {}, "'format' would build"),
    ("format precision", "{{ '{:.800000000f}'.format(1.5) }}", {}, "'format' would build"),
    ("format_map", "{{ '{x:>800000000}'.format_map({'x': 1}) }}", {}, "'format' would build"),
    ("percent", "{{ '%800000000s' % 'x' }}", {}, "'%' would build a string of"),
    ("percent star", "{{ '%*s' % (800000000, 'x') }}", {}, "'%' would build"),
    ("percent precision", "{{ '%.800000000f' % 1.5 }}", {}, "'%' would build"),
    ("percent mapping", "{{ '%(a)800000000s' % {'a': 1} }}", {}, "'%' would build"),
    ("str times", "{{ 'x' * 800000000 }}", {}, "'*' would build a string of 800000000"),
    ("times str", "{{ 800000000 * 'x' }}", {}, "'*' would build a string of 800000000"),
    ("list times", "{{ ['x'] * 800000000 }}", {}, "'*' would build a list of 800000000 items"),
    ("range list times", "{{ (range(100000)|list) * 100 }}", {}, "'*' would build a list of"),
    ("power", "{{ 9 ** 9999999 }}", {}, "'**' would build a number of about"),
    ("big product", "{{ (2 ** 60000) * (2 ** 60000) }}", {}, "'*' would build a number"),
    ("concat", "{{ 'x' ~ ('y' * 999999) ~ ('z' * 999999) }}", {}, "'~' would build a string of"),
    ("filter indent", "{{ 'x'|indent(800000000, true) }}", {}, "filter 'indent' would build"),
    ("filter indent lines", "{{ ('x\n' * 500000)|indent(4) }}", {}, "filter 'indent' would build"),
    ("filter center", "{{ 'x'|center(800000000) }}", {}, "filter 'center' would build"),
    (
        "filter wordwrap",
        "{{ ('a b ' * 1000)|wordwrap(1, wrapstring='x' * 1000) }}",
        {},
        "filter 'wordwrap' would",
    ),
    (
        "filter replace",
        "{{ ('x' * 1000)|replace('', 'y' * 10000) }}",
        {},
        "filter 'replace' would build",
    ),
    ("filter join", "{{ (['x'] * 100)|join('y' * 100000) }}", {}, "filter 'join' would build"),
    ("filter format", "{{ '%800000000s'|format('x') }}", {}, "filter 'format' would build"),
    (
        "filter batch",
        "{{ [1]|batch(800000000, 'x')|list }}",
        {},
        "filter 'batch' would build a list of",
    ),
    ("filter slice", "{{ [1]|slice(800000000)|list }}", {}, "filter 'slice' would build a list of"),
    (
        "filter sum",
        "{{ ([[1] * 1000] * 1000)|sum(start=[]) }}",
        {},
        "filter 'sum' would build a list of",
    ),
    ("filter tojson", "{{ [[[1]]]|tojson(indent=800000000) }}", {}, "filter 'tojson' would build"),
    (
        "filter urlize",
        "{{ ('http://a.example ' * 1000)|urlize(target='x' * 100000) }}",
        {},
        "filter 'urlize' would",
    ),
    ("map filter", "{{ ['x']|map('center', 800000000)|list }}", {}, "filter 'center' would build"),
    ("lipsum", "{{ lipsum(800000000) }}", {}, "'lipsum' would build"),
    ("attr format", "{{ ('{0:>800000000}'|attr('format'))('x') }}", {}, "'format' would build"),
    ("attr ljust", "{{ ('x'|attr('ljust'))(800000000) }}", {}, "'ljust' would build"),
    ("method kept in a variable", "{% set f = 'x'.zfill %}{{ f(800000000) }}", {}, "'zfill' would"),
    (
        "doubling ~",
        DOUBLING + "{% set ns.s = ns.s ~ ns.s %}" + END,
        {},
        "'~' would build a string of 1048576",
    ),
    (
        "doubling +",
        DOUBLING + "{% set ns.s = ns.s + ns.s %}" + END,
        {},
        "'+' would build a string of 1048576",
    ),
    (
        "doubling list +",
        DOUBLING + "{% set ns.l = ns.l + ns.l %}" + END,
        {},
        "'+' would build a list of 1048576",
    ),
    (
        "doubling int",
        DOUBLING + "{% set ns.n = ns.n * ns.n %}" + END,
        {},
        "'*' would build a number",
    ),
    (
        "doubling format",
        DOUBLING + "{% set ns.s = '{0}{0}'.format(ns.s) %}" + END,
        {},
        "'format' would build",
    ),
    (
        "doubling percent",
        DOUBLING + "{% set ns.s = '%s%s' % (ns.s, ns.s) %}" + END,
        {},
        "'%' would build",
    ),
    (
        "doubling join",
        DOUBLING + "{% set ns.s = [ns.s, ns.s]|join %}" + END,
        {},
        "filter 'join' on a value larger",
    ),
    (
        "doubling replace",
        DOUBLING + "{% set ns.s = ns.s.replace('x', 'xx') %}" + END,
        {},
        "'replace' would build",
    ),
    (
        "shared list printed",
        DOUBLING + "{% set ns.a = [ns.a, ns.a] %}" + END + "{{ ns.a }}",
        {},
        f"printing a value {LARGER}",
    ),
    (
        "shared list tojson",
        DOUBLING + "{% set ns.a = [ns.a, ns.a] %}" + END + "{{ ns.a|tojson }}",
        {},
        "filter 'tojson' on a value larger",
    ),
    (
        "shared list compared",
        DOUBLING
        + "{% set ns.a = [ns.a, ns.a] %}{% set ns.b = [ns.b, ns.b] %}"
        + END
        + "{{ ns.a == ns.b }}",
        {},
        "comparing or hashing a value larger",
    ),
    (
        "shared tuple hashed",
        DOUBLING + "{% set ns.t = (ns.t, ns.t) %}" + END + "{{ {ns.t: 1} }}",
        {},
        "comparing or hashing a value larger",
    ),
    (
        "shared list sorted",
        DOUBLING + "{% set ns.a = [ns.a, ns.a] %}" + END + "{{ ns.a|sort }}",
        {},
        "filter 'sort' on a value larger",
    ),
    (
        "shared list tested",
        DOUBLING + "{% set ns.a = [ns.a, ns.a] %}" + END + "{{ ns.a is in [ns.a] }}",
        {},
        "testing a value larger",
    ),
    (
        "shared list concat",
        DOUBLING + "{% set ns.a = [ns.a, ns.a] %}" + END + "{{ ns.a ~ '' }}",
        {},
        "'~' would build",
    ),
    (
        "shared tuple dict.get",
        TUPLES + "{% set d = {} %}{{ d.get(ns.t) }}",
        {},
        "calling 'get' with",
    ),
    (
        "shared tuple set minus",
        TUPLES + "{{ {}.keys() - [ns.t] }}",
        {},
        "subtracting a value larger",
    ),
    ("shared list index", LISTS + "{{ [ns.a].index(ns.b) }}", {}, "calling 'index' with a value"),
    (
        "shared list loop.changed",
        LISTS + "{% for i in [ns.a, ns.b] %}{{ loop.changed(i) }}{% endfor %}",
        {},
        "calling 'changed' with a value larger",
    ),
    ("shared tuple dict()", TUPLES + "{{ dict([(ns.t, 1)]) }}", {}, "calling 'dict' with a value"),
    ("shared tuple unique", TUPLES + "{{ [ns.t, ns.t]|unique|list }}", {}, "filter 'unique' on a"),
    (
        "macro buffer",
        "{% macro m() %}{% for i in range(20000) %}{{ 'x' *"
        " 100 }}{% endfor %}{% endmacro %}{{ m()|length }}",
        {},
        "the template's text would build",
    ),
    (
        "set block",
        "{% set b %}{% for i in range(100000) %}xxxxxxxxxxxxxxxxxxxx"
        "{% endfor %}{% endset %}{{ b|length }}",
        {},
        "the template's text would build",
    ),
    (
        "filter block",
        "{% filter upper %}{% for i in range(100000) %}xxxxxxxxxxxxxxxxxxxx"
        "{% endfor %}{% endfilter %}",
        {},
        "the template's text would build",
    ),
    (
        "output",
        "{% for i in range(100000) %}{{ 'x' * 100 }}{% endfor %}",
        {},
        "output larger than 1000000 bytes (template_max_output_bytes)",
    ),
    (
        "many large values",
        "{% set ns = namespace(l=[]) %}{% for i in range(100) %}"
        "{% set ns.l = ns.l + [('x' * 999990) ~ i] %}{% endfor %}",
        {},
        "the template built more than 32000000 bytes in all (32 times template_max_output_bytes)",
    ),
    (
        "many large wide values",
        "{% set ns = namespace(l=[]) %}{% for i in range(100) %}"
        "{% set ns.l = ns.l + [('\U0001d54f' * 999990) ~ i] %}{% endfor %}",
        {},
        "the template built more than 32000000 bytes",
    ),
    (
        "many format fields",
        "{{ '" + "{0:>999999}" * 40 + "'.format('x') }}",
        {},
        "the template built more than 32000000",
    ),
]

SLOW_BOMBS: list[tuple[str, str, dict[str, Any], str]] = [
    (
        "nested range",
        "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
        {},
        SLOW,
    ),
    (
        "nested variable loops",
        "{% for a in n %}{% for b in n %}{% for c in n %}{% endfor %}{% endfor %}{% endfor %}",
        {"n": list(range(1000))},
        SLOW,
    ),
    (
        "exponential macro",
        "{% macro m(n) %}{% if n %}{{ m(n - 1) }}{{ m(n"
        " - 1) }}{% endif %}{% endmacro %}{{ m(60) }}",
        {},
        SLOW,
    ),
    (
        "loop with attribute access",
        "{% for i in range(100000) %}{% for j in range(100000)"
        " %}{{ i.real }}{% endfor %}{% endfor %}",
        {},
        SLOW,
    ),
]

RECURSION = [
    ("endless macro", "{% macro m() %}{{ m() }}{% endmacro %}{{ m() }}"),
    ("endless recursive loop", "{% for x in [1, 1] recursive %}{{ loop([1, 1]) }}{% endfor %}"),
]
