"""Every replica's ``/metrics`` in one Prometheus exposition, each sample labelled ``replica``.

Prometheus' text format wants one ``# HELP`` / ``# TYPE`` per metric family and the family's
samples together, so the replicas' texts are merged family by family (in the order first seen)
rather than concatenated. Sums across replicas are left to PromQL (``sum without (replica)``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

_SAMPLE = re.compile(r"^([^\s{]+)(\{.*\})?(\s.*)$")


@dataclass
class _Family:
    comments: list[str] = field(default_factory=list)
    samples: list[str] = field(default_factory=list)


def label_value(text: str) -> str:
    """``text`` escaped as a Prometheus label value."""
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def with_label(line: str, name: str, value: str) -> str:
    """Sample ``line`` with ``name="value"`` as its first label."""
    match = _SAMPLE.match(line)
    if match is None:
        raise ValueError(f"not a Prometheus sample line: {line!r}")
    metric, labels, rest = match.groups()
    inner = labels[1:-1] if labels else ""
    pair = f'{name}="{label_value(value)}"'
    return f"{metric}{{{pair}{',' + inner if inner else ''}}}{rest}"


def merge(texts: Sequence[tuple[str, str]], label: str = "replica") -> str:
    """Merge ``(replica, exposition text)`` pairs into one exposition."""
    families: dict[str, _Family] = {}
    for replica, text in texts:
        current: _Family | None = None
        for line in text.splitlines():
            if not line.strip():
                continue
            if line.startswith("#"):
                parts = line.split(maxsplit=3)
                if len(parts) >= 3 and parts[1] in ("HELP", "TYPE"):
                    family = families.setdefault(parts[2], _Family())
                    if line not in family.comments:
                        family.comments.append(line)
                    current = family
                continue
            if current is None:  # a sample before any HELP/TYPE: a family of its own
                current = families.setdefault(line.split("{")[0].split()[0], _Family())
            current.samples.append(with_label(line, label, replica))
    out = []
    for family in families.values():
        out.extend(family.comments)
        out.extend(family.samples)
    return "\n".join(out) + "\n" if out else ""
