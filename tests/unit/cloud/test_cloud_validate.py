"""Validation of triggers files: precise errors, and expressions that cannot do harm."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import jsonschema
import pytest
import yaml

from reflexarc.cloud.expr import CelError, compile_expr, macro_depth
from reflexarc.cloud.schema import triggers_schema
from reflexarc.cloud.validate import WHEN_VARS, compile_text, load_triggers
from reflexarc.config import ConfigError

EXAMPLES = Path(__file__).resolve().parents[3] / "cloud" / "examples"
SITE = "site: alcf\napps:\n  peak-fit: {function: 'a.b:c'}\n  tomo: {argv: [tomo]}\n"


def problems(tmp_path: Path, text: str) -> list[str]:
    """The problems of a triggers file, as printed (one string each)."""
    (tmp_path / "site.yaml").write_text(SITE)
    path = tmp_path / "triggers.yaml"
    path.write_text(textwrap.dedent(text))
    with pytest.raises(ConfigError) as info:
        load_triggers(path)
    return [str(p) for p in info.value.problems]


GOOD = """\
sites: [site.yaml]
triggers:
  - name: hi
    on: bl1/+/counts
    when: event.data.value > 400
    then:
      - task: {app: peak-fit}
"""


def test_example_file_is_valid() -> None:
    cfg = load_triggers(EXAMPLES / "triggers.yaml")
    assert {t.name for t in cfg.triggers} >= {"bright-spot", "beam-drop", "hot-detector", "every-100th-frame"}


def test_unknown_app_names_file_line_trigger_field_and_known_apps(tmp_path: Path) -> None:
    (p,) = problems(tmp_path, GOOD.replace("app: peak-fit", "app: peak-fitt"))
    assert p.startswith(f"{tmp_path / 'triggers.yaml'}:7:")
    assert "trigger 'hi' then[0].task.app" in p
    assert "unknown app 'peak-fitt'" in p and "peak-fit, tomo" in p


def test_bad_cel_gives_the_position_of_the_error(tmp_path: Path) -> None:
    (p,) = problems(tmp_path, GOOD.replace("event.data.value > 400", "event.data.value >> 400"))
    # The value starts at column 11; the parser stops at the second '>' (column 19 of it).
    assert "trigger 'hi' when" in p and "invalid CEL" in p
    line, col = p.split(":")[1:3]
    assert (int(line), int(col)) == (5, 11 + 18)
    assert "column 19 of the expression" in p


def test_unknown_stream_when_streams_are_listed(tmp_path: Path) -> None:
    (p,) = problems(tmp_path, "streams: [bl1/det1/counts, bl1/+/temp]\n" + GOOD.replace("bl1/+/counts", "bl1/+/countz"))
    assert "trigger 'hi' on[0]" in p and "unknown stream 'bl1/+/countz'" in p and "bl1/det1/counts" in p


def test_invalid_selector(tmp_path: Path) -> None:
    (p,) = problems(tmp_path, GOOD.replace("bl1/+/counts", "bl1/det1"))
    assert "invalid stream selector" in p


def test_window_too_large(tmp_path: Path) -> None:
    text = GOOD.replace("    when:", "    window: {type: sliding, size: 2d}\n    when:")
    (p,) = problems(tmp_path, text)
    assert ":5:" in p and "trigger 'hi' window" in p and "window too large" in p
    (p,) = problems(tmp_path, GOOD.replace("    when:", "    window: {type: tumbling, events: 100001}\n    when:"))
    assert "window too large" in p


@pytest.mark.parametrize(
    ("window", "message"),
    [
        ("{type: hopping, size: 10s}", "needs 'size' and 'hop'"),
        ("{type: tumbling, size: 10s, events: 3}", "exactly one of 'size'"),
        ("{type: sliding, size: 5s, emit: close}", "use emit: update"),
        ("{type: tumbling, size: 10x}", "invalid duration '10x'"),
        ("{type: tumbling, size: 1s, aggregates: {m: {op: mean}}}", "needs 'of'"),
        ("{type: tumbling, size: 1s, aggregates: {m: {op: median, of: event.data.v}}}", "Input should be"),
    ],
)
def test_window_shape_errors(tmp_path: Path, window: str, message: str) -> None:
    found = problems(tmp_path, GOOD.replace("    when:", f"    window: {window}\n    when:"))
    assert any(message in p and "trigger 'hi'" in p for p in found), found


def test_every_error_is_listed_at_once(tmp_path: Path) -> None:
    text = GOOD + (
        "  - name: second\n"
        "    on: bl1/+/counts\n"
        "    when: agg.x > 1\n"
        "    whenn: 3\n"
        "    then: [{task: {app: tomo}}]\n"
        "  - name: third\n"
        "    on: bl1/+/counts\n"
        "    when: agg.x > 1\n"
        "    then: [{task: {app: nope}}]\n"
        "  - name: hi\n"
        "    on: bl1/+/counts\n"
        "    when: 'true'\n"
        "    then: [{task: {app: tomo, site: nersc}}]\n"
    )
    found = problems(tmp_path, text)
    joined = "\n".join(found)
    assert "trigger 'second' whenn: unknown field" in joined
    assert "trigger 'third' then[0].task.app: unknown app 'nope'" in joined
    assert "trigger 'hi' name: duplicate trigger name (also triggers[0])" in joined
    assert "trigger 'hi' then[0].task.site: unknown site(s) nersc" in joined
    lines = [int(p.split(":")[1]) for p in found]
    assert lines == sorted(lines)


def test_unknown_field_and_unknown_site(tmp_path: Path) -> None:
    found = problems(tmp_path, GOOD.replace("task: {app: peak-fit}", "task: {app: peak-fit, site: nersc, cpu: 2}"))
    joined = "\n".join(found)
    assert "then[0].task.cpu: unknown field" in joined


def test_site_files_must_exist(tmp_path: Path) -> None:
    (p, *_) = problems(tmp_path, GOOD.replace("sites: [site.yaml]", "sites: [missing.yaml]"))
    assert "sites[0]" in p and "cannot read site file" in p


def test_tasks_need_sites(tmp_path: Path) -> None:
    (p,) = problems(tmp_path, GOOD.replace("sites: [site.yaml]\n", ""))
    assert "list the HPC site files" in p


def test_yaml_never_constructs_python_objects(tmp_path: Path) -> None:
    (p,) = problems(tmp_path, GOOD.replace("on: bl1/+/counts", "on: !!python/object/apply:os.system ['touch pwned']"))
    assert "invalid YAML" in p
    assert not (tmp_path / "pwned").exists()


# ---- safety of expressions ----------------------------------------------------------------
@pytest.mark.parametrize(
    ("expr", "message"),
    [
        ("__import__('os')", "not allowed"),
        ("import os", "invalid CEL"),
        ("open('/etc/passwd')", "not allowed"),
        ("os.system('rm -rf /')", "unknown variable"),
        ("event.data.read_file('/etc/passwd')", "not allowed"),
        ("exec('1')", "not allowed"),
        ("[1, 2].all(x, [3, 4].exists(y, y > x))", "nested"),
        ("event.data.xs.map(a, event.data.xs.map(b, a * b)).size() > 0", "nested"),
        ("x" + " || x" * 600, "limit is 2000"),
        ("globals", "unknown variable"),
    ],
)
def test_unsafe_expressions_are_rejected(expr: str, message: str) -> None:
    with pytest.raises(CelError) as info:
        compile_expr(expr, WHEN_VARS, "when")
    assert message in str(info.value)


def test_unsafe_expression_in_a_file_is_rejected_at_validation(tmp_path: Path) -> None:
    (p,) = problems(tmp_path, GOOD.replace("event.data.value > 400", "open('/etc/passwd') == ''"))
    assert "trigger 'hi' when" in p and "open" in p and "not allowed" in p


def test_safe_expressions_pass() -> None:
    for expr in [
        "has(event.data.v) && event.data.v > 1",
        "event.data.xs.exists(x, x > 3)",
        "event.stream.startsWith('co') && event.device.matches('^det[0-9]+$')",
        "event.time - window.start > duration('5s')",
        "'a(b' + \".map(x, y.map(z, 1))\" == ''",  # macro-like text inside strings is not code
    ]:
        compile_expr(expr, WHEN_VARS, "when")
    assert macro_depth("'[1].all(x, [2].all(y, true))'") == 0


# ---- JSON Schema -------------------------------------------------------------------------
def test_json_schema_accepts_the_example_and_rejects_typos() -> None:
    schema = triggers_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    data = yaml.safe_load((EXAMPLES / "triggers.yaml").read_text())
    for t in data["triggers"]:
        if True in t:  # YAML 1.1 reads `on:` as true; editors using YAML 1.2 do not
            t["on"] = t.pop(True)
    jsonschema.validate(data, schema)
    data["triggers"][0]["whenn"] = "x"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(data, schema)
    assert json.dumps(schema)


def test_compile_text_reads_duration_forms(tmp_path: Path) -> None:
    (tmp_path / "site.yaml").write_text(SITE)
    text = GOOD.replace("    when:", "    cooldown: 1500ms\n    window: {type: hopping, size: 1m, hop: 30}\n    when:")
    cfg = compile_text(text, str(tmp_path / "t.yaml"), tmp_path)
    spec = cfg.triggers[0].spec
    assert (spec.cooldown, spec.window.size, spec.window.hop) == (1.5, 60.0, 30.0)
