"""Prompt scheduling as AUTOMATIC1111's web UI reads it (`modules/prompt_parser.py`): which text the
prompt and the negative prompt say at every step, and `AND` sub-prompts with their weights.

    [to:when]         `to` is added after step `when`
    [from::when]      `from` is removed after step `when`
    [from:to:when]    `from` until step `when`, then `to`
    [a|b|c]           a at step 1, b at step 2, c at step 3, a again ... (empty options: [fe|]male)
    a cat AND a dog:0.8   sub-prompts, each guided against the negative prompt with its weight (default 1)

`when` with a decimal point is a fraction of the steps (0.5, .5, 1.0); without one it is a step
number (10). A number past the end means the whole run, one below 1 means never. In a hires-fix
second pass the numbers continue the first pass's timeline: step numbers beyond the first pass's
steps and fractions between 1 and 2 fall in the second pass (A1111's default, not its "old
scheduling" option). Parts nest and keep attention weights ([(cat:1.2):dog:0.5], a[b:[c:d:2]:1]e).

What the grammar cannot read stays text, as in A1111: an unbalanced or stray bracket or colon is
literal, and a `|` outside `[...|...]` or a backslash at the very end makes the whole prompt literal
(A1111's parser error). `AND` is split first (a `\\bAND\\b` word), each part's trailing `:number` is
its weight; the negative prompt is scheduled but never split. The texts keep attention syntax and
escapes for ldm.prompts. A schedule is a list of (last step, text); step s (1-based) uses the first
entry whose last step is >= s. The loop's step index i (0-based, counting U-Net calls) picks as
A1111's sampler does: the first entry with i <= last step, so "[a:b:2]" gives a for three calls.

Differences from A1111: its grammar is ambiguous where stray brackets touch a scheduled part
("[b:0.5]:]"), and its Earley parser then sometimes keeps the part as literal text; this parser always
reads a well-formed part. A1111 crashes on numbers such as 1e400 (int(inf)); they are clamped here.

Pure text, no torch: the families encode what `PromptPlan.texts` lists, once each.
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

_STOPS = "[]():|"  # never part of plain text (unescaped)
_NUMBER = re.compile(r"\s*([+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?)\s*\]")  # lark's SIGNED_NUMBER, then "]"
_AND = re.compile(r"\bAND\b")
_WEIGHT = re.compile(r"(?s)^(.*?)(?:\s*:\s*([-+]?(?:\d+\.?|\d*\.\d+)))?\s*$")

Schedule = tuple[tuple[int, str], ...]  # (last step, text), ascending; the last entry ends at the step count


@dataclass(frozen=True)
class _Edit:
    """[before:after:when]"""

    before: tuple
    after: tuple
    when: str  # the number as written: a decimal point makes it a fraction


@dataclass(frozen=True)
class _Alternate:
    options: tuple[tuple, ...]


class _Reader:
    """Recursive descent over A1111's schedule grammar. A part is a str, an _Edit or an _Alternate."""

    def __init__(self, text: str):
        self.text = text

    def sequence(self, i: int) -> tuple[list, int]:
        """Parts from i up to a stop character (or a bracket that does not close properly)."""
        text, parts = self.text, []
        while i < len(text):
            if text[i] in "([":
                got = self.bracket(i)
                if got is None:
                    break
                inner, i = got
                parts += inner
                continue
            j = i
            while j < len(text) and text[j] not in _STOPS:
                if text[j] == "\\":
                    if j + 1 == len(text) or text[j + 1] == "\n":
                        break  # an escape needs a character after it (lark's `\\.`)
                    j += 1
                j += 1
            if j == i:
                break
            parts.append(text[i:j])
            i = j
        return parts, i

    def bracket(self, i: int) -> tuple[list, int] | None:
        """(...), (...:...), [...], [a|b], [to:when], [from:to:when] at i, or None if it does not close."""
        text = self.text
        first, j = self.sequence(i + 1)
        nxt = text[j] if j < len(text) else ""
        if text[i] == "(":
            if nxt == ")":
                return ["(", *first, ")"], j + 1
            if nxt == ":":
                second, k = self.sequence(j + 1)
                if text[k:k + 1] == ")":
                    return ["(", *first, ":", *second, ")"], k + 1
            return None
        if nxt == "]":
            return ["[", *first, "]"], j + 1
        if nxt == "|":
            options = [first]
            while text[j:j + 1] == "|":
                option, j = self.sequence(j + 1)
                options.append(option)
            if text[j:j + 1] == "]":
                return [_Alternate(tuple(tuple(o) for o in options))], j + 1
            return None
        if nxt == ":":
            if m := _NUMBER.match(text, j + 1):  # [to:when]
                return [_Edit((), tuple(first), m.group(1))], m.end()
            second, k = self.sequence(j + 1)
            if text[k:k + 1] == ":" and (m := _NUMBER.match(text, k + 1)):
                return [_Edit(tuple(first), tuple(second), m.group(1))], m.end()
        return None

    def read(self) -> list | None:
        """The whole prompt's parts; stray brackets and colons are literal at the top level. None when
        A1111's parser would fail (a `|` outside an alternation, a dangling backslash)."""
        parts, i = self.sequence(0)
        while i < len(self.text):
            if self.text[i] not in "[]():":
                return None
            parts.append(self.text[i])
            more, i = self.sequence(i + 1)
            parts += more
        return parts


def _when(number: str, steps: int, first_pass_steps: int | None) -> int:
    """The last step of an edit's first part, clamped to the steps (below 1: never)."""
    v = float(number)
    if "." in number:  # a fraction; in a second pass 1..2 is that pass
        v = (v - (0.0 if first_pass_steps is None else 1.0)) * steps
    elif first_pass_steps is not None:
        v -= first_pass_steps
    return int(max(-1.0, min(v, float(steps))))  # no overflow on 1e400; -1 and below all mean never


def _render(parts, step: int, when) -> str:
    out = []
    for part in parts:
        if isinstance(part, str):
            out.append(part)
        elif isinstance(part, _Edit):
            out.append(_render(part.before if step <= when(part) else part.after, step, when))
        else:
            out.append(_render(part.options[(step - 1) % len(part.options)], step, when))
    return "".join(out)


def prompt_schedule(prompt: str, steps: int, first_pass_steps: int | None = None) -> Schedule:
    """A1111's `get_learned_conditioning_prompt_schedules` for one prompt: [(last step, text), ...].
    `first_pass_steps` is set for a hires-fix second pass of `steps` steps."""
    parts = _Reader(prompt).read()
    if parts is None:
        return ((steps, prompt),)
    whens: dict[int, int] = {}
    ends = {steps}

    def when(edit: _Edit) -> int:
        return whens[id(edit)]

    def collect(parts) -> None:
        for part in parts:
            if isinstance(part, _Edit):
                whens[id(part)] = w = _when(part.when, steps, first_pass_steps)
                if w >= 1:
                    ends.add(w)
                collect(part.before)
                collect(part.after)
            elif isinstance(part, _Alternate):
                ends.update(range(1, steps + 1))
                for option in part.options:
                    collect(option)

    collect(parts)
    return tuple((end, _render(parts, end, when)) for end in sorted(ends))


def sub_prompts(prompt: str) -> list[tuple[str, float]]:
    """A1111's `AND` split: [(text, weight)], a trailing `:number` being the sub-prompt's weight."""
    out = []
    for part in _AND.split(prompt):
        text, weight = _WEIGHT.match(part).groups()
        out.append((text, 1.0 if weight is None else float(weight)))
    return out


def text_at(schedule: Schedule, index: int) -> str:
    """The text at the loop's 0-based step `index` (A1111's sampler: first entry with index <= last step)."""
    for end, text in schedule:
        if index <= end:
            return text
    return schedule[0][1]  # past the end: A1111 falls back to the first entry


@dataclass(frozen=True)
class StepTexts:
    """The texts one step encodes: one per sub-prompt, and the negative prompt's."""

    conds: tuple[str, ...]
    uncond: str


@dataclass(frozen=True)
class PromptPlan:
    """A run's prompt and negative prompt, step by step."""

    conds: tuple[Schedule, ...]  # one schedule per AND sub-prompt
    weights: tuple[float, ...]  # their guidance weights
    uncond: Schedule

    @property
    def changes(self) -> bool:
        """Whether any text differs between steps."""
        return any(len(s) > 1 for s in (*self.conds, self.uncond))

    def at(self, index: int) -> StepTexts:
        return StepTexts(tuple(text_at(s, index) for s in self.conds), text_at(self.uncond, index))

    def texts(self, negative: bool = True) -> list[str]:
        """Every distinct text the run encodes (the negative prompt's too unless negative=False), in order."""
        schedules: Sequence[Schedule] = (*self.conds, self.uncond) if negative else self.conds
        return list(dict.fromkeys(text for s in schedules for _, text in s))


def plan_prompts(prompt: str, negative_prompt: str, steps: int, first_pass_steps: int | None = None) -> PromptPlan:
    """Split the prompt on AND, schedule every part and the negative prompt over `steps` (U-Net calls,
    as A1111 counts them: twice the steps for second-order samplers)."""
    subs = sub_prompts(prompt)
    return PromptPlan(tuple(prompt_schedule(text, steps, first_pass_steps) for text, _ in subs),
                      tuple(w for _, w in subs), prompt_schedule(negative_prompt, steps, first_pass_steps))

