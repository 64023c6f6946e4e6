"""The docs a newcomer navigates stay true to the code.

- every relative link in README.md and docs/*.md resolves to a file of the repository, and a link
  to a heading (``page.md#anchor``) to a heading of that page;
- every ``python -m sskt_lightning.<cmd>`` / ``sskt-<cmd>`` command in a fenced shell block is
  checked: a training command's overrides are composed by Hydra (so a renamed option or config
  group fails here), ``sskt-eval``'s and ``sskt-rank``'s with their own root configs, and the ``--flags`` of ``cache``,
  ``protocol`` and ``report`` must be ones their ``--help`` lists. A command that cannot be checked
  here carries ``# not run here: <reason>`` on its line or on the line before;
- ``make <target>`` and ``python experiments/<script>.py --flag`` lines name targets, scripts and
  flags that exist;
- every config group and option under conf/ is named in docs/configuration.md, every group in the
  README, and the README's headline numbers are the measured ones of docs/results.md;
- README.md stays short (at most 260 lines).
"""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
PAGES = [README, *sorted(DOCS.glob("*.md"))]
MARKER = "# not run here:"
SHELL_LANGS = {"", "bash", "sh", "shell", "console"}
MAX_README_LINES = 260


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


# ---------------------------------------------------------------------------------------- parsing

def _fenced_blocks(text: str) -> list[tuple[str, int, list[str]]]:
    """``(language, first line number, lines)`` of every fenced code block."""
    blocks, lang, start, body = [], None, 0, []
    for number, line in enumerate(text.splitlines(), 1):
        fence = re.match(r"^\s*```(\S*)\s*$", line)
        if fence and lang is None:
            lang, start, body = fence.group(1), number + 1, []
        elif fence and lang is not None:
            blocks.append((lang, start, body))
            lang = None
        elif lang is not None:
            body.append(line)
    assert lang is None, "a fenced code block is not closed"
    return blocks


def _prose(text: str) -> str:
    """The text outside fenced code blocks, line numbers kept (code lines blanked)."""
    out, inside = [], False
    for line in text.splitlines():
        if re.match(r"^\s*```", line):
            inside = not inside
            out.append("")
        else:
            out.append("" if inside else line)
    return "\n".join(out)


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]|\[|\]\([^)]*\)", "", heading.strip()).lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    anchors, seen = set(), {}
    for line in _prose(page.read_text()).splitlines():
        heading = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if heading:
            slug = _slug(heading.group(1))
            anchors.add(f"{slug}-{seen[slug]}" if slug in seen else slug)
            seen[slug] = seen.get(slug, 0) + 1
    return anchors


def _links(page: Path) -> list[tuple[int, str]]:
    """``(line, target)`` of every inline markdown link outside code blocks."""
    found = []
    for number, line in enumerate(_prose(page.read_text()).splitlines(), 1):
        for target in re.findall(r"\]\(([^)\s]+)\)", line):
            found.append((number, target))
    return found


def _commands() -> list[tuple[str, int, str, bool]]:
    """``(page, line, command, marked)`` for every logical line of every shell code block: lines
    ending in ``\\`` joined, a leading ``$ `` dropped, comment-only lines skipped; ``marked`` when the
    line or the physical line before it carries the not-run marker."""
    commands = []
    for page in PAGES:
        for lang, start, body in _fenced_blocks(page.read_text()):
            if lang not in SHELL_LANGS:
                continue
            i = 0
            while i < len(body):
                first, parts = i, [body[i]]
                while parts[-1].rstrip().endswith("\\") and i + 1 < len(body):
                    parts[-1] = parts[-1].rstrip()[:-1]
                    i += 1
                    parts.append(body[i])
                i += 1
                line = " ".join(p.strip() for p in parts).strip()
                if line.startswith("$ "):
                    line = line[2:]
                if not line or line.startswith("#"):
                    continue
                before = body[first - 1] if first > 0 else ""
                marked = MARKER in line or MARKER in before
                commands.append((_rel(page), start + first, line, marked))
    return commands


def _tokens(line: str) -> list[str]:
    """Shell words of a command line, its trailing comment dropped, ``<placeholders>`` filled."""
    line = re.sub(r"<[^<>]*>", "PLACEHOLDER", line)
    return shlex.split(line, comments=True)


def _sskt_command(tokens: list[str]) -> tuple[str, list[str]] | None:
    """``(command, arguments)`` for ``... -m sskt_lightning.<cmd> args`` or ``sskt-<cmd> args``."""
    for i, token in enumerate(tokens):
        module = re.fullmatch(r"sskt_lightning\.(\w+)", token)
        if module and i > 0 and tokens[i - 1] == "-m":
            return module.group(1), tokens[i + 1:]
    words = [t for t in tokens if not re.fullmatch(r"\w+=\S*", t)]   # env assignments before it
    if words and re.fullmatch(r"sskt-(train|eval|report|cache|rank)", words[0]):
        return words[0][len("sskt-"):], tokens[tokens.index(words[0]) + 1:]
    return None


def _overrides(args: list[str]) -> list[str]:
    """The Hydra overrides of an argument list: flags (``-m``, ``--cfg job``) and ``...`` dropped,
    shell variables given a value."""
    out, skip = [], False
    for arg in args:
        if skip:
            skip = False
            continue
        if arg in ("--cfg", "-c", "--package", "-p"):
            skip = True
            continue
        if arg == "..." or arg.startswith("-"):
            continue
        out.append(re.sub(r"\$\{?\w+\}?", "0", arg))
    return out


def _compositions(overrides: list[str]) -> list[list[str]]:
    """A multirun's sweeps as single compositions: every value of every sweep once, the other
    sweeps at their first value (a product would only repeat the same checks)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    parsed = OverridesParser.create().parse_overrides(overrides)
    sweeps = {o.input_line: list(o.sweep_string_iterator()) for o in parsed if o.is_sweep_override()}
    if not sweeps:
        return [overrides]
    base = {line: values[0] for line, values in sweeps.items()}

    def single(choice: dict[str, str]) -> list[str]:
        return [f"{line.split('=', 1)[0]}={choice[line]}" if line in choice else line for line in overrides]

    runs = [single(base)]
    for line, values in sweeps.items():
        runs += [single({**base, line: value}) for value in values[1:]]
    return runs


# ---------------------------------------------------------------------------------------- (a) links

@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_every_relative_link_resolves(page):
    problems = []
    for number, target in _links(page):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):   # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            problems.append(f"{_rel(page)}:{number}: {target} -> no such file")
        elif ROOT not in file.parents and file != ROOT:
            problems.append(f"{_rel(page)}:{number}: {target} leaves the repository")
        elif anchor and file.suffix == ".md" and anchor not in _anchors(file):
            problems.append(f"{_rel(page)}:{number}: {target} -> no heading '#{anchor}' in {_rel(file)}")
    assert not problems, "\n".join(problems)


def test_docs_has_an_index_that_links_every_page():
    index = DOCS / "index.md"
    assert index.is_file(), "docs/index.md is the docs' table of contents"
    linked = {target.partition("#")[0] for _, target in _links(index)}
    missing = [p.name for p in DOCS.glob("*.md") if p.name != "index.md" and p.name not in linked]
    assert not missing, f"docs/index.md does not link {missing}"
    assert any(target.startswith("docs/index.md") for _, target in _links(README)), "README must link docs/index.md"


def test_slugs_follow_github():
    assert _slug("Config groups (`conf/`)") == "config-groups-conf"
    assert _slug("Reproducing the paper's tables") == "reproducing-the-papers-tables"
    assert _slug("`make train` (measured 2026-11-26)") == "make-train-measured-2026-11-26"


# ---------------------------------------------------------------------------------------- (b) commands

def test_command_lines_are_found():
    """The scanner sees the documented commands (a format change must not make (b) vacuous)."""
    commands = [c for c in _commands() if _sskt_command(_tokens(c[2]))]
    lines = [c[2] for c in commands]
    assert "python -m sskt_lightning.train model=resnet18 data=cifar10 method=sskt" in \
        [re.sub(r"\s+#.*", "", line).strip() for line in lines]
    pages = {c[0] for c in commands}
    assert {"README.md", "docs/getting-started.md", "docs/cache.md", "docs/multi-gpu-and-clusters.md",
            "docs/protocol-and-reports.md"} <= pages
    kinds = {_sskt_command(_tokens(c[2]))[0] for c in commands}
    assert {"train", "eval", "rank", "cache", "protocol", "report"} <= kinds


def _help(module: str, sub: str | None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", f"sskt_lightning.{module}", *([sub] if sub else []), "--help"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


def _takes_value(help_text: str, flag: str) -> bool:
    """argparse's usage shows ``--flag VALUE`` for an option with an argument."""
    return re.search(rf"{re.escape(flag)}[ =][A-Z]", help_text) is not None


def _split_flags(args: list[str], help_text: str) -> tuple[list[str], list[str]]:
    """``(--flags, the rest)``; a flag's argument (``--key STORE``) is neither an override nor a flag."""
    flags, rest, i = [], [], 0
    while i < len(args):
        if args[i].startswith("--") and args[i] != "--":
            flags.append(args[i].split("=", 1)[0])
            if "=" not in args[i] and _takes_value(help_text, args[i]):
                i += 1
        else:
            rest.append(args[i])
        i += 1
    return flags, rest


def test_every_documented_command_composes_or_is_marked(tmp_path):
    found = []
    for page, number, line, marked in _commands():
        command = _sskt_command(_tokens(line))
        if command is not None and not marked:
            found.append((f"{page}:{number}: {line}", *command))
    unknown = [where for where, command, _ in found if command not in ("train", "eval", "rank", "cache", "protocol", "report")]
    assert not unknown, f"no check for these commands; check them here or mark them '{MARKER} <reason>':\n" + \
        "\n".join(unknown)
    keys = {("report", None), ("protocol", None)} | {("cache", args[0]) for _, c, args in found if c == "cache"}
    helps = {key: _help(*key) for key in keys}   # in parallel with the compositions below
    compositions: list[tuple[str, str, list[str]]] = []   # (where, root config, overrides)
    pending: list[tuple[str, str, str | None, list[str]]] = []   # (where, module, subcommand, arguments)
    for where, command, args in found:
        if command == "train":
            compositions += [(where, "train", overrides) for overrides in _compositions(_overrides(args))]
        elif command in ("eval", "rank"):
            compositions.append((where, command, _overrides(args)))
        elif command == "cache":
            pending.append((where, "cache", args[0], args[1:]))
        else:   # protocol: its own options, then `--` and the setting's overrides; report: options only
            pending.append((where, command, None, args))

    problems, texts = [], {}
    for key, proc in helps.items():
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, f"python -m sskt_lightning.{key[0]} {key[1] or ''} --help failed:\n{out[-2000:]}"
        texts[key] = out
    for where, module, sub, args in pending:
        text = texts[(module, sub)]
        cut = args.index("--") if "--" in args else len(args)
        flags, rest = _split_flags(args[:cut], text)
        for flag in flags:
            if not re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", text):
                problems.append(f"{where}\n    {flag} is not an option of `sskt_lightning.{module} {sub or ''}`")
        if module == "cache":
            compositions.append((where, "train", _overrides(rest)))
        elif module == "protocol":
            setting = _overrides(args[cut + 1:])
            compositions.append((where, "train", setting))
            methods = args[args.index("--methods") + 1:cut] if "--methods" in args[:cut] else []
            for name in methods[:next((i for i, a in enumerate(methods) if a.startswith("-")), len(methods))]:
                if (ROOT / "conf" / "method" / f"{name}.yaml").is_file():
                    compositions.append((where, "train", [*setting, f"method={name}"]))

    if not _has_optuna_sweeper():    # those are composed in the sweeper's environment (the test below)
        compositions = [c for c in compositions if not _needs_optuna_sweeper(c[2])]
    problems += _compose_all(compositions, tmp_path)
    assert len(compositions) >= 20 and len(pending) >= 5
    assert not problems, "documented commands that no longer work:\n" + "\n".join(problems)


def _needs_optuna_sweeper(overrides: list[str]) -> bool:
    """Hydra's Optuna sweeper: an ``hparams_search`` config or ``hydra/sweeper=optuna`` (the
    optuna-sweeper extra, its own environment: make test runs those checks in .venv-sweeper)."""
    return any(o.startswith(("hparams_search=", "hydra/sweeper=optuna")) for o in overrides)


def _has_optuna_sweeper() -> bool:
    import importlib.util
    try:
        return importlib.util.find_spec("hydra_plugins.hydra_optuna_sweeper") is not None
    except ModuleNotFoundError:
        return False


def _compose_all(compositions: list[tuple[str, str, list[str]]], tmp_path) -> list[str]:
    from hydra import compose, initialize_config_dir

    from sskt_lightning.compose import config_dir
    problems = []
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        for where, name, overrides in compositions:
            try:
                compose(name, overrides=[*overrides, f"paths.output_dir={tmp_path}"], return_hydra_config=True)
            except Exception as err:   # noqa: BLE001 - every failure is reported with its command
                problems.append(f"{where}\n    {' '.join(overrides)}\n    {type(err).__name__}: {err}")
    return problems


@pytest.mark.optuna_sweeper
def test_documented_optuna_searches_compose_where_the_sweeper_is_installed(tmp_path):
    if not _has_optuna_sweeper():
        if os.environ.get("SSKT_REQUIRE_OPTUNA_SWEEPER"):
            pytest.fail("hydra-optuna-sweeper is not installed in this environment (make install-sweeper)")
        pytest.skip("needs the optuna-sweeper extra's environment (make test builds .venv-sweeper)")
    compositions = []
    for page, number, line, marked in _commands():
        command = _sskt_command(_tokens(line))
        if command is not None and command[0] == "train" and not marked:
            compositions += [(f"{page}:{number}: {line}", "train", o) for o in _compositions(_overrides(command[1]))
                             if _needs_optuna_sweeper(o)]
    assert len(compositions) >= 2       # (docs/multi-gpu-and-clusters.md, docs/protocol-and-reports.md)
    problems = _compose_all(compositions, tmp_path)
    assert not problems, "documented Optuna searches that no longer compose:\n" + "\n".join(problems)


def test_a_renamed_option_or_group_would_fail(tmp_path):
    """The check above is not vacuous: the same composition refuses a misspelt option and group."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException

    from sskt_lightning.compose import config_dir
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        for bad in (["method=sskt", "method.alpah=0.5"], ["model=resnet18", "data=cifar10", "method=nosuch"],
                    ["hydra/launcher=nosuch"]):
            with pytest.raises(HydraException):
                compose("train", overrides=[*bad, f"paths.output_dir={tmp_path}"], return_hydra_config=True)


def test_sweeps_are_checked_value_by_value():
    runs = _compositions(["method=scratch,kd", "seed=0,1,2", "tags=[a,b]"])
    assert ["method=scratch", "seed=0", "tags=[a,b]"] in runs and ["method=kd", "seed=0", "tags=[a,b]"] in runs
    assert ["method=scratch", "seed=2", "tags=[a,b]"] in runs and len(runs) == 4


def test_make_targets_and_experiment_scripts_exist():
    makefile = (ROOT / "Makefile").read_text()
    problems, checked = [], 0
    for page, number, line, marked in _commands():
        if marked:
            continue
        tokens = _tokens(line)
        if tokens[:1] == ["make"]:
            for target in [t for t in tokens[1:] if not t.startswith("-")]:
                checked += 1
                if not re.search(rf"^{re.escape(target)}\s*:", makefile, re.M):
                    problems.append(f"{page}:{number}: no make target '{target}'")
        script = next((t for t in tokens if re.fullmatch(r"experiments/\S+\.py", t)), None)
        if tokens[:1] == ["python"] and script:
            checked += 1
            path = ROOT / script
            if not path.is_file():
                problems.append(f"{page}:{number}: no script {script}")
                continue
            source = path.read_text()
            for flag in [t.split("=", 1)[0] for t in tokens[tokens.index(script) + 1:] if t.startswith("--")]:
                if f'"{flag}"' not in source and f"'{flag}'" not in source:
                    problems.append(f"{page}:{number}: {script} has no option {flag}")
    assert checked >= 4
    assert not problems, "\n".join(problems)


def test_cifar_nets_snippet_runs_and_its_comments_hold():
    """docs/python-api.md's timm snippet, with an input batch ``x`` of 32 px images."""
    import torch
    text = (DOCS / "python-api.md").read_text().split("## The CIFAR nets in timm", 1)[1]
    code = next(body for lang, _, body in _fenced_blocks(text) if lang == "python")
    namespace = {"x": torch.zeros(2, 3, 32, 32)}
    exec(compile("\n".join(code), "docs/python-api.md", "exec"), namespace)
    assert namespace["net"].num_classes == 10
    assert [tuple(m.shape) for m in namespace["maps"]] == [(2, 32, 16, 16), (2, 64, 8, 8)]
    backbone = namespace["backbone"]
    assert (backbone.feature_info.channels(), backbone.feature_info.reduction()) == ([32, 64], [2, 4])


# ---------------------------------------------------------------------------------------- completeness

def _options(group: Path) -> list[str]:
    return sorted(str(p.relative_to(group).with_suffix("")) for p in group.rglob("*.yaml"))


GROUPS = sorted(p for p in (ROOT / "conf").iterdir() if p.is_dir() and not p.name.startswith("__"))


@pytest.mark.parametrize("group", GROUPS, ids=lambda p: p.name)
def test_configuration_page_names_every_group_and_option(group):
    text = (DOCS / "configuration.md").read_text()
    assert f"`{group.name}`" in text, f"docs/configuration.md does not name the config group {group.name}"
    if group.name == "hydra":   # its one option and the job_logging subgroup
        assert "`default`" in text and "hydra/job_logging=sskt" in text
        return
    missing = [o for o in _options(group) if f"`{o}`" not in text]
    assert not missing, f"docs/configuration.md does not name {group.name} option(s) {missing}"


def test_readme_names_every_config_group():
    text = README.read_text()
    missing = [g.name for g in GROUPS if f"`{g.name}`" not in text]
    assert not missing, f"README.md does not name the config group(s) {missing}"


def test_readme_headline_numbers_are_the_measured_ones():
    """Every number of the README's headline results is one of docs/results.md (never retyped)."""
    section = README.read_text().split("## Headline results", 1)[1].split("\n## ", 1)[0]
    results = (DOCS / "results.md").read_text()
    numbers = re.findall(r"[+-]?\d+\.\d+", section)
    assert len(numbers) > 60
    missing = sorted({n for n in numbers if n not in results})
    assert not missing, f"README numbers not in docs/results.md: {missing}"


# ---------------------------------------------------------------------------------------- (c) length

def test_readme_is_short():
    lines = len(README.read_text().splitlines())
    assert lines <= MAX_README_LINES, f"README.md has {lines} lines; move reference text into docs/"
