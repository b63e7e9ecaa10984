"""The embedded tiny model's recipe follows its build code: change the code that shapes the
weights and the fingerprint (the cache key every result file was measured under) changes too."""

from __future__ import annotations

import importlib.util

from earlyexit.models import embedded


def source_of(module: str) -> str:
    with open(importlib.util.find_spec(module).origin, encoding="utf-8") as handle:
        return handle.read()


def test_the_recipe_records_the_digest_of_todays_build_code():
    # Fails when code that shapes tiny's weights changed and the recipe did not: bump
    # RECIPE["version"], set RECIPE["code"] to the digest below, rebuild and regenerate every
    # result file measured on tiny (docs/measurements.md lists them).
    assert embedded.RECIPE["code"] == embedded.code_digest(), embedded.code_digest()


def test_a_change_of_code_changes_the_digest_and_so_the_fingerprint():
    module = "earlyexit.training.loop"
    source = source_of(module)
    changed = source.replace("def warmup_cosine_schedule(", "def warmup_cosine_schedule_changed(")
    assert changed != source
    before, after = embedded.code_digest(), embedded.code_digest(sources={module: changed})
    assert before != after
    assert embedded.fingerprint({**embedded.RECIPE, "code": after}) != embedded.fingerprint(embedded.RECIPE)


def test_comments_docstrings_and_formatting_leave_the_digest_alone():
    module = "earlyexit.training.loop"
    source = source_of(module)
    reworded = "# a new comment\n" + source.replace('"""', '"""Reworded. ', 1).replace("\n\n\n", "\n\n\n\n")
    assert embedded.code_digest(sources={module: reworded}) == embedded.code_digest()


def test_every_build_module_exists():
    for module in embedded.BUILD_MODULES:
        assert importlib.util.find_spec(module) is not None, module
