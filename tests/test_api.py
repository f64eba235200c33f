"""The flat API: every exported name resolves, lazily, to the function or class it names."""

import importlib
import pkgutil
import subprocess
import sys

import dit_lens


def test_every_exported_name_is_the_object_not_a_module_of_that_name():
    for info in pkgutil.walk_packages(dit_lens.__path__, "dit_lens."):
        importlib.import_module(info.name)  # a submodule named like an export must not shadow it
    for package in (dit_lens, dit_lens.training):
        for name in package.__all__:
            value = getattr(package, name)
            assert name in ("methods", "metrics") or type(value).__name__ != "module", f"{package.__name__}.{name} is a module"
    assert callable(dit_lens.finetune) and callable(dit_lens.training.finetune) and callable(dit_lens.capture)


def test_importing_dit_lens_loads_no_model_code():
    script = "import sys, dit_lens; print(sorted(m for m in ('torch', 'diffusers', 'nnsight') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_the_face_exports_the_user_workflow_in_at_most_50_names():
    # the rest is reached through its package (dit_lens.interventions.EnergyGuidance, dit_lens.testing.build_pixart)
    assert len(dit_lens.__all__) == len(set(dit_lens.__all__)) <= 50
    assert {"capture", "concept_maps", "probe", "train_sae", "FeatureEdit", "patching"} <= set(dit_lens.__all__)
    assert dit_lens.interventions.EnergyGuidance and dit_lens.features.load_sae and dit_lens.testing.build_pixart
