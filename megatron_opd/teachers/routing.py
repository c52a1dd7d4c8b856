"""Several teachers in one run: each row routed to one, each teacher run only on its rows.

A `TeacherSet` holds the run's teachers in config order (`teachers:`, or the one teacher of
the single-teacher fields as a list of one). Every example carries `_teacher`, the index of
its teacher (`route_rows` reads it from the data's routing column once, at start). Per step,
`TeacherSet.forward(microbatches, examples)`:

  1. splits each microbatch by teacher: a microbatch whose rows all have one teacher goes
     whole, else each teacher gets a microbatch of its rows only (`pipeline.packing.select_examples`:
     same padded length, the rows' `rows` indices kept; packed rows re-packed with its examples
     only), so no teacher runs on another's rows;
  2. runs each teacher once over its microbatches of the step (in-process teachers forward
     through Megatron's schedule at the student's TP/PP layout; a teacher with no rows on this
     rank is not run, and with `offload_teacher_model` not loaded; a server teacher is always
     called, since its failure agreement is a collective over the world);
  3. on the last stage, assembles per microbatch a `TeacherMix`: one part per teacher present,
     with the positions of its rows' tokens among the microbatch's N, its temperature and top-K.

The loss sums per-token values over all N tokens as before, so the per-token normalization
over the global batch is unchanged however rows mix.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Optional, Sequence

import torch
from megatron.core import parallel_state

from megatron_opd.config.schema import ConfigError
from megatron_opd.pipeline import Microbatch
from megatron_opd.pipeline.packing import select_examples
from megatron_opd.teachers.outputs import TeacherMix, TeacherPart
from megatron_opd.teachers.server import ServerTeacher


@dataclass
class Member:
    """One teacher of the set: its name, its source (`LocalTeacher`, `ServerTeacher`,
    `TeacherCache`) and the settings its rows use."""

    name: str
    source: Any
    temperature: float
    topk: Optional[int]

    @property
    def called_everywhere(self) -> bool:
        """Whether every rank must call its forward each step (a server's agreement is a world collective)."""
        return isinstance(self.source, ServerTeacher)


def route_rows(values: Sequence[Any], names: Sequence[str], default: Optional[str], column: str, where: str
               ) -> tuple[list[int], list[int]]:
    """Each row's teacher index from its routing column `values` (None: `default`), and the
    rows that name no known teacher (none when every row routes). `where`: the data's name in errors."""
    index = {name: position for position, name in enumerate(names)}
    routes, unknown = [], []
    for row, value in enumerate(values):
        name = default if value is None else value
        if name is None:
            raise ConfigError(f"{where} row {row} has no {column!r} value and default_teacher is null: name "
                              f"one of the teachers {list(names)} in every row, or set default_teacher")
        if not isinstance(name, str) or name not in index:
            unknown.append(row)
            routes.append(-1)
        else:
            routes.append(index[name])
    return routes, unknown


def unknown_teacher_error(values: Sequence[Any], unknown: Sequence[int], names: Sequence[str], column: str,
                          where: str) -> ConfigError:
    first = unknown[0]
    return ConfigError(f"{where} row {first}: {column}={values[first]!r} is not a teacher of this run (known: "
                       f"{list(names)}); {len(unknown)} row(s) like it. Fix the rows, add the teacher, or set "
                       "data.skip_bad_rows: true to skip and count them")


def route_dataset(dataset, names: Sequence[str], config, where: str) -> tuple[Any, list[int], int]:
    """A tokenized split's rows routed by `config.teacher_column` (null or absent:
    `config.default_teacher`): the dataset (without the rows naming no teacher of the run when
    `data.skip_bad_rows`, else those fail naming the first), each row's teacher index, and the
    count skipped. Training and `cache-teacher` route alike, so a cache's rows are the run's."""
    column = config.teacher_column
    values = dataset[column] if column in dataset.column_names else [None] * len(dataset)
    routes, unknown = route_rows(values, names, config.default_teacher, column, where)
    if unknown and not config.data.skip_bad_rows:
        raise unknown_teacher_error(values, unknown, names, column, where)
    if unknown:
        kept = [row for row, route in enumerate(routes) if route >= 0]
        dataset, routes = dataset.select(kept), [routes[row] for row in kept]
    return dataset, routes, len(unknown)


class TeacherSet:
    """The run's teachers, by index; `forward` as every teacher source has it."""

    def __init__(self, members: list[Member]):
        if not members:
            raise ValueError("a TeacherSet needs at least one teacher")
        self.members = members
        self.names = tuple(member.name for member in members)

    def __len__(self) -> int:
        return len(self.members)

    def only(self) -> Any:
        """The source of a one-teacher run (seq_kd samples from it)."""
        if len(self.members) != 1:
            raise ValueError(f"this run has {len(self.members)} teachers {list(self.names)}, not one")
        return self.members[0].source

    @contextmanager
    def on_device(self) -> Iterator[Any]:
        """The one teacher's model with its weights on the device (seq_kd's sampling)."""
        with self.only().on_device() as model:
            yield model

    def route(self, example: dict) -> int:
        if len(self.members) == 1:
            return 0
        if "_teacher" not in example:
            raise ValueError("an example without _teacher in a run with several teachers: "
                             "StepContext.local_examples routes every row")
        return int(example["_teacher"])

    def forward(self, microbatches: list[Microbatch], examples: list[dict]) -> Optional[list[TeacherMix]]:
        """Per microbatch on the last stage, its rows' teachers' answers as one `TeacherMix`;
        None on other stages. Collective over the model-parallel ranks (and the world for servers)."""
        routes = [self.route(example) for example in examples]
        queued: list[list[Microbatch]] = [[] for _ in self.members]  # per teacher, its microbatches
        plans = []  # per microbatch: (teacher, its rows' positions in the batch, its slot in queued)
        for batch in microbatches:
            by_teacher: dict[int, list[int]] = {}
            for local, row in enumerate(batch.rows):  # local: the example's position in the microbatch
                by_teacher.setdefault(routes[row], []).append(local)
            plan = []
            for teacher, local_rows in sorted(by_teacher.items()):
                whole = len(local_rows) == len(batch.rows)
                plan.append((teacher, None if whole else local_rows, len(queued[teacher])))
                queued[teacher].append(batch if whole else select_examples(batch, local_rows))
            plans.append(plan)
        answers = []
        for member, batches in zip(self.members, queued):
            if batches or member.called_everywhere:
                answers.append(member.source.forward(batches, examples))
            else:
                answers.append([])
        if not parallel_state.is_pipeline_last_stage():
            return None
        return [self._mix(batch, plan, answers) for batch, plan in zip(microbatches, plans)]

    def _mix(self, batch: Microbatch, plan: list, answers: list) -> TeacherMix:
        counts = batch.example_token_counts()
        offsets = [0]
        for count in counts:
            offsets.append(offsets[-1] + int(count))
        parts = []
        for teacher, local_rows, slot in plan:
            member = self.members[teacher]
            index = None
            if local_rows is not None:
                index = torch.cat([torch.arange(offsets[row], offsets[row + 1]) for row in local_rows])
            parts.append(TeacherPart(member.name, answers[teacher][slot], index, member.temperature, member.topk))
        return TeacherMix(parts, offsets[-1], self.names, report=len(self.members) > 1)

    def close(self) -> None:
        for member in self.members:
            close = getattr(member.source, "close", None)
            if close is not None:
                close()


__all__ = ["Member", "TeacherSet", "route_dataset", "route_rows", "unknown_teacher_error"]
