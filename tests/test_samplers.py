import pytest
import torch

from ldm import samplers
from ldm.guidance import apply_cfg, uses_cfg
from tiny import SD15_SCHEDULER

REQUIRED = ["DDIM", "Euler", "Euler a", "Heun", "LMS", "DPM2", "DPM2 a", "DPM++ 2M", "DPM++ 2M SDE", "DPM++ SDE", "UniPC", "DEIS", "PLMS"]


def test_required_samplers_present_and_build():
    for name in REQUIRED:
        for schedule in samplers.schedule_names(name):
            sched = samplers.make_scheduler(name, schedule, SD15_SCHEDULER)
            sched.set_timesteps(5)


@pytest.mark.parametrize("name,cls,option", [
    ("DPM++ 2M", "DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    ("DPM++ 2M SDE", "DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
    ("Euler a", "EulerAncestralDiscreteScheduler", {}),
    ("DPM2 a", "KDPM2AncestralDiscreteScheduler", {}),
    ("PLMS", "PNDMScheduler", {"skip_prk_steps": True}),
])
def test_registry_maps_to_the_right_scheduler(name, cls, option):
    sched = samplers.make_scheduler(name, "Automatic", SD15_SCHEDULER)
    assert type(sched).__name__ == cls
    for k, v in option.items():
        assert sched.config[k] == v


def test_karras_and_exponential_set_the_option():
    assert samplers.make_scheduler("DPM++ 2M", "Karras", SD15_SCHEDULER).config.use_karras_sigmas
    assert samplers.make_scheduler("Euler", "Exponential", SD15_SCHEDULER).config.use_exponential_sigmas
    assert samplers.make_scheduler("DDIM", "SGM Uniform", SD15_SCHEDULER).config.timestep_spacing == "trailing"


def test_pre_19_combined_names_are_aliases():
    assert samplers.resolve("DPM++ 2M Karras") == ("DPM++ 2M", "Karras")
    assert samplers.resolve("DPM++ 2M SDE Exponential", None) == ("DPM++ 2M SDE", "Exponential")
    with pytest.raises(ValueError, match="already implies"):
        samplers.resolve("DPM++ 2M Karras", "Exponential")


def test_unknown_names_are_errors_listing_choices():
    with pytest.raises(ValueError, match="unknown sampler 'Euler b'.*DPM\\+\\+ 2M"):
        samplers.resolve("Euler b")
    with pytest.raises(ValueError, match="unknown schedule type"):
        samplers.resolve("Euler", "Wobbly")
    with pytest.raises(ValueError, match="does not support the 'Karras'"):
        samplers.resolve("Euler a", "Karras")


def test_sde_sampler_gets_per_image_seeds():
    sched = samplers.make_scheduler("DPM++ SDE", "Automatic", SD15_SCHEDULER, seeds=[5, 6])
    assert sched.config.noise_sampler_seed == [5, 6]


def test_cfg_order_is_uncond_then_cond():
    uncond, cond = torch.zeros(1, 4, 2, 2), torch.ones(1, 4, 2, 2)
    out = apply_cfg(torch.cat([uncond, cond]), 7.5)
    assert torch.equal(out, torch.full((1, 4, 2, 2), 7.5))
    assert uses_cfg(1.01) and not uses_cfg(1.0) and not uses_cfg(0.5)


@pytest.mark.parametrize("sampler, schedule", [(["Euler"], "Automatic"), ({"name": "Euler"}, "Automatic"), ("Euler", ["Karras"])])
def test_names_that_are_not_text_are_readable_errors(sampler, schedule):
    with pytest.raises(ValueError, match="must be a name"):
        samplers.resolve(sampler, schedule)
