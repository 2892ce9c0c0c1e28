"""Every docstring example in the three packages runs (imported by their installed names)."""
import doctest
import importlib
import pkgutil

import pytest

PACKAGES = ("samadapt.sam_core", "samadapt.adapters", "samadapt.recipes")


def _modules():
    names = []
    for pkg_name in PACKAGES:
        pkg = importlib.import_module(pkg_name)
        names.append(pkg_name)
        names += [m.name for m in pkgutil.walk_packages(pkg.__path__, pkg_name + ".")]
    return sorted(n for n in names if not n.endswith("__main__"))


MODULES = _modules()


def test_every_package_has_modules():
    for pkg in PACKAGES:
        assert sum(m.startswith(pkg + ".") for m in MODULES) >= 3, f"{pkg}: submodules not found: {MODULES}"


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    module = importlib.import_module(name)
    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    tests = [t for t in finder.find(module, name) if t.examples]
    for t in tests:
        runner.run(t)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, (
        f"{name}: {result.failed} of {result.attempted} docstring examples failed (output above)"
    )
