"""Load a triggers file into checked, compiled triggers; or say precisely what is wrong.

Every problem names the file, the line and column, the trigger and the field,
and what would be valid::

    triggers.yaml:14:14: trigger 'high-counts' then[0].task.app: unknown app 'fitt' on site 'alcf'; known apps: peak-fit, tomo
    triggers.yaml:9:21: trigger 'high-counts' when: invalid CEL: Syntax error: mismatched input '<EOF>' ... (column 19 of the expression)

All checks run on every trigger, so one run lists every error in the file.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from reflexarc.cloud.expr import ArgTemplate, CelError, Expr, compile_expr
from reflexarc.cloud.model import CommandAction, TaskAction, Trigger, TriggersFile
from reflexarc.config import ConfigError, Problem, did_you_mean, parse_yaml_text, plain_message
from reflexarc.events import Resources
from reflexarc.topics import TopicError, check_name, mqtt_match

# Layout of trigger state (2: sliding windows by columns, remembered event ids).
STATE_VERSION = 2
# The variables each kind of expression may read (see docs/triggers.md).
EVENT_VARS = frozenset({"event", "trigger"})
WHEN_VARS = frozenset({"event", "agg", "window", "key", "trigger"})
RESULT_VARS = frozenset({"result", "cause", "trigger"})


@dataclass
class SiteInfo:
    """What the triggers file may know of an HPC site: its name and its apps."""

    name: str
    apps: list[str]
    file: str


@dataclass
class CompiledAction:
    """A ``then`` entry with its expressions compiled and its site resolved."""

    index: int
    task: TaskAction | None = None
    command: CommandAction | None = None
    site: str | None = None
    resources: Resources | None = None
    args: ArgTemplate = field(default_factory=lambda: ArgTemplate({}, {}))


@dataclass
class CompiledOnResult:
    """``on_result`` with compiled expressions."""

    statuses: frozenset[str]
    when: Expr | None
    commands: list[CompiledAction]


@dataclass
class CompiledTrigger:
    """One trigger ready to evaluate."""

    spec: Trigger
    filter: Expr | None
    when: Expr
    aggregates: dict[str, Expr | None]
    actions: list[CompiledAction]
    on_result: CompiledOnResult | None
    fingerprint: str

    @property
    def name(self) -> str:
        """The trigger's name."""
        return self.spec.name

    @property
    def stateful(self) -> bool:
        """Whether it keeps state per key (a window or a cooldown)."""
        return self.spec.window is not None or self.spec.cooldown is not None

    def selects(self, site: str, device: str, stream: str) -> bool:
        """Whether an event of this stream is one the trigger listens to."""
        path = f"{site}/{device}/{stream}"
        return any(mqtt_match(sel, path) for sel in self.spec.on)


@dataclass
class CompiledConfig:
    """A whole triggers file, checked and compiled."""

    path: Path
    file: TriggersFile
    triggers: list[CompiledTrigger]
    sites: dict[str, SiteInfo]
    text_hash: str

    def by_name(self) -> dict[str, CompiledTrigger]:
        """Triggers by name."""
        return {t.name: t for t in self.triggers}

    def task_sites(self) -> list[str]:
        """HPC sites some trigger may send tasks to (their task topics must exist)."""
        return sorted({a.site for t in self.triggers for a in t.actions if a.site})


# ---- YAML positions of values ------------------------------------------------------
def _value_nodes(node: yaml.Node, path: tuple[Any, ...], out: dict[tuple[Any, ...], yaml.Node]) -> None:
    out[path] = node
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            _value_nodes(v, (*path, k.value), out)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _value_nodes(item, (*path, i), out)


class _Places:
    """Finds the line/column of a field, or of a position inside a CEL string."""

    def __init__(self, text: str, marks: dict[tuple[Any, ...], yaml.Mark]) -> None:
        self.marks = marks
        self.nodes: dict[tuple[Any, ...], yaml.Node] = {}
        try:
            root = yaml.compose(text, Loader=yaml.SafeLoader)
        except yaml.YAMLError:
            root = None
        if root is not None:
            _value_nodes(root, (), self.nodes)

    def key(self, path: tuple[Any, ...]) -> tuple[int | None, int | None]:
        for n in range(len(path), -1, -1):
            m = self.marks.get(tuple(path[:n]))
            if m is not None:
                return m.line + 1, m.column + 1
        return None, None

    def inside(self, path: tuple[Any, ...], line: int | None, col: int | None) -> tuple[int | None, int | None]:
        node = self.nodes.get(path)
        if node is None or col is None:
            return self.key(path)
        m = node.start_mark
        style = getattr(node, "style", None)
        if style in ("|", ">"):
            # Block scalar: the text starts on the next line, indented.
            indent = m.column + 2
            return m.line + 1 + (line or 1), indent + col
        quote = 1 if style in ("'", '"') else 0
        if (line or 1) == 1:
            return m.line + 1, m.column + 1 + quote + col - 1
        return m.line + (line or 1), col


def _site_info(base: Path, rel: str) -> SiteInfo:
    path = (base / rel).resolve()
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ValueError(f"cannot read site file {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ValueError(f"site file {path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("site"), str):
        raise ValueError(f"site file {path} has no top-level 'site: <name>'")
    apps = data.get("apps") or {}
    if not isinstance(apps, dict):
        raise ValueError(f"site file {path}: 'apps' must be a mapping of app name -> definition")
    return SiteInfo(data["site"], sorted(str(a) for a in apps), str(path))


def fingerprint(trig: Trigger) -> str:
    """Identity of a trigger's *state*: window, key and cooldown (not its condition or actions).

    State is kept across a reload when this is unchanged. ``state`` is the
    version of the state's layout: a worker of another version starts such
    triggers afresh rather than misreading their state.
    """
    parts = {
        "state": STATE_VERSION,
        "on": trig.on,
        "filter": trig.filter,
        "window": trig.window.model_dump(mode="json") if trig.window else None,
        "cooldown": trig.cooldown,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


class _Checker:
    def __init__(self, source: str, base: Path, text: str, marks: dict[tuple[Any, ...], yaml.Mark]) -> None:
        self.source = source
        self.base = base
        self.places = _Places(text, marks)
        self.problems: list[Problem] = []

    def add(
        self,
        path: tuple[Any, ...],
        message: str,
        trigger: str | None = None,
        line: int | None = None,
        col: int | None = None,
    ) -> None:
        if line is None:
            line, col = self.places.key(path)
        self.problems.append(Problem(self.source, line, col, _describe(path, trigger), message))

    def pydantic(
        self, exc: ValidationError, prefix: tuple[Any, ...], model: type[BaseModel], trigger: str | None = None
    ) -> None:
        for err in exc.errors():
            own = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-")))
            msg = plain_message(err, model, own)
            if msg.startswith("unknown field (check"):
                msg = "unknown field (check the spelling; docs/triggers.md lists the valid fields)"
            self.add((*prefix, *own), msg, trigger)

    def expr(self, path: tuple[Any, ...], src: str, variables: frozenset[str], trigger: str, what: str) -> Expr | None:
        try:
            return compile_expr(src, variables, what)
        except CelError as exc:
            line, col = self.places.inside(path, exc.line, exc.column)
            msg = exc.message
            if exc.column is not None:
                msg += f" (column {exc.column} of the expression)"
            self.add(path, msg, trigger, line, col)
            return None


def _describe(path: tuple[Any, ...], trigger: str | None) -> str:
    rest = path
    prefix = ""
    if len(path) >= 2 and path[0] == "triggers" and isinstance(path[1], int):
        prefix = f"trigger '{trigger}' " if trigger else f"triggers[{path[1]}] "
        rest = path[2:]
    out = ""
    for part in rest:
        out += f"[{part}]" if isinstance(part, int) else ("." if out else "") + str(part)
    return (prefix + out).strip()


def compile_text(text: str, source: str, base: Path | None = None) -> CompiledConfig:
    """Check and compile triggers YAML text; :class:`ConfigError` lists every problem."""
    base = base if base is not None else Path(source).parent
    data, marks = parse_yaml_text(text, source)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError([Problem(source, 1, 1, "", "the file must be a YAML mapping (key: value)")])
    ck = _Checker(source, base, text, marks)
    raw_triggers = data.get("triggers")
    top = {k: v for k, v in data.items() if k != "triggers"}
    try:
        tf = TriggersFile.model_validate(top)
    except ValidationError as exc:
        ck.pydantic(exc, (), TriggersFile)
        # Keep checking the triggers against whatever of the top level is usable.
        raw_sites = top.get("sites")
        raw_streams = top.get("streams")
        tf = TriggersFile.model_construct(
            sites=[x for x in raw_sites if isinstance(x, str)] if isinstance(raw_sites, list) else [],
            streams=[x for x in raw_streams if isinstance(x, str)] if isinstance(raw_streams, list) else None,
        )
    specs: list[tuple[int, Trigger]] = []
    if raw_triggers is not None and not isinstance(raw_triggers, list):
        ck.add(("triggers",), "'triggers' must be a list of triggers (- name: ...)")
    names: list[tuple[int, str]] = []
    broken: list[tuple[int, dict[str, Any], str | None]] = []
    for i, raw in enumerate(raw_triggers or []):
        name = raw.get("name") if isinstance(raw, dict) and isinstance(raw.get("name"), str) else None
        if name is not None:
            names.append((i, name))
        try:
            specs.append((i, Trigger.model_validate(raw)))
        except ValidationError as exc:
            ck.pydantic(exc, ("triggers", i), Trigger, name)
            if isinstance(raw, dict):
                broken.append((i, raw, name))
    seen: dict[str, int] = {}
    for i, n in names:
        if n in seen:
            ck.add(
                ("triggers", i, "name"), f"duplicate trigger name (also triggers[{seen[n]}]); names must be unique", n
            )
        seen.setdefault(n, i)
    tf.triggers = [t for _, t in specs]

    sites: dict[str, SiteInfo] = {}
    for i, rel in enumerate(tf.sites):
        try:
            info = _site_info(base, rel)
        except ValueError as exc:
            ck.add(("sites", i), f"{exc}; list site files relative to {source}")
            continue
        sites[info.name] = info
    try:
        check_name(tf.pipeline.namespace, "namespace")
    except TopicError as exc:
        ck.add(("pipeline", "namespace"), str(exc))

    compiled: list[CompiledTrigger] = []
    for ti, trig in specs:
        ct = _compile_trigger(ck, ti, trig, tf, sites)
        if ct is not None:
            compiled.append(ct)
    for ti, raw, name in broken:
        _check_broken_trigger(ck, ti, raw, tf, name)
    if ck.problems:
        raise ConfigError(sorted(ck.problems, key=lambda p: (p.line or 0, p.column or 0)))
    digest = hashlib.sha256(text.encode()).hexdigest()
    return CompiledConfig(Path(source), tf, compiled, sites, digest)


def _compile_trigger(
    ck: _Checker, ti: int, trig: Trigger, tf: TriggersFile, sites: dict[str, SiteInfo]
) -> CompiledTrigger | None:
    name = trig.name
    p: tuple[Any, ...] = ("triggers", ti)
    before = len(ck.problems)
    _check_selectors(ck, p, trig.on, tf, name)
    flt = ck.expr((*p, "filter"), trig.filter, EVENT_VARS, name, "filter") if trig.filter else None
    when = ck.expr((*p, "when"), trig.when, WHEN_VARS, name, "when")
    _check_agg_names(ck, (*p, "when"), trig.when, set(trig.window.aggregates) if trig.window else None, name)
    aggs: dict[str, Expr | None] = {}
    if trig.window is not None:
        for an, agg in trig.window.aggregates.items():
            aggs[an] = (
                ck.expr((*p, "window", "aggregates", an, "of"), agg.of, EVENT_VARS, name, f"aggregate {an}")
                if agg.of
                else None
            )
    actions: list[CompiledAction] = []
    for ai, action in enumerate(trig.then):
        ap = (*p, "then", ai)
        if action.task is not None:
            actions.append(_compile_task(ck, (*ap, "task"), ai, action.task, sites, name))
        elif action.command is not None:
            actions.append(_compile_command(ck, (*ap, "command"), ai, action.command, WHEN_VARS, name))
    on_result = None
    if trig.on_result is not None:
        op = (*p, "on_result")
        if not any(a.task for a in trig.then):
            ck.add(op, "on_result needs a task action in 'then' (results come from tasks)", name)
        rw = (
            ck.expr((*op, "when"), trig.on_result.when, RESULT_VARS, name, "on_result.when")
            if trig.on_result.when
            else None
        )
        cmds = [
            _compile_command(ck, (*op, "commands", ci), ci, c, RESULT_VARS, name)
            for ci, c in enumerate(trig.on_result.commands)
        ]
        on_result = CompiledOnResult(frozenset(trig.on_result.status), rw, cmds)
    if len(ck.problems) > before or when is None:
        return None
    return CompiledTrigger(trig, flt, when, aggs, actions, on_result, fingerprint(trig))


def _check_selectors(
    ck: _Checker, p: tuple[Any, ...], selectors: list[str], tf: TriggersFile, name: str | None
) -> None:
    for si, sel in enumerate(selectors):
        if not isinstance(sel, str):
            continue  # the schema check has said so
        levels = sel.split("/")
        bad = len(levels) != 3 and not (len(levels) <= 3 and levels[-1] == "#")
        if not bad:
            for lv in levels:
                if lv in ("+", "#"):
                    continue
                try:
                    check_name(lv, "level")
                except TopicError:
                    bad = True
        if bad:
            ck.add(
                (*p, "on", si),
                f"invalid stream selector {sel!r}: write site/device/stream, "
                "each a name or '+', or end with '#' (e.g. bl1/+/counts, bl1/#)",
                name,
            )
        elif tf.streams is not None and not any(
            mqtt_match(sel, known) or mqtt_match(known, sel) for known in tf.streams
        ):
            ck.add(
                (*p, "on", si),
                f"unknown stream {sel!r}: it matches none of the streams "
                f"listed under 'streams' ({', '.join(tf.streams)})",
                name,
            )


# agg.NAME or agg["NAME"] in a condition; a name no aggregate defines would fail at every evaluation.
_AGG_REF = re.compile(r"""\bagg\s*(?:\.\s*([A-Za-z_]\w*)|\[\s*["']([^"']+)["']\s*\])""")


def _check_agg_names(
    ck: _Checker, path: tuple[Any, ...], src: str, defined: set[str] | None, trigger: str | None
) -> None:
    for m in _AGG_REF.finditer(src):
        used = m.group(1) or m.group(2)
        if defined is not None and used in defined:
            continue
        before = src[: m.start()]
        line, col = ck.places.inside(path, before.count("\n") + 1, m.start() - (before.rfind("\n") + 1) + 1)
        if defined is None:
            msg = f"agg.{used}: the trigger has no window, so it has no aggregates (add window.aggregates.{used})"
        elif not defined:
            msg = f"unknown aggregate agg.{used}: the window defines none (add window.aggregates.{used})"
        else:
            msg = (
                f"unknown aggregate agg.{used}{did_you_mean(used, defined)}; "
                f"the window defines: {', '.join(sorted(defined))}"
            )
        ck.add(path, msg, trigger, line, col)


def _check_broken_trigger(ck: _Checker, ti: int, raw: dict[Any, Any], tf: TriggersFile, name: str | None) -> None:
    """What can still be checked of a trigger that failed its schema check: selectors and expressions."""
    p: tuple[Any, ...] = ("triggers", ti)
    on = raw.get("on", raw.get(True))  # YAML 1.1 reads a bare `on` key as True
    if isinstance(on, str):
        on = [on]
    if isinstance(on, list):
        _check_selectors(ck, p, on, tf, name)
    label = name or f"triggers[{ti}]"
    if isinstance(raw.get("filter"), str):
        ck.expr((*p, "filter"), raw["filter"], EVENT_VARS, label, "filter")
    if isinstance(raw.get("when"), str):
        ck.expr((*p, "when"), raw["when"], WHEN_VARS, label, "when")
        window = raw.get("window")
        aggs = window.get("aggregates") if isinstance(window, dict) else None
        defined = set(aggs) if isinstance(aggs, dict) else (set() if isinstance(window, dict) else None)
        _check_agg_names(ck, (*p, "when"), raw["when"], defined, name)


def _args(
    ck: _Checker, path: tuple[Any, ...], args: dict[str, Any], variables: frozenset[str], trigger: str
) -> ArgTemplate:
    exprs: dict[str, Expr] = {}
    literals: dict[str, Any] = {}
    for k, v in args.items():
        if isinstance(v, str):
            e = ck.expr((*path, k), v, variables, trigger, f"argument {k}")
            if e is not None:
                exprs[k] = e
        else:
            literals[k] = v
    return ArgTemplate(exprs, literals)


def _compile_task(
    ck: _Checker, path: tuple[Any, ...], index: int, task: TaskAction, sites: dict[str, SiteInfo], trigger: str
) -> CompiledAction:
    args = _args(ck, (*path, "args"), task.args, WHEN_VARS, trigger)
    resources = None
    try:
        resources = Resources.model_validate(task.resources)
    except ValidationError as exc:
        err = exc.errors()[0]
        ck.add(
            (*path, "resources", *err["loc"]),
            f"{err['msg']} (valid: cpus, gpus, gpu_model, memory_gb, walltime_s)",
            trigger,
        )
    chosen: str | None = None
    if not sites:
        ck.add(
            (*path, "app"),
            f"app {task.app!r} cannot be checked: list the HPC site files under 'sites:' at the top of the file",
            trigger,
        )
    else:
        wanted = [task.site] if isinstance(task.site, str) else (task.site or list(sites))
        unknown = [s for s in wanted if s not in sites]
        if unknown:
            ck.add(
                (*path, "site"),
                f"unknown site(s) {', '.join(unknown)}; known sites: {', '.join(sorted(sites))}",
                trigger,
            )
        else:
            having = [s for s in wanted if task.app in sites[s].apps]
            if having:
                chosen = having[0]
            else:
                known = "; ".join(f"{s}: {', '.join(sites[s].apps) or '(none)'}" for s in wanted)
                ck.add(
                    (*path, "app"),
                    f"unknown app {task.app!r} on site(s) {', '.join(wanted)}; known apps - {known}",
                    trigger,
                )
    return CompiledAction(index, task=task, site=chosen, resources=resources, args=args)


def _compile_command(
    ck: _Checker, path: tuple[Any, ...], index: int, cmd: CommandAction, variables: frozenset[str], trigger: str
) -> CompiledAction:
    return CompiledAction(index, command=cmd, args=_args(ck, (*path, "args"), cmd.args, variables, trigger))


def load_triggers(path: str | Path) -> CompiledConfig:
    """Read, check and compile a triggers file."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise ConfigError([Problem(str(p), None, None, "", f"cannot read: {exc.strerror}")]) from None
    return compile_text(text, str(p), p.parent)


def _sends_commands(raw_triggers: Any) -> tuple[tuple[Any, ...], str | None] | None:
    """The path of the first command a trigger can send (a ``then`` command or ``on_result``) and its trigger."""
    for i, raw in enumerate(raw_triggers if isinstance(raw_triggers, list) else []):
        if not isinstance(raw, dict):
            continue
        name = raw.get("name") if isinstance(raw.get("name"), str) else None
        then = raw.get("then")
        for ai, action in enumerate(then if isinstance(then, list) else []):
            if isinstance(action, dict) and action.get("command") is not None:
                return ("triggers", i, "then", ai, "command"), name
        if raw.get("on_result") is not None:
            return ("triggers", i, "on_result"), name
    return None


def _file_problems(text: str, source: str, base: Path) -> list[Problem]:
    """Checks of the whole file that ``cloud run`` makes before it starts: triggers exist, commands can be signed."""
    try:
        data, marks = parse_yaml_text(text, source)
    except ConfigError:
        return []  # invalid YAML: compile_text reports it
    data = {} if data is None else data  # an empty file (or only comments)
    if not isinstance(data, dict):
        return []  # compile_text reports it
    places = _Places(text, marks)
    raw_triggers = data.get("triggers")
    problems: list[Problem] = []
    if not raw_triggers:
        line, col = places.key(("triggers",)) if "triggers" in data else (1, 1)
        problems.append(
            Problem(
                source,
                line,
                col,
                "triggers",
                "no triggers: the file defines none, so nothing would ever fire "
                "(add a 'triggers:' list; docs/triggers.md has examples)",
            )
        )
    sends = _sends_commands(raw_triggers)
    if sends is not None:
        where, trigger = sends
        key_file = data.get("signing_key_file")
        env_key = os.environ.get("RX_SIGNING_KEY", "").strip()
        line, col = places.key(where)
        if isinstance(key_file, str):
            path = Path(key_file) if Path(key_file).is_absolute() else base / key_file
            if not path.is_file():
                kl, kc = places.key(("signing_key_file",))
                problems.append(
                    Problem(
                        source,
                        kl,
                        kc,
                        "signing_key_file",
                        f"no such key file {path}: create one with 'reflexarc keys generate'",
                    )
                )
        elif env_key:
            if not Path(env_key).is_file():
                problems.append(
                    Problem(
                        source,
                        line,
                        col,
                        _describe(where, trigger),
                        f"RX_SIGNING_KEY names {env_key}, which is not a file",
                    )
                )
        else:
            problems.append(
                Problem(
                    source,
                    line,
                    col,
                    _describe(where, trigger),
                    "triggers send commands, which must be signed, and no key is configured: "
                    "set 'signing_key_file' or RX_SIGNING_KEY (create a key with "
                    "'reflexarc keys generate')",
                )
            )
    return problems


def validate_file(path: str | Path) -> tuple[CompiledConfig | None, list[Problem]]:
    """Every problem of a triggers file in one pass, including what ``cloud run`` refuses (no triggers, no key).

    Returns the compiled file (None when it does not compile) and the problems, sorted by line.
    Raises ``OSError`` when the file cannot be read (an I/O error, not a problem of the file).
    """
    p = Path(path)
    text = p.read_text()
    cfg: CompiledConfig | None = None
    problems: list[Problem] = []
    try:
        cfg = compile_text(text, str(p), p.parent)
    except ConfigError as exc:
        problems.extend(exc.problems)
    seen = {str(x) for x in problems}
    problems.extend(x for x in _file_problems(text, str(p), p.parent) if str(x) not in seen)
    return cfg, sorted(problems, key=lambda x: (x.line or 0, x.column or 0))
