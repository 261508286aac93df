"""One object per model family: no family branch outside ``bindweave_core/families`` (issue 12), and each
family object gives the official values (written out here from the spec and docs/kaleido-rrope.md, never
read from the code under test)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from bindweave_core.config import FAMILIES, PRESETS
from bindweave_core.errors import InputError
from bindweave_core.families import FAMILY_OBJECTS, family_for, sigma_sampling_family, sigma_sampling_for
from helpers import REPO

SCANNED = ("bindweave_core", "nodes", "training")  # product code; tests, benchmarks and tools may branch
FAMILY_PACKAGE = REPO / "bindweave_core" / "families"
# Words that name a family or its reference conditioning (a comparison with one is a family branch).
FAMILY_WORDS = {"bindweave", "kaleido", "wan-i2v", "wan-t2v", "slots", "rrope"}
# Names of the old family switches (gone: a family object answers instead).
SWITCHES = {"RROPE_FAMILIES", "SLOT_FAMILIES", "uses_rrope", "uses_slots"}
ALLOWED: set[str] = set()  # source text of sites allowed to compare with a family literal (none)


def _name(node: ast.AST) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    return None


def _is_string(node: ast.AST, words: set[str] | None = None) -> bool:
    return isinstance(node, ast.Constant) and isinstance(node.value, str) and (words is None or node.value in words)


def _holds_a_family_word(node: ast.AST) -> bool:
    """A family literal, or a literal tuple/list/set/dict keys holding one (``in ("auto", "rrope")``)."""
    if _is_string(node, FAMILY_WORDS):
        return True
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return any(_holds_a_family_word(e) for e in node.elts)
    if isinstance(node, ast.Dict):
        return any(k is not None and _holds_a_family_word(k) for k in node.keys)
    return False


def _compares_to_a_family(operands: list[ast.AST]) -> bool:
    """A family-name literal on one side, or a value called ``family`` (``cfg.family``) against a literal.
    Two family values compared (``family != scanned.family``: an override given?) pick no family."""
    if any(_holds_a_family_word(op) for op in operands):
        return True
    return any(_name(op) == "family" for op in operands) and any(map(_is_string, operands))


def _case_names_a_family(pattern: ast.AST) -> bool:
    """``case "kaleido":``, ``case "slots" | "rrope":`` (any match pattern holding a family literal)."""
    return any(isinstance(p, ast.MatchValue) and _is_string(p.value, FAMILY_WORDS) for p in ast.walk(pattern))


def _branches_on_family(node: ast.AST) -> bool:
    """``x == "kaleido"``, ``family != y``, ``m in ("slots", "rrope")``, ``case "kaleido":``,
    ``f in RROPE_FAMILIES``, ``cfg.uses_slots``, or ``if rrope:``."""
    if isinstance(node, ast.Compare):
        operands = [node.left, *node.comparators]
        if _compares_to_a_family(operands):  # any operator: ==, !=, in, not in, is, <...
            return True
        return any(_name(op) in SWITCHES for op in operands)
    if isinstance(node, ast.match_case):
        return _case_names_a_family(node.pattern)
    if isinstance(node, ast.Attribute) and node.attr in SWITCHES:
        return True
    # a bare flag named after a family (``if rrope:``); ``if slots:`` counts slot frames in the DiT
    return isinstance(node, (ast.If, ast.IfExp, ast.While)) and _name(node.test) in {"rrope", "kaleido", "bindweave"}


def family_branches(path: Path, root: Path = REPO) -> list[str]:
    """``path:line: source`` (path relative to ``root``) of every family branch in one file."""
    source = path.read_text()
    found = []
    for node in ast.walk(ast.parse(source)):
        if _branches_on_family(node):
            at = node.test if isinstance(node, (ast.If, ast.While)) else node.pattern if isinstance(
                node, ast.match_case) else node
            text = ast.get_source_segment(source, at)
            if not any(allowed in text for allowed in ALLOWED):
                found.append(f"{path.relative_to(root)}:{at.lineno}: {text}")
    return sorted(set(found))


def test_the_finder_sees_each_kind_of_family_branch(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text(
        'a = "tiny-kaleido" if m.family == "kaleido" else "tiny"\n'
        'if family in RROPE_FAMILIES:\n    pass\n'
        'b = config.num_ref_slots if config.uses_slots else 0\n'
        'rrope = mode == "rrope"\n'
        'if rrope:\n    pass\n'
        'c = family if family != scanned.family else None\n'
        'if args.kaleido_dir and "clip_vision" in family.encoders:\n    pass\n'
        'ok = name not in ("auto", "slots", "rrope") or family_for(mode).max_references\n'
        'ok = mode in ("kaleido",)\n'
        'ok = "wan-t2v" != cfg.family\n'
        'ok = family in {"bindweave": 1}\n'
        'match family:\n    case "bindweave" | "wan-i2v":\n        pass\n    case other:\n        pass\n'
        'ok = mode in C.FAMILIES\n')
    lines = {int(site.split(":")[1]) for site in family_branches(sample, tmp_path)}
    # a literal family name in any comparison or case is a branch; two family values compared, a
    # membership in a list named in constants and asking a family object are not
    assert lines == {1, 2, 4, 5, 6, 11, 12, 13, 14, 16}


def test_no_family_branch_outside_the_family_modules():
    files = [p for d in SCANNED for p in sorted((REPO / d).rglob("*.py")) if FAMILY_PACKAGE not in p.parents]
    assert len(files) > 50  # the walk sees the real tree
    sites = [site for p in files for site in family_branches(p)]
    assert not sites, "family branches outside bindweave_core/families (ask the family object):\n" + "\n".join(sites)


# ------------------------------------------------------------------------------------------ the objects
def test_every_config_family_has_one_object():
    assert tuple(FAMILY_OBJECTS) == FAMILIES
    assert all(family_for(name).name == name for name in FAMILIES)
    assert family_for(PRESETS["tiny-kaleido"]).name == "kaleido"  # a DiTConfig works too
    with pytest.raises(InputError, match="unknown model family 'phantom'"):
        family_for("phantom")


def test_option_lists_name_exactly_what_the_families_use():
    """The training options come from constants; each listed value is one some family uses, and back."""
    from bindweave_core import constants as C

    assert set(C.REFERENCE_CONDITIONINGS) == {f.conditioning for f in FAMILY_OBJECTS.values()}
    assert set(C.SIGMA_SAMPLINGS) == {f.sigma_sampling for f in FAMILY_OBJECTS.values()}


@pytest.mark.parametrize("planner, image, layout, family", [
    (True, True, "diffusers", "bindweave"), (False, True, "wan-original", "wan-i2v"),
    (False, False, "diffusers", "wan-t2v"), (False, False, "sat", "kaleido"),  # Kaleido-14B-S2V's release
])
def test_a_checkpoint_reads_as_its_family(planner, image, layout, family):
    from bindweave_core.families import checkpoint_family

    assert checkpoint_family(planner=planner, image_embedder=image, layout=layout) == family


def test_bindweave_family_gives_the_spec_values():
    """Spec section 9 (sampling), sections 5-8 (references), section 12 (training)."""
    f = family_for("bindweave")
    d = f.defaults()
    assert (d["width"], d["height"], d["num_frames"], d["fps"]) == (1280, 720, 81, 16)
    assert (d["steps"], d["guidance"], d["shift"], d["sampler"]) == (50, 5.0, 3.0, "unipc")
    assert d["negative_prompt"].startswith("Bright tones, overexposed, static") and \
        d["negative_prompt"].endswith("frame split, multiple parts, separated")  # spec section 3
    assert f.max_references == 4 and f.conditioning == "slots" and f.requires_planner
    assert set(f.encoders) == {"planner", "text_encoder", "clip_vision", "vae"}
    assert set(f.reference_encoders) == {"clip_vision", "vae"}
    assert f.canvas_colour == (0, 0, 0) and not f.letterbox_upscales and f.needs_video_condition
    assert f.smoke_preset == "tiny" and f.sigma_sampling == "shifted"
    assert f.slot_frames(PRESETS["tiny"]) == 4
    assert f.reference_vae_chunks(2, 81) == 2 + 21  # one per reference, then the 21 latent frames' condition


def test_kaleido_family_gives_the_official_values():
    """docs/kaleido-rrope.md: 896x512, 81 frames at 16 fps, rf-euler shift 7, 50 steps, guidance 6, 1-3
    references letterboxed on white (upscaled), UMT5 and VAE only, sigmoid-normal training draw."""
    f = family_for("kaleido")
    d = f.defaults()
    assert (d["width"], d["height"], d["num_frames"], d["fps"]) == (896, 512, 81, 16)
    assert (d["steps"], d["guidance"], d["shift"], d["sampler"]) == (50, 6.0, 7.0, "rf-euler")
    assert d["negative_prompt"].startswith("色调艳丽") and d["negative_prompt"].endswith("倒着走")
    assert f.max_references == 3 and f.conditioning == "rrope" and not f.requires_planner
    assert set(f.encoders) == {"text_encoder", "vae"} and f.reference_encoders == ("vae",)
    assert f.canvas_colour == (255, 255, 255) and f.letterbox_upscales and not f.needs_video_condition
    assert f.smoke_preset == "tiny-kaleido" and f.sigma_sampling == "kaleido"
    assert f.slot_frames(PRESETS["tiny-kaleido"]) == 0 and f.reference_vae_chunks(2, 81) == 2
    with pytest.raises(InputError, match="takes 1 to 3"):
        f.check_reference_count(4)
    with pytest.raises(InputError, match="text-to-video DiT"):
        f.check_dit(PRESETS["tiny"], "dit.safetensors", "bindweave")  # 36 input channels


@pytest.mark.parametrize("name", ["wan-i2v", "wan-t2v"])
def test_plain_wan_takes_bindweave_references_and_settings_without_a_planner(name):
    f = family_for(name)
    assert f.defaults() == family_for("bindweave").defaults() and f.max_references == 4
    assert f.conditioning == "slots" and not f.requires_planner and f.slot_frames(PRESETS["tiny"]) == 0
    with pytest.raises(InputError, match="no reference slots"):
        f.check_training_conditioning("slots")


def test_training_conditioning_and_noise_draw():
    family_for("bindweave").check_training_conditioning("slots")
    family_for("kaleido").check_training_conditioning("rrope")
    with pytest.raises(InputError, match="not trained for R-RoPE"):
        family_for("bindweave").check_training_conditioning("rrope")
    with pytest.raises(InputError, match="no reference slots"):
        family_for("kaleido").check_training_conditioning("slots")
    assert (sigma_sampling_for("slots"), sigma_sampling_for("rrope"), sigma_sampling_for("custom")) == \
        ("shifted", "kaleido", "shifted")
    # spec 12: shift u / (1 + (shift - 1) u) on u ~ U(0, 1) drawn in float64
    u = torch.rand(3, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    got = sigma_sampling_family("shifted").training_sigmas(3, torch.Generator().manual_seed(5), 5.0, None)
    torch.testing.assert_close(got, (5 * u / (1 + 4 * u)).float())
    with pytest.raises(InputError, match="unknown sigma sampling"):
        sigma_sampling_family("cosine")


# ------------------------------------------------------------------------------------------ typed geometry
def test_reference_condition_carries_typed_family_condition_and_geometry():
    from bindweave_core.conditioning import ReferenceCondition, VideoGeometry
    from nodes.convert import latent_stats

    geometry = VideoGeometry(64, 48, 5, latents_mean=(0.5,) * 16, latents_std=(2.0,) * 16)
    condition = torch.zeros(1, 20, 2, 6, 8)
    refs = ReferenceCondition(clip_tokens=None, slots=None, canvases=torch.zeros(2, 48, 64, 3),
                              masks=torch.ones(2, 48, 64), video_condition=condition, geometry=geometry)
    assert refs.family == "bindweave" and refs.num_references == 2
    assert refs.video_condition is condition and (refs.geometry.width, refs.geometry.num_frames) == (64, 5)
    assert latent_stats(geometry) == ([0.5] * 16, [2.0] * 16)
    # without recorded statistics: the Wan 2.1 VAE's (channel 7: mean 1.5508, std 2.0743)
    mean, std = latent_stats(VideoGeometry(64, 48, 5))
    assert (round(mean[7], 4), round(std[7], 4)) == (1.5508, 2.0743)
