"""recon.registry: registration, lookup errors, the contract check, plugins; recon.output validation."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from recon.output import TwoHandOutput
from recon.registry import REGRESSORS, PluginError, Registry, build_regressor, import_plugin


@pytest.fixture(autouse=True)
def _restore_regressors(monkeypatch):
    """Registrations made by a test disappear after it (the registry is process-wide)."""
    from recon.registry import load_builtin_regressors

    load_builtin_regressors()
    monkeypatch.setattr(REGRESSORS, "_items", dict(REGRESSORS._items))


def test_registry_register_get_and_duplicates():
    registry = Registry("thing")

    @registry.register("a")
    class A:
        pass

    assert registry.get("a") is A and "a" in registry and registry.names() == ["a"]
    registry.register("a")(A)  # re-registering the same object is harmless (module re-import)
    with pytest.raises(KeyError, match="already registered"):
        registry.register("a")(type("B", (), {}))
    with pytest.raises(KeyError, match=r"unknown thing 'zz'; known: a"):
        registry.get("zz")


def test_build_regressor_unknown_name_lists_known_ones():
    with pytest.raises(KeyError) as info:
        build_regressor("no-such-arch")
    assert "baseline" in str(info.value) and "no-such-arch" in str(info.value)


def test_build_regressor_checks_the_contract():
    @REGRESSORS.register("_test_no_losses")
    class NoLosses(nn.Module):
        def forward(self, batch):
            return batch

    @REGRESSORS.register("_test_not_module")
    class NotModule:
        def __init__(self, *, width: int = 1):
            self.width = width

    with pytest.raises(TypeError, match="no losses"):
        build_regressor("_test_no_losses")
    with pytest.raises(TypeError, match="not a torch.nn.Module"):
        build_regressor("_test_not_module")
    with pytest.raises(TypeError, match="_test_not_module.*unexpected keyword argument 'depth'"):
        build_regressor("_test_not_module", depth=3)


def test_import_plugin_from_a_file_registers(tmp_path):
    plugin = tmp_path / "my_plugin_mod.py"
    plugin.write_text(
        "from torch import nn\n"
        "from recon.registry import REGRESSORS\n"
        "@REGRESSORS.register('_test_plugin_arch')\n"
        "class Mine(nn.Module):\n"
        "    def forward(self, batch): return batch\n"
        "    def losses(self, output, batch): return {}\n"
    )
    import_plugin(str(plugin))
    import_plugin(str(plugin))  # a second import is a no-op, not a duplicate registration
    assert "_test_plugin_arch" in REGRESSORS
    assert isinstance(build_regressor("_test_plugin_arch"), nn.Module)
    with pytest.raises(PluginError, match="no such file"):
        import_plugin(str(tmp_path / "missing.py"))
    with pytest.raises(PluginError, match="no module named 'not_a_real_module_xyz'"):
        import_plugin("not_a_real_module_xyz")


def _output(batch: int, **changes) -> TwoHandOutput:
    fields = dict(
        right_verts=torch.zeros(batch, 778, 3),
        left_verts=torch.zeros(batch, 778, 3),
        right_joints=torch.zeros(batch, 21, 3),
        left_joints=torch.zeros(batch, 21, 3),
        rel_root=torch.zeros(batch, 3),
    )
    fields.update(changes)
    return TwoHandOutput(**fields)


def test_two_hand_output_validate_names_the_field():
    _output(2).validate()
    with pytest.raises(ValueError, match=r"TwoHandOutput.left_joints: expected shape \(2, 21, 3\), got \(2, 16, 3\)"):
        _output(2, left_joints=torch.zeros(2, 16, 3)).validate()
    with pytest.raises(ValueError, match="right_joints_img"):
        _output(2, right_joints_img=torch.zeros(2, 21, 3)).validate()
    out = _output(3, rel_root=torch.ones(3, 3, requires_grad=True))
    assert not out.detach().rel_root.requires_grad and len(out) == 3
