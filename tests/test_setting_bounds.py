"""The one settings validator (bindweave_core.setting_bounds): what GenerationSettings accepts, what it refuses."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from bindweave_core import constants as C
from bindweave_core.errors import InputError
from bindweave_core.pipeline import GenerationSettings
from bindweave_core.setting_bounds import SETTINGS, check_reference_count, check_setting


def test_every_generation_setting_has_one_bound_and_the_same_default():
    fields = {f.name: f.default for f in dataclasses.fields(GenerationSettings)}
    assert set(fields) == set(SETTINGS)
    for name, default in fields.items():
        if name != "prompt":
            assert SETTINGS[name].default == default, name


@pytest.mark.parametrize("change,expected", [
    ({"guidance": np.float32(5.0)}, {"guidance": 5.0}),  # numpy scalars
    ({"guidance": np.float64(4.5)}, {"guidance": 4.5}),
    ({"num_frames": np.int64(81)}, {"num_frames": 81}),
    ({"shift": 3}, {"shift": 3.0}),  # an int where a float goes
    ({"steps": 4.0}, {"steps": 4}),  # a whole float where an int goes
    ({"seed": np.uint64(2 ** 64 - 1)}, {"seed": 2 ** 64 - 1}),
    ({"clip_resize_antialias": np.bool_(True)}, {"clip_resize_antialias": True}),
])
def test_reasonable_values_become_plain_python_values(change, expected):
    s = GenerationSettings(prompt="a cat", **change)
    for name, value in expected.items():
        got = getattr(s, name)
        assert got == value and type(got) is type(value), (name, got)


def test_defaults_are_unchanged_by_the_checks():
    s = GenerationSettings(prompt="a cat")
    assert (s.width, s.height, s.num_frames, s.steps, s.guidance, s.shift, s.sampler, s.seed, s.fps) == (
        C.DEFAULT_WIDTH, C.DEFAULT_HEIGHT, C.DEFAULT_FRAMES, C.DEFAULT_STEPS, C.DEFAULT_GUIDANCE, C.DEFAULT_SHIFT,
        C.DEFAULT_SAMPLER, C.DEFAULT_SEED, C.DEFAULT_FPS)
    assert type(s.guidance) is float and type(s.steps) is int


@pytest.mark.parametrize("change,message", [
    ({"num_frames": "81"}, r"frames must be 4k\+1 from 1 to 4077; got the number 81, not the text '81'"),
    ({"steps": "50"}, r"steps must be a whole number from 1 to 1000; got the number 50, not the text"),
    ({"prompt": ["a", "cat"]}, r"prompt must be text \(a str\), got a list"),
    ({"prompt": "\u200b \u2060\t"}, r"the prompt is empty \(or only invisible characters\)"),
    ({"steps": 1.5}, r"steps must be a whole number from 1 to 1000, got 1.5"),
    ({"steps": True}, r"steps must be a whole number from 1 to 1000; got a bool"),
    ({"guidance": float("nan")}, r"guidance must be finite, a number from 0 to 100, got nan"),
    ({"guidance": np.float32("nan")}, r"guidance must be finite"),
    ({"guidance": "5"}, r"guidance must be a number from 0 to 100; got the number 5, not the text '5'"),
    ({"shift": 0.05}, r"shift must be a number from 0.1 to 100, got 0.05"),
    ({"sampler": "dpm++"}, r"unknown sampler 'dpm\+\+'; choose one of unipc, unipc-diffusers, euler, rf-euler"),
    ({"cfg_batch": "both"}, r"unknown cfg_batch 'both'"),
    ({"refine_prompt": "yes"}, r"refine_prompt must be true or false"),
    ({"width": 1000}, r"width must be a multiple of 16 from 16 to 16384, e.g. 992 or 1008, got 1000"),
    ({"num_frames": 80}, r"frames must be 4k\+1 from 1 to 4077, e.g. 77 or 81, got 80"),
    ({"negative_prompt": None}, r"negative prompt must be text"),
])
def test_unreasonable_values_are_refused_when_the_settings_are_made(change, message):
    args = {"prompt": "a cat", **change}
    with pytest.raises(InputError, match=message):
        GenerationSettings(**args)


def test_replace_checks_again():
    s = GenerationSettings(prompt="a cat")
    with pytest.raises(InputError, match="steps must be"):
        dataclasses.replace(s, steps=0)


def test_bounds_are_inclusive_and_fractional_floats_pass():
    assert check_setting("shift", 0.1) == 0.1 and check_setting("shift", 100) == 100.0
    assert check_setting("guidance", 5.5) == 5.5 and check_setting("step_cache", 0.05) == 0.05
    assert check_setting("refine_seed", None) is None
    assert math.isclose(check_setting("guidance", np.float32(5.1)), 5.1, rel_tol=1e-7)


def test_one_reference_count_check_names_the_model_and_the_fix():
    check_reference_count(4)
    with pytest.raises(InputError, match=r"5 reference images given; BindWeave takes 1 to 4. Remove 1 of them"):
        check_reference_count(5, 4, "BindWeave")
    with pytest.raises(InputError, match=r"0 reference images given; this model takes 1 to 3\.$"):
        check_reference_count(0, 3)
