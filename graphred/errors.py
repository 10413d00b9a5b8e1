"""Typed errors. Every graphred failure is a :class:`GraphredError` that says what was
wrong and what the user can do; none of them leaves the user's model changed."""
from __future__ import annotations


class GraphredError(Exception):
    """Base class of every error graphred raises on purpose."""


class CaptureError(GraphredError):
    """The model could not be captured as an FX graph."""


class PlanError(GraphredError, ValueError):
    """A plan cannot apply to this program (e.g. no cross-modal block). ``node`` (a node name) and
    ``module_path`` say where in the graph, when the failure has a place."""

    def __init__(self, message: str, *, node: str | None = None, module_path: str | None = None):
        super().__init__(message)
        self.node, self.module_path = node, module_path


class AnalysisError(GraphredError):
    """An analysis result is missing or inconsistent."""


class PassError(GraphredError):
    """A pass failed; the message names the pass and the passes that ran before it."""

    def __init__(self, message: str, *, pass_name: str | None = None, previous: tuple[str, ...] = ()):
        super().__init__(message)
        self.pass_name = pass_name
        self.previous = tuple(previous)


class PreconditionError(PassError):
    """A pass was given a graph it cannot work on."""


class PostconditionError(PassError):
    """A pass produced a graph that breaks an invariant (lint, meta['val'], ...)."""


class ConfigError(GraphredError):
    """A model directory or config could not be turned into a model."""


class InputError(GraphredError, ValueError):
    """A call a captured or reduced model cannot serve: the message names the input, the shape it got
    and what is supported."""


class GraphredWarning(UserWarning):
    """Base class of the warnings graphred gives: something works but is probably not what you want."""


class PlanSavesNothingWarning(GraphredWarning):
    """A plan's estimated FLOPs after are not below the FLOPs before: its own scoring, selection and
    gathers cost at least what the tokens it removes save."""
