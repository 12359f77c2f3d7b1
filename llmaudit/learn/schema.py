"""The schema of the shipped YAML content: roadmap, cards and quiz items.

Every text a user reads exists in Chinese and English (``Text``). Ids are stable: they key the
spaced-repetition history, so renaming one resets its schedule. Validation errors name the file, the
line, the item id and the field (see ``load.py``).
"""
from __future__ import annotations

import re
from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

ID = re.compile(r"^[a-z0-9][a-z0-9_.\-]*$")
MODULE = re.compile(r"^[a-z][a-z0-9_]*$")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, str_strip_whitespace=True,
                              defer_build=True)  # validators are built on first use: a quiz start reading
                                                 # pickled content (learn/load.py) never needs them


class Text(Strict):
    """One piece of text in both languages; neither may be empty."""

    zh: str = Field(min_length=1)
    en: str = Field(min_length=1)

    def get(self, lang: str) -> str:
        return self.zh if lang == "zh" else self.en


def _check_id(value: str) -> str:
    if not ID.match(value):
        raise ValueError(f"id {value!r} must be lowercase letters, digits and . _ - (e.g. ppo.clip-why)")
    return value


class Formula(Strict):
    label: Text
    tex: str = Field(min_length=3, description="matplotlib mathtext, wrapped in $...$")

    @field_validator("tex")
    @classmethod
    def _dollars(cls, v: str) -> str:
        if not (v.startswith("$") and v.endswith("$")):
            raise ValueError("a formula is mathtext wrapped in $...$")
        if "\\begin" in v:
            raise ValueError("mathtext has no environments (\\begin{...}); split the formula instead")
        return v


class QA(Strict):
    id: str
    q: Text
    a: Text
    source: Optional[str] = None  # e.g. "pro-tip" for the seeds' 面试 Pro Tips

    _id = field_validator("id")(classmethod(lambda cls, v: _check_id(v)))


class Card(Strict):
    """``cards/<module>.yaml``: everything a candidate must be able to say about one module."""

    module: str
    status: Literal["built", "planned"]  # planned: the module's code is not in this release yet
    day: int = Field(ge=1, le=16)
    title: Text
    one_liner: Text
    must_explain: Text  # the roadmap's "必须说清楚逻辑"
    formulas: list[Formula] = Field(min_length=1)
    key_points: list[Text] = Field(min_length=3)
    pitfalls: list[Text] = Field(min_length=2)  # include what is commonly misstated, and the correction
    qa: list[QA] = Field(min_length=3)
    followups: list[Text] = Field(default_factory=list)
    kernels: list[str] = Field(default_factory=list)  # kernel names of the module (checked when built)
    refs: list[str] = Field(default_factory=list)  # "arXiv:1707.06347", "Sutton & Barto 2018, ch. 6"

    @field_validator("module")
    @classmethod
    def _module(cls, v: str) -> str:
        if not MODULE.match(v):
            raise ValueError(f"module {v!r} must be a lowercase identifier such as ppo or vlm_projection")
        return v


class Numeric(Strict):
    generator: str  # a name registered in llmaudit.learn.numeric
    tolerance: float = Field(gt=0)  # absolute tolerance on the user's answer


class QuizItem(Strict):
    """One quiz item. ``q`` may hold {placeholders} filled by a numeric generator's parameters."""

    id: str
    type: Literal["recall", "choice", "numeric", "code"]
    module: str
    q: Text
    a: Text  # the answer (recall), or the explanation shown after grading (choice, numeric, code)
    keypoints: list[Text] = Field(default_factory=list)  # what a good spoken answer mentions
    choices: Optional[list[Text]] = None
    answer: Optional[int] = None  # index into choices
    numeric: Optional[Numeric] = None
    kernel: Optional[str] = None

    _id = field_validator("id")(classmethod(lambda cls, v: _check_id(v)))

    @model_validator(mode="after")
    def _by_type(self) -> QuizItem:
        if self.type == "choice":
            if not self.choices or len(self.choices) < 2:
                raise ValueError("a choice item needs at least 2 choices")
            if self.answer is None or not 0 <= self.answer < len(self.choices):
                raise ValueError(f"answer must index choices (0..{len(self.choices) - 1})")
        elif self.choices is not None or self.answer is not None:
            raise ValueError(f"only choice items have choices/answer (this one is {self.type})")
        if (self.type == "numeric") != (self.numeric is not None):
            raise ValueError("numeric items, and only they, have a numeric: {generator, tolerance} block")
        if (self.type == "code") != (self.kernel is not None):
            raise ValueError("code items, and only they, name a kernel")
        if self.type == "recall" and not self.keypoints:
            raise ValueError("a recall item lists the keypoints a good answer mentions")
        return self


class QuizDay(Strict):
    """``quizzes/dayNN.yaml``."""

    day: int = Field(ge=1, le=16)
    items: list[QuizItem] = Field(min_length=15)


class RoadmapDay(Strict):
    day: int = Field(ge=1, le=16)
    title: Text
    goal: Text
    must_explain: Text
    modules: list[str] = Field(min_length=1)
    bonus: bool = False


class Roadmap(Strict):
    """``quizzes/roadmap.yaml``: days 1-14 of the learning guide plus bonus days 15 and 16."""

    days: list[RoadmapDay]

    @model_validator(mode="after")
    def _days(self) -> Roadmap:
        numbers = [d.day for d in self.days]
        if numbers != list(range(1, len(numbers) + 1)):
            raise ValueError(f"days must be 1, 2, 3, ... in order; found {numbers}")
        return self
