"""Mutation testing of samadapt's critical paths with cosmic-ray (not a pytest file; see tests/README.md).

cosmic-ray finds the mutants (its parso-based operators) and applies each one to the file *in place*; this
script runs the target's focused pytest selection against it and restores the file. In-place mutation is
what our `package-dir` mapping needs: the editable install imports `samadapt.*` from this checkout, so the
mutated file is the one the tests import (mutmut 3 copies the code into `mutants/` instead, which the
`samadapt.*` mapping bypasses). Before any score is reported, a sentinel mutant in every target file (a
module-level `raise`) must be killed by that target's tests, and each unmutated selection must pass.

Configuration: `[tool.cosmic-ray]` in pyproject.toml (targets, their files and tests, timeouts, operators left
out). Typical run (both cores, about 30 minutes):

    OMP_NUM_THREADS=1 python tests/mutation.py --sample 25 --seed 1 --budget 2400

One mutant again (e.g. after adding the test that kills it):

    python tests/mutation.py --mutant recipes/metrics.py:core/NumberReplacer:12

Exit status: 0 report written; 2 precondition failed (no score); 3 the tree was changed by the run.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import difflib
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
class Precondition(Exception):
    """The run cannot give a meaningful score (selection failing unmutated, sentinel not killed)."""


SENTINEL = "raise RuntimeError('mutation-sentinel: the tests import this very file')"


def load_config() -> dict:
    try:
        import tomllib

        with open(ROOT / "pyproject.toml", "rb") as f:
            return tomllib.load(f)["tool"]["cosmic-ray"]
    except ImportError:  # Python 3.10: cosmic-ray depends on `toml`
        import toml

        return toml.load(ROOT / "pyproject.toml")["tool"]["cosmic-ray"]


@dataclasses.dataclass
class Mutant:
    target: str
    path: str  # relative to the repository root
    operator: str
    occurrence: int
    line: int
    outcome: str = "not run"  # killed | survived | timeout | error | not run
    seconds: float = 0.0
    diff: str = ""

    @property
    def key(self) -> str:
        return f"{self.path}:{self.operator}:{self.occurrence}"


def _function_lines(path: Path, names) -> list[tuple[int, int]]:
    """Line ranges of the named top-level functions (a target may cover only part of a module)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = {n.name: (n.lineno, n.end_lineno) for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    missing = sorted(set(names) - set(found))
    if missing:
        raise SystemExit(f"[tool.cosmic-ray] names functions {missing} that {path} does not define")
    return [found[n] for n in names]


def enumerate_mutants(cfg: dict) -> dict[str, list[Mutant]]:
    """Every mutant of every target, numbered as cosmic-ray numbers them (occurrence per operator and file)."""
    from cosmic_ray.ast import ast_nodes, get_ast_from_path
    from cosmic_ray.plugins import get_operator, operator_names

    exclude = re.compile("|".join(cfg.get("exclude-operators", [])) or "(?!)")
    operators = []
    for name in operator_names():
        cls = get_operator(name)
        if not exclude.search(name) and not cls.arguments():  # the two parameterised operators need a config
            operators.append((name, cls()))
    out: dict[str, list[Mutant]] = {}
    for target, tcfg in cfg["targets"].items():
        out[target] = []
        for rel in tcfg["files"]:
            path = ROOT / rel
            ranges = _function_lines(path, tcfg["functions"][rel]) if rel in tcfg.get("functions", {}) else None
            nodes = list(ast_nodes(get_ast_from_path(path)))
            for name, op in operators:
                occurrence = 0
                for node in nodes:
                    for start, _end in op.mutation_positions(node):
                        line = start[0]
                        if ranges is None or any(a <= line <= b for a, b in ranges):
                            out[target].append(Mutant(target, rel, name, occurrence, line))
                        occurrence += 1
    return out


class Tree:
    """The files that mutants touch: snapshot at start, restored after every mutant and at exit, verified."""

    def __init__(self, files):
        self.files = sorted(set(files))
        self.saved = {f: (ROOT / f).read_bytes() for f in self.files}
        self.status = self._git_status()

    @staticmethod
    def _git_status() -> str:
        return subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout

    def restore(self, rel=None) -> None:
        for f in [rel] if rel else self.files:
            if (ROOT / f).read_bytes() != self.saved[f]:
                (ROOT / f).write_bytes(self.saved[f])

    def verify(self) -> list[str]:
        changed = [f for f in self.files if (ROOT / f).read_bytes() != self.saved[f]]
        if self._git_status() != self.status:
            changed.append("git status differs from the start:\n" + self._git_status())
        return changed


def run_tests(args, timeout: float) -> tuple[str, float, str]:
    """`pytest -x` on a selection in a fresh process group; (outcome, seconds, output tail)."""
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")  # no stale .pyc of a mutant can outlive it
    env.setdefault("OMP_NUM_THREADS", "1")
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *args]
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return "timeout", time.monotonic() - t0, ""
    except BaseException:  # Ctrl-C: take the test process down before the files are restored
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    seconds = time.monotonic() - t0
    if proc.returncode == 0:
        return "survived", seconds, out[-3000:]
    if proc.returncode == 5:  # nothing collected: not a kill
        return "error", seconds, out[-3000:]
    return "killed", seconds, out[-3000:]


def apply_and_test(m: Mutant, tree: Tree, tests, timeout: float) -> None:
    from cosmic_ray.mutating import mutate_code
    from cosmic_ray.plugins import get_operator

    original = tree.saved[m.path].decode("utf-8")
    mutated = mutate_code(original, get_operator(m.operator)(), m.occurrence)
    if mutated is None:
        m.outcome = "error"
        m.diff = "cosmic-ray applied no mutation"
        return
    m.diff = "\n".join(line for line in difflib.unified_diff(original.splitlines(), mutated.splitlines(), n=0,
                                                            lineterm="") if line[:1] in "+-" and line[:3] not in
                       ("+++", "---"))
    try:
        (ROOT / m.path).write_text(mutated, encoding="utf-8")
        m.outcome, m.seconds, _ = run_tests(tests, timeout)
    finally:
        tree.restore(m.path)


def preconditions(cfg: dict, tree: Tree) -> dict[str, float]:
    """Each selection passes unmutated and kills a sentinel in each of its files; returns baseline seconds."""
    baseline = {}
    for target, tcfg in cfg["targets"].items():
        outcome, seconds, out = run_tests(tcfg["tests"], 900)
        if outcome != "survived":
            raise Precondition(f"{target}'s tests do not pass unmutated ({outcome}):\n{out}")
        baseline[target] = seconds
        print(f"baseline {target}: passed in {seconds:.1f}s", flush=True)
        for rel in tcfg["files"]:
            try:
                text = tree.saved[rel].decode("utf-8")
                (ROOT / rel).write_text(text.rstrip("\n") + "\n" + SENTINEL + "\n", encoding="utf-8")
                outcome, _, out = run_tests(tcfg["tests"], 900)
            finally:
                tree.restore(rel)
            if outcome != "killed" or "mutation-sentinel" not in out:
                raise Precondition(f"the sentinel mutant in {rel} was not killed by {target}'s tests "
                                 f"({outcome}): they do not run the mutated file, so no score would mean anything")
        print(f"sentinel {target}: killed in all {len(tcfg['files'])} files", flush=True)
    return baseline


def report(all_mutants: dict[str, list[Mutant]], sample: dict[str, list[Mutant]], args) -> str:
    lines = [f"mutation run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}: cosmic-ray operators, "
             f"--sample {args.sample} --seed {args.seed} --budget {args.budget}", "",
             "| target | mutants | run | killed | survived | timed out | errors | not run | score (killed/run) |",
             "|---|---|---|---|---|---|---|---|---|"]
    total = dict.fromkeys(["mutants", "run", "killed", "survived", "timeout", "error", "not run"], 0)
    for target, ms in sample.items():
        n = {k: sum(m.outcome == k for m in ms) for k in ["killed", "survived", "timeout", "error", "not run"]}
        n["mutants"], n["run"] = len(all_mutants[target]), len(ms) - n["not run"]
        for k in total:
            total[k] += n[k]
        score = f"{n['killed'] / n['run']:.0%}" if n["run"] else "-"
        lines.append(f"| {target} | {n['mutants']} | {n['run']} | {n['killed']} | {n['survived']} | {n['timeout']} "
                     f"| {n['error']} | {n['not run']} | {score} |")
    score = f"{total['killed'] / total['run']:.0%}" if total["run"] else "-"
    lines.append(f"| **all** | {total['mutants']} | {total['run']} | {total['killed']} | {total['survived']} "
                 f"| {total['timeout']} | {total['error']} | {total['not run']} | **{score}** |")
    lines += ["", "survivors (and errors):"]
    for ms in sample.values():
        for m in ms:
            if m.outcome in ("survived", "error", "timeout"):
                diff = m.diff.replace("\n", " / ")
                lines.append(f"- [{m.outcome}] {m.path}:{m.line} `{m.key}`: {diff}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sample", type=int, default=25, help="mutants per target (seeded random sample)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--budget", type=float, default=1800, help="seconds; no mutant starts after it is spent")
    p.add_argument("--target", action="append", help="only these targets (repeatable)")
    p.add_argument("--mutant", action="append", help="run exactly PATH:OPERATOR:OCCURRENCE (repeatable)")
    p.add_argument("--list", action="store_true", help="count the mutants per target and stop")
    p.add_argument("--report", type=Path, help="also write the report to this file")
    args = p.parse_args(argv)
    t_start = time.monotonic()
    cfg = load_config()
    if args.target:
        cfg["targets"] = {t: cfg["targets"][t] for t in args.target}
    all_mutants = enumerate_mutants(cfg)
    if args.list:
        for target, ms in all_mutants.items():
            print(target, len(ms))
        return 0
    if args.mutant:
        by_key = {m.key: m for ms in all_mutants.values() for m in ms}
        unknown = [k for k in args.mutant if k not in by_key]
        if unknown:
            raise SystemExit(f"--mutant {unknown}: not a mutant of any target (PATH:OPERATOR:OCCURRENCE)")
        sample = {}
        for k in args.mutant:
            sample.setdefault(by_key[k].target, []).append(by_key[k])
        cfg["targets"] = {t: cfg["targets"][t] for t in sample}
    else:
        rng = random.Random(args.seed)
        sample = {t: sorted(rng.sample(ms, min(args.sample, len(ms))), key=lambda m: (m.path, m.line))
                  for t, ms in all_mutants.items()}

    def on_term(*_):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)  # a killed run restores its files as Ctrl-C does
    signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C even where SIGINT came in ignored (`&`)
    tree = Tree(f for t in cfg["targets"].values() for f in t["files"])
    interrupted, failed = False, None
    try:
        baseline = preconditions(cfg, tree)
        queue = [m for ms in zip(*(sample[t] + [None] * (max(map(len, sample.values())) - len(sample[t]))
                                   for t in sample)) for m in ms if m is not None]  # round robin over targets
        for i, m in enumerate(queue, 1):
            if time.monotonic() - t_start > args.budget:
                print(f"budget spent: {len(queue) - i + 1} mutants not run", flush=True)
                break
            timeout = cfg["timeout-factor"] * baseline[m.target] + cfg["timeout-min"]
            apply_and_test(m, tree, cfg["targets"][m.target]["tests"], timeout)
            print(f"[{i}/{len(queue)}] {m.outcome:8} {m.seconds:5.1f}s {m.path}:{m.line} {m.key}", flush=True)
    except Precondition as e:
        failed = e
    except KeyboardInterrupt:
        interrupted = True
        print("interrupted: restoring the files", file=sys.stderr)
    finally:
        tree.restore()
        changed = tree.verify()
        if changed:
            print("ERROR: the tree is not as it was before the run:\n" + "\n".join(changed), file=sys.stderr)
    if changed:
        return 3
    print("tree verified: every mutated file restored, git status unchanged", flush=True)
    if failed:
        print(f"PRECONDITION FAILED, no score: {failed}", file=sys.stderr)
        return 2
    if interrupted:
        return 130
    text = report(all_mutants, sample, args)
    print("\n" + text)
    if args.report:
        args.report.write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
