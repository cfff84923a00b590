"""Every name repae.model documents resolves, and importing the package alone pulls in neither timm nor the
model modules (they load on first use)."""

import subprocess
import sys

import repae.model


def test_every_export_resolves():
    for name in repae.model.__all__:
        assert getattr(repae.model, name) is not None, name


def test_import_is_lazy():
    code = "import sys, repae.model; print('timm' in sys.modules, 'repae.model.sit' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]
