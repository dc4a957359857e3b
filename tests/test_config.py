"""The experiment schema (diffjax/config.py): every network section present is validated whichever one
``config.model.name`` picks, the Trainer refuses an invalid config in one line before building anything, and
``sampling_defaults`` turns ``config.sampling`` (or the command line's flags) into Text2Image's keywords."""

import math
import os

import pytest
from conftest import ROOT
from fakes import tiny_config

from diffjax import config as defaults


def _one_line(excinfo, fragment):
    message = str(excinfo.value)
    assert "\n" not in message and fragment in message, message


@pytest.mark.parametrize("chosen, key, value, message", [
    ("unet", "model.dit.depth", -3, "config.model.dit: DiTConfig: depth must be a positive integer, got -3"),
    ("dit", "model.unet.num_res_blocks", 0, "config.model.unet: UNetConfig: num_res_blocks must be >= 1, got 0"),
    ("unet", "model.dit.preset", "huge", "config.model.dit.preset='huge'"),
])
def test_a_network_section_that_is_not_chosen_is_validated_too(chosen, key, value, message):
    tiny = os.path.join(ROOT, "experiments", "configs", "tiny.py")
    defaults.validate(defaults.load_config(tiny, [f"model.name={chosen}"]))  # the recipe: valid with either network
    config = defaults.load_config(tiny, [f"model.name={chosen}", f"{key}={value}"])
    with pytest.raises(ValueError) as e:
        defaults.validate(config)
    _one_line(e, message)


@pytest.mark.parametrize("key, value, message", [
    ("training.on_nonfinite", "ignore", "config.training.on_nonfinite='ignore': expected one of skip, stop"),
    ("model.dit.depth", -3, "config.model.dit: DiTConfig: depth must be a positive integer, got -3"),
])
def test_the_trainer_refuses_an_invalid_config_in_one_line_before_building_anything(monkeypatch, key, value,
                                                                                    message):
    from diffjax import build
    from diffjax.train import Trainer

    monkeypatch.setattr(build, "models_from_config", lambda *a, **k: pytest.fail("the Trainer built networks"))
    config = tiny_config()
    *path, name = key.split(".")
    section = config
    for part in path:
        section = section[part]
    section[name] = value
    with pytest.raises(ValueError) as e:
        Trainer(config)
    _one_line(e, message)
    legacy = tiny_config()
    del legacy["alignment"]  # a config without a section of the schema (e.g. one written before it existed)
    with pytest.raises(ValueError) as e:
        Trainer(legacy)
    _one_line(e, "config key 'alignment.")


def test_sampling_defaults_are_the_sampling_sections_text2image_keywords():
    config = defaults.get_config()
    assert defaults.sampling_defaults(config.sampling) == {
        "sampler": "dpmpp_2m", "num_steps": 25, "guidance_scale": 3.0, "timestep_spacing": "trailing",
        "guidance_schedule": "constant", "guidance_interval": None}
    config.sampling.guidance_interval = "0.5,5.42"
    config.sampling.sampler, config.sampling.num_steps = "heun", 7
    kw = defaults.sampling_defaults(config.sampling, alignment_guidance_scale=0.25)
    assert kw["guidance_interval"] == (0.5, 5.42) and kw["alignment_guidance_scale"] == 0.25
    assert (kw["sampler"], kw["num_steps"]) == ("heun", 7)
    # A run's config from before guidance_schedule / guidance_interval existed: Text2Image's own defaults stand.
    old = {k: v for k, v in config.sampling.items() if k not in ("guidance_schedule", "guidance_interval")}
    assert set(defaults.sampling_defaults(old)) == {"sampler", "num_steps", "guidance_scale", "timestep_spacing"}
    # The command line's flags: only those given, an interval of "" (guidance everywhere) included.
    flags = dict.fromkeys(defaults.SAMPLING_KEYWORDS, None)
    assert defaults.sampling_defaults(flags, where="--") == {}
    flags.update(num_steps=12, guidance_interval="")
    assert defaults.sampling_defaults(flags, where="--") == {"num_steps": 12, "guidance_interval": None}
    assert defaults.sampling_defaults({"guidance_interval": "1,inf"})["guidance_interval"] == (1.0, math.inf)
    for where, interval in (("config.sampling.", "5,1"), ("--", "a,b")):
        with pytest.raises(ValueError) as e:
            defaults.sampling_defaults({"guidance_interval": interval}, where=where)
        _one_line(e, f"{where}guidance_interval must")
