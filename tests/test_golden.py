"""Outputs of LLM.generate, the Executor, conversations, ChatSession and the server, token for
token against the golden outputs recorded before the engine-core redesign (tests/golden/)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.golden.cases import CASES, Context, run_case

GOLDEN = json.loads((Path(__file__).parent / "golden" / "outputs.json").read_text())


@pytest.fixture(scope="module")
def ctx(smollm_fp32: Any, tiny_models: Any) -> Context:
    return Context(smollm_fp32, {arch: directory for arch, (directory, _) in tiny_models.items()})


def test_every_case_is_recorded() -> None:
    assert sorted(GOLDEN) == sorted(CASES)


@pytest.mark.parametrize("name", sorted(CASES))
def test_golden(name: str, ctx: Context) -> None:
    assert run_case(name, ctx) == GOLDEN[name]
