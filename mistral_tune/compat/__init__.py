"""The one door to library internals (layer 0, beside ``core``).

Rule: mistral-tune touches a private attribute, private method or undocumented behaviour of
transformers, TRL, PEFT, accelerate, DeepSpeed or bitsandbytes only here, one module per library
(``compat/transformers.py``, ``compat/trl.py``, ...). Everywhere else calls a small named function
or subclasses a thin mixin from these modules; ``tests/compat/test_compat_scan.py`` walks the source
with ``ast`` and fails, naming file:line, on any such access outside ``mistral_tune/compat/``.

To add an access: write a function (or a mixin method that forwards a library hook to a public-named
method of ours) in the library's module, import the library lazily inside it (``import mistral_tune.cli``
stays torch-free), add a canary test to ``tests/compat/test_compat_<library>.py`` that uses a real tiny
object and fails naming the library, its installed version and the symbol, and add the private name to
``PRIVATE_NAMES`` in the scan test if it is new. When an upgrade breaks an access, the canary test says
which one; fix it here, once. See docs/compat.md.

compat imports nothing from mistral_tune except ``mistral_tune.core``.
"""

from __future__ import annotations


def installed_version(dist: str) -> str:
    """The installed version of a distribution, for messages ("not installed" when absent)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "not installed"


def broken(dist: str, symbol: str, problem: str) -> str:
    """The canary tests' failure message: which library, which installed version, which symbol, what changed."""
    return f"{dist} {installed_version(dist)}: {symbol} {problem}; update mistral_tune/compat/ for it"
