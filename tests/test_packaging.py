"""The package's shape: importable without ComfyUI, a sane pyproject, the design card's layout."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys

import tomllib

from helpers import REPO


def test_core_imports_without_comfyui():
    code = ("import sys, importlib.util\n"
            "assert importlib.util.find_spec('comfy') is None and importlib.util.find_spec('comfy_api') is None\n"
            "import bindweave_core, bindweave_core.dit, bindweave_core.dit.loading\n"
            "assert not any(m.split('.')[0] in ('comfy', 'comfy_api', 'folder_paths') for m in sys.modules)\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def test_root_package_imports_in_plain_python():
    spec = importlib.util.spec_from_file_location("bindweave_pack", REPO / "__init__.py",
                                                  submodule_search_locations=[str(REPO)])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.__all__ == []  # no ComfyUI: nothing registered, nothing broken


def test_pyproject_metadata():
    meta = tomllib.loads((REPO / "pyproject.toml").read_text())
    project = meta["project"]
    assert "comfyui" not in project["name"].lower()
    assert re.fullmatch(r"\d+\.\d+\.\d+", project["version"])
    # An SPDX expression plus license-files: the table form is deprecated by setuptools (builds fail from
    # 2027-02-18); the SPDX form needs setuptools >= 77 in the build requirements.
    assert project["license"] == "Apache-2.0" and project["license-files"] == ["LICENSE"]
    assert "setuptools>=77" in meta["build-system"]["requires"]
    assert "Apache License" in (REPO / "LICENSE").read_text()
    deps = project["dependencies"] + sum(project["optional-dependencies"].values(), [])
    assert not any(re.match(r"torch\b", d) for d in deps), "torch must not be a dependency"
    assert all(">=" in d for d in project["dependencies"]), "dependencies are lower-bounded"
    assert {"train", "dev"} <= set(project["optional-dependencies"])
    # diffusers refuses sageattention < 2.1.1 (the registry's 1.0.6): no extra may install it
    assert not any(d.startswith("sageattention") for d in deps)
    comfy = meta["tool"]["comfy"]
    assert comfy["PublisherId"] and comfy["DisplayName"] and comfy["requires-comfyui"]


def test_design_card_layout():
    for name in ("__init__.py", "nodes", "bindweave_core", "training", "workflows", "tests", "benchmarks",
                 "pyproject.toml", "README.md", "LICENSE", ".ci/run"):
        assert (REPO / name).exists(), name


def test_readme_has_the_two_setup_commands_and_the_model_table():
    from bindweave_core.model_files import MODEL_FILES

    readme = (REPO / "README.md").read_text()
    setup = readme.split("## Set-up", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", setup, flags=re.S)
    assert len(blocks) == 2, "exactly two set-up commands"
    assert "bindweave_core generate" in blocks[0] and "examples/singleface_1/man.png" in blocks[0]
    assert blocks[1].strip() == "python -m pytest -q"
    assert (REPO / "examples/singleface_1/man.png").exists() and (REPO / "examples/singleface_1/prompt.txt").exists()
    assert "python -m pytest -q" in (REPO / ".ci/run").read_text()
    table = readme.split("### Which model files go where", 1)[1].split("\n### ", 1)[0]
    for f in MODEL_FILES:
        row = next((line for line in table.splitlines() if f"`{f.filename}`" in line), None)
        assert row is not None, f.filename
        assert f"models/{f.comfy_folder}/" in row and f.size in row, row
