"""`Conditioning`: what a model family's `encode` hands the engine (kept apart from ldm.family so that
family modules can build it without importing the module that picks them), and the prompt schedule
around it: `plan_for` (which texts each step says, ldm.prompt_schedule), `scheduled` (a family's
per-step conditionings as one loop extension) and `check_prompt_plan` (refusals before model work)."""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import torch

from .denoise import Extension, StepInfo
from .guidance import uses_cfg
from .params import GenerationParams
from .prompt_schedule import PromptPlan, StepTexts, plan_prompts, sub_prompts
from .samplers import calls_per_step

CHUNK = 75  # tokens in one CLIP chunk: an AND sub-prompt is at least one row of that many


@dataclass(frozen=True)
class Conditioning:
    """A batch's text conditioning, [rows, seq, dim] each: cond has the B rows of every AND sub-prompt,
    sub-prompt after sub-prompt; uncond (B rows) is None when guidance is off."""

    cond: torch.Tensor
    uncond: torch.Tensor | None
    extensions: Sequence[Extension] = field(default_factory=tuple)  # what the family's U-Net needs besides
    weights: tuple[float, ...] = (1.0,)  # each sub-prompt's guidance weight (A1111's `AND ...:w`)


def schedule_steps(p: GenerationParams) -> int:
    """The steps a prompt schedule counts: U-Net calls, twice the steps for second-order samplers (A1111)."""
    return p.steps * calls_per_step(p.sampler)


def plan_for(p: GenerationParams, first_pass_steps: int | None = None) -> PromptPlan:
    """What p's prompt (without <lora:...> tags) and negative prompt say at each step; `first_pass_steps`
    (`schedule_steps` of the first pass) for a hires-fix second pass."""
    return plan_prompts(p.prompt, p.negative_prompt, schedule_steps(p), first_pass_steps)


def scheduled(plan: PromptPlan, build: Callable[[StepTexts], Conditioning],
              extensions: Sequence[Extension] = ()) -> Conditioning:
    """A family's conditioning for a whole plan. `build` assembles one step's batch from texts the
    family has already encoded; it is called once per distinct step. A plan that never changes is that
    batch; otherwise a `PromptSwitch` in the extensions swaps it in step by step."""
    first = build(plan.at(0))
    if not plan.changes:
        return replace(first, extensions=(*first.extensions, *extensions))
    return Conditioning(first.cond, first.uncond, (PromptSwitch(plan, build, first), *extensions), first.weights)


class PromptSwitch(Extension):
    """A scheduled prompt in the loop: at step i the text conditioning (`text_embeds`) and the family's
    own per-step inputs (`unet_kwargs`, e.g. SDXL's pooled embeddings) come from `build(plan.at(i))`."""

    def __init__(self, plan: PromptPlan, build: Callable[[StepTexts], Conditioning], first: Conditioning):
        self.plan = plan
        self.build = build
        self.built: dict[StepTexts, Conditioning] = {plan.at(0): first}
        self.batches: dict[tuple[StepTexts, bool], torch.Tensor] = {}

    def at(self, index: int) -> Conditioning:
        texts = self.plan.at(index)
        if texts not in self.built:
            self.built[texts] = self.build(texts)
        return self.built[texts]

    def text_embeds(self, step: StepInfo) -> torch.Tensor:
        key = (self.plan.at(step.index), step.guided)
        if key not in self.batches:
            c = self.at(step.index)
            self.batches[key] = torch.cat([c.uncond, c.cond]) if step.guided else c.cond
        return self.batches[key]

    def unet_kwargs(self, step: StepInfo) -> dict:
        kwargs: dict = {}
        for ext in self.at(step.index).extensions:
            kwargs.update(ext.unet_kwargs(step))
        return kwargs


def check_prompt_plan(p: GenerationParams, max_tokens: int, count_tokens: Callable[[str], int]) -> None:
    """Refuse, before model work, what AND cannot do. `p.prompt` is without <lora:...> tags."""
    subs = sub_prompts(p.prompt)
    weights = [w for _, w in subs]
    if not all(math.isfinite(w) for w in weights):
        raise ValueError("a sub-prompt weight (the ':number' at the end of a prompt or AND part) must be a finite "
                         "number, e.g. 'a dog:0.8'")
    if weights != [1.0] and not uses_cfg(p.guidance_scale):
        what = "AND" if len(subs) > 1 else f"the weight ':{weights[0]:g}' at the end of the prompt"
        raise ValueError(f"{what} combines sub-prompts through guidance, which is off at CFG scale "
                         f"{p.guidance_scale:g}; raise the CFG scale above 1 or remove it")
    if len(subs) > 1:
        # Every sub-prompt is a whole row of the U-Net's text batch: count each as at least one chunk.
        cost = sum(max(count_tokens(text), CHUNK) for text, _ in subs)
        if cost > max_tokens:
            raise ValueError(f"the prompt's {len(subs)} AND sub-prompts count as {cost:,} tokens (each at least "
                             f"{CHUNK}); the limit is {max_tokens:,}")
