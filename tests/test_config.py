"""The experiment schema (diffjax/config.py): every network section present is validated whichever one
``config.model.name`` picks."""

import os

import pytest
from conftest import ROOT

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
